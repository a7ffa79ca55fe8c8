"""Evaluate a DDPM model with the data set's shipped classifier: class agreement, Fréchet distance on the
classifier's features to the test split, and diversity; or, with --sweep, a sampler x steps table.
"""

import argparse
import json

from nanodiffusion.atomic import atomic_write
from nanodiffusion.diffusion.samplers import SAMPLERS
from nanodiffusion.errors import UserError
from nanodiffusion.evaluation.classifier import BUILTIN_CLASSIFIERS, builtin_classifier_path
from nanodiffusion.evaluation.evaluate import SWEEP_SAMPLERS, SWEEP_STEPS, evaluate_ddpm, sweep_ddpm
from nanodiffusion.evaluation.report import format_evaluation, format_sweep
from nanodiffusion.pipelines.ddpm import BUILTIN_MODELS, DDPMPipeline

HELP = "measure a DDPM model: class agreement, Fréchet distance, diversity (or a sampler x steps sweep)"
DEFAULT_SAMPLER, DEFAULT_STEPS = "dpmpp_2m", 50
DEFAULT_IMAGES, DEFAULT_SWEEP_IMAGES = 1000, 200


def add_arguments(p) -> None:
    # -n, --sampler and --steps have defaults that depend on --sweep: SUPPRESS keeps argparse from printing
    # "(default: None)" after the help that states them; `run` reads them with vars(args).get
    depends = argparse.SUPPRESS
    p.add_argument("model", nargs="?", default="fashion-mnist",
                   help=f"checkpoint file, or a built-in model: {', '.join(BUILTIN_MODELS)}")
    p.add_argument("--dataset", default="fashion-mnist",
                   help=f"the data set the model was trained on; one of {', '.join(BUILTIN_CLASSIFIERS)}")
    p.add_argument("--data-dir", help="folder holding the dataset files")
    p.add_argument("-n", "--num-images", type=int, default=depends,
                   help=f"images to generate (default {DEFAULT_IMAGES}; with --sweep, "
                        f"{DEFAULT_SWEEP_IMAGES} per sampler and step count)")
    p.add_argument("--sampler", nargs="+", choices=list(SAMPLERS), default=depends, metavar="NAME",
                   help=f"sampler: {', '.join(SAMPLERS)} (default {DEFAULT_SAMPLER}); with --sweep, several "
                        f"(default {' '.join(SWEEP_SAMPLERS)})")
    p.add_argument("--steps", nargs="+", type=int, default=depends, metavar="N",
                   help=f"sampling steps (default {DEFAULT_STEPS}); with --sweep, several "
                        f"(default {' '.join(map(str, SWEEP_STEPS))})")
    p.add_argument("--guidance", type=float, default=2.0,
                   help="classifier-free guidance scale for class-conditional models (1 = none)")
    p.add_argument("--seed", type=int, default=0, help="random seed: the same seed gives the same images")
    p.add_argument("--sweep", action="store_true", help="tabulate every sampler x step count")
    p.add_argument("--batch-size", type=int, default=250, help="images sampled at a time")
    p.add_argument("--json", help="also write the full results (confusion matrix included) to this JSON file")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA ones")


def run(args) -> None:
    given = vars(args)
    samplers, step_counts, num_images = given.get("sampler"), given.get("steps"), given.get("num_images")
    if not args.sweep and max(len(samplers or ()), len(step_counts or ())) > 1:
        raise UserError("several samplers or step counts need --sweep")
    builtin_classifier_path(args.dataset)           # an unknown data set fails before the model loads
    pipe = DDPMPipeline.from_pretrained(args.model, use_ema=not args.no_ema)
    options = {"guidance_scale": args.guidance, "seed": args.seed, "data_dir": args.data_dir,
               "batch_size": args.batch_size}
    if args.sweep:
        result = sweep_ddpm(pipe, args.dataset, num_images or DEFAULT_SWEEP_IMAGES,
                            samplers=tuple(samplers or SWEEP_SAMPLERS),
                            step_counts=tuple(step_counts or SWEEP_STEPS), **options)
        print(format_sweep(result))
    else:
        result = evaluate_ddpm(pipe, args.dataset, num_images or DEFAULT_IMAGES,
                               sampler=(samplers or [DEFAULT_SAMPLER])[0],
                               num_steps=(step_counts or [DEFAULT_STEPS])[0], **options)
        print(format_evaluation(result))
    if args.json:
        with atomic_write(args.json) as file:
            file.write(json.dumps(result | {"model": str(args.model)}, indent=1).encode())
        print(f"wrote {args.json}")
