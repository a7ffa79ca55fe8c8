"""Plain-text tables of the results of `evaluate_ddpm` and `sweep_ddpm`, and of the text-to-image
evaluations (`evaluation.text_to_image_eval`)."""

from nanodiffusion.evaluation.text_to_image_eval import SHAPE_SETS, headline

DISTANCE_NAME = "Fréchet distance (classifier features)"


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """Align columns: the first to the left, the others to the right."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"


def number(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_evaluation(result: dict) -> str:
    """The summary of one evaluation (generated vs as many real training images), then per-class rows."""
    real = result["real"]
    title = _title(result, f"{result['num_images']} images, {result['sampler']}, {result['num_steps']} steps")
    summary = format_table(
        ["", "class agreement", "Fréchet distance", "diversity ratio"],
        [[f"generated ({result['num_images']})", percent(result.get("class_agreement")),
          number(result["frechet_distance"]), number(result["diversity_ratio"])],
         [f"real train ({real['num_images']})", percent(real.get("class_agreement")),
          number(real["frechet_distance"]), number(real["diversity_ratio"])]])
    names = list(result["per_class_diversity_ratio"])
    agreement = result.get("per_class_agreement", {})
    per_class = format_table(["class", "agreement", "diversity ratio"],
                             [[name, percent(agreement.get(name)),
                               number(result["per_class_diversity_ratio"][name])] for name in names])
    parts = [title, "", summary, "", per_class]
    if "confusion_matrix" in result:
        parts += ["", "most frequent confusions (asked -> classified): " + _top_confusions(result, names)]
    parts += ["", "Fréchet distance: between Gaussians fitted to the classifier's penultimate features and "
                  "to those of the test split (lower is better; not comparable to Inception FIDs).",
              "Diversity ratio: mean pairwise feature distance within a class over the real data's."]
    return "\n".join(parts)


def format_sweep(sweep: dict) -> str:
    """Two sampler x steps tables, Fréchet distance and class agreement, like Table 1 of the DDIM paper."""
    runs = sweep["runs"]
    samplers = list(dict.fromkeys(run["sampler"] for run in runs))
    steps = list(dict.fromkeys(run["num_steps"] for run in runs))
    cell = {(run["sampler"], run["num_steps"]): run for run in runs}
    first, real = runs[0], sweep["real"]
    title = _title(sweep, f"{first['num_images']} images per sampler and step count", first)
    header = ["sampler \\ steps", *map(str, steps)]
    distance = format_table(header, [[s, *(number(cell[s, n]["frechet_distance"]) for n in steps)]
                                     for s in samplers])
    parts = [title, "", f"{DISTANCE_NAME}, lower is better; real training images score "
                        f"{number(real['frechet_distance'])}", distance]
    if "class_agreement" in first:
        agreement = format_table(header, [[s, *(percent(cell[s, n]["class_agreement"]) for n in steps)]
                                          for s in samplers])
        parts += ["", f"class agreement, higher is better; real training images score "
                      f"{percent(real['class_agreement'])}", agreement]
    if "heun" in samplers:
        parts += ["", "heun evaluates the model twice per step (once on the last one)"]
    return "\n".join(parts)


def _title(result: dict, what: str, settings: dict | None = None) -> str:
    settings = settings or result
    return (f"{result['dataset']}: {what}, guidance {settings['guidance_scale']:g}, seed {settings['seed']}; "
            f"classifier test accuracy {percent(result['classifier_test_accuracy'])}")


def _top_confusions(result: dict, names: list[str], count: int = 3) -> str:
    confusion = result["confusion_matrix"]
    pairs = sorted(((confusion[i][j], i, j) for i in range(len(names)) for j in range(len(names)) if i != j),
                   reverse=True)
    shown = [f"{names[i]} -> {names[j]} ({n})" for n, i, j in pairs[:count] if n > 0]
    return ", ".join(shown) or "none"


def format_text_to_image(result: dict) -> str:
    """One row per prompt set: adherence (class agreement, or shapes prompts with every check passed), the
    same for real images where there are, the Fréchet distance and the diversity ratio; then the shapes checks
    one by one."""
    settings, results = result["settings"], result["results"]
    title = (f"text-to-image: {settings['sampler']}, {settings['num_steps']} steps, guidance "
             f"{settings['guidance_scale']:g}, seed {settings['seed']}")
    rows = []
    for name, value in results.items():
        if name in SHAPE_SETS:
            rows.append([f"{name} ({value['num_images']} prompts)", percent(value["all"]), *"----"])
        else:
            real = value["real"]
            rows.append([f"{name} ({value['num_images']} images)", percent(value["class_agreement"]),
                         percent(real["class_agreement"]), number(value["frechet_distance"]),
                         number(real["frechet_distance"]), number(value["diversity_ratio"])])
    header = ["prompts", "adherence", "real images", "Fréchet distance", "real", "diversity ratio"]
    parts = [title, "", format_table(header, rows)]
    shapes = {name: value for name, value in results.items() if name in SHAPE_SETS}
    if shapes:
        names = ["color", "shape", "size", "position", "relation", "count", "all"]
        checks = [[name, *(percent(value[key]) for key in names)] for name, value in shapes.items()]
        parts += ["", "shapes checks passed:", format_table(["prompts", *names], checks)]
    for name, value in results.items():
        if name not in SHAPE_SETS and "confusion_matrix" in value:
            classes = value["per_class_agreement"]
            worst = min(classes, key=classes.get)
            parts += ["", f"{name}: worst class {worst} ({percent(classes[worst])}); most frequent "
                          f"confusions (asked -> classified): {_top_confusions(value, list(classes))}"]
    parts += ["", "Adherence: images the project's classifier assigns to the prompt's class (real images: "
                  "test images at the model's size, judged alike); shapes: prompts with every stated colour, "
                  "shape, size, position and relation found. Diversity ratio: mean pairwise feature distance "
                  "within a class over the real data's."]
    return "\n".join(parts)


def format_text_to_image_sweep(sweep: dict) -> str:
    """Adherence per prompt set for each sampler x step count."""
    runs = sweep["runs"]
    names = list(runs[0]["results"])
    rows = [[run["settings"]["sampler"], str(run["settings"]["num_steps"]),
             *map(percent, headline(run).values())] for run in runs]
    s = runs[0]["settings"]
    return "\n".join([f"text-to-image adherence, guidance {s['guidance_scale']:g}, seed {s['seed']}", "",
                      format_table(["sampler", "steps", *names], rows)])
