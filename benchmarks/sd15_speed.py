"""SD v1.5 inference speed and memory on this CPU: nanodiffusion's fast path against diffusers (issue 6).

Builds the full SD v1.5 configuration with seeded random weights (sd15_weights.py's builder), writes it as a
diffusers folder and as a bf16 single file, then runs every configuration on the same weights and inputs, one
fresh process per (configuration, measurement) so that each peak RSS is that measurement's alone:

    UNet      one classifier-free-guidance step: the UNet on a batch of 2, at 256² and 512² images
    VAE       decoding one 512² image
    text      the CLIP text encoder on 2 x 77 tokens (prompt and negative prompt)
    pipeline  text-to-image, 20 Euler steps at 256², guidance 7.5, from loading the weights to the image

Times are the best of the repeats after one warm-up call (for torch.compile the warm-up is the compile, shown
apart). GFLOP/s divide the FLOPs of diffusers' formulation (counted once with FlopCounterMode) by the time,
so a reformulation that saves FLOPs shows up as speed; "of peak" compares that to the best bf16 matmul or
3x3 conv rate measured here. Outputs are checked against diffusers fp32: the fp32 path within 1e-4 (max abs),
bf16 paths by the PSNR of the images (decoded or generated, [0, 1] range) >= 35 dB; eps and text states of
bf16 paths are shown as max-abs error relative to the largest reference value.

    python benchmarks/sd15_speed.py --work /tmp/sd15-speed    # full size; reuses the weights in --work
    python benchmarks/sd15_speed.py --quick                   # tiny networks, under a minute (CI)
"""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sd15_weights import make, memory, reset_peak, work_folder  # noqa: E402  (the shared SD v1.5 builder)

CONFIGS = {
    "ref-fp32": "diffusers, fp32 (its defaults)",
    "ref-bf16": "diffusers, fp32 weights under torch.autocast('cpu', torch.bfloat16)",
    "ours-fp32": "nanodiffusion, fp32",
    "ours-bf16": "nanodiffusion, bf16 weights (bf16 file), channels_last",
    "ours-compiled": "ours-bf16 + TextToImage.compile() (torch.compile, opt-in)",
}
IMAGE_TOLERANCE_DB = 35.0               # bf16 images vs diffusers fp32
FP32_TOLERANCE = 1e-4                   # max abs difference of the fp32 path to diffusers fp32
PROMPT = "a photograph of an astronaut riding a horse"


@dataclass(frozen=True)
class Sizes:
    """Latent sides of each measurement; image sides are `factor` times larger."""

    unet: tuple[int, ...]
    vae: int
    pipeline: int
    steps: int
    factor: int
    tiled: int | None                   # latent side of the extra tiled-decode measurement (ours only)


FULL = Sizes(unet=(32, 64), vae=64, pipeline=32, steps=20, factor=8, tiled=128)
QUICK = Sizes(unet=(8, 16), vae=16, pipeline=16, steps=4, factor=2, tiled=None)


def measurements(sizes: Sizes) -> dict[str, str]:
    """{name: description} of every measurement."""
    names = {f"unet-{side}": f"UNet CFG step, {side * sizes.factor}² (batch 2)" for side in sizes.unet}
    names[f"vae-{sizes.vae}"] = f"VAE decode, {sizes.vae * sizes.factor}²"
    names["text"] = "text encoder, 2 x 77 tokens"
    names["pipeline"] = f"pipeline, {sizes.steps} steps at {sizes.pipeline * sizes.factor}²"
    return names


# ---------------------------------------------------------------------------------------------- children


def _inputs(name: str, sizes: Sizes, context_dim: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    side = int(name.split("-")[-1]) if name.startswith(("unet", "vae")) else 0
    ids = torch.randint(0, 49406, (2, 77), generator=generator)
    ids[:, 0], ids[0, 12:], ids[1, 1:] = 49406, 49407, 49407         # a 10-word prompt and an empty one
    return {"x": torch.randn(2, 4, side, side, generator=generator), "t": torch.tensor([500.0, 500.0]),
            "context": torch.randn(2, 77, context_dim, generator=generator),
            "z": torch.randn(1, 4, side, side, generator=generator), "ids": ids}


class Reference:
    """diffusers' StableDiffusionPipeline on the folder, optionally under bf16 autocast."""

    def __init__(self, work: Path, autocast: bool):
        import diffusers
        self.pipe = diffusers.StableDiffusionPipeline.from_pretrained(
            work / "folder", safety_checker=None, requires_safety_checker=False)
        self.pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(self.pipe.scheduler.config)
        self.pipe.set_progress_bar_config(disable=True)
        self.autocast = autocast

    def run(self, name: str, inputs: dict, sizes: Sizes, steps: int) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            if name.startswith("unet"):
                unet = self.pipe.unet
                return unet(inputs["x"], inputs["t"], encoder_hidden_states=inputs["context"]).sample
            if name.startswith("vae"):
                return self.pipe.vae.decode(inputs["z"]).sample
            if name == "text":
                return self.pipe.text_encoder(inputs["ids"])[0]
            side = sizes.pipeline * sizes.factor
            images = self.pipe(PROMPT, num_inference_steps=steps, height=side, width=side, guidance_scale=7.5,
                               generator=torch.Generator().manual_seed(0), output_type="np").images
            return torch.from_numpy(images)


class Ours:
    """nanodiffusion's TextToImage: fp32 from the folder, or bf16 from the bf16 file, channels_last."""

    def __init__(self, work: Path, config: str):
        from nanodiffusion.pipelines.text_to_image import TextToImage
        if config == "ours-fp32":
            self.pipe = TextToImage.from_pretrained(work / "folder")
        else:
            # the single file gets CLIP's tokenizer; channels_last is the default for bf16 on a CPU
            self.pipe = TextToImage.from_pretrained(work / "model-bf16.safetensors", dtype=torch.bfloat16)
            assert self.pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        if config == "ours-compiled":
            self.pipe.compile()
        self.pipe.show_progress = False
        self.dtype = self.pipe.dtype

    def run(self, name: str, inputs: dict, sizes: Sizes, steps: int) -> torch.Tensor:
        pipe = self.pipe
        if name.startswith("unet"):
            return pipe.unet(inputs["x"].to(self.dtype), inputs["t"], inputs["context"].to(self.dtype))
        if name.startswith("vae-tiled"):
            pipe.vae_tile_size = 64
            return pipe._decode(inputs["z"].to(self.dtype))
        if name.startswith("vae"):
            return pipe.vae.decode(inputs["z"].to(self.dtype))
        if name == "text":
            return pipe.text_encoder(inputs["ids"]).hidden_states
        side = sizes.pipeline * sizes.factor
        images = pipe(PROMPT, num_steps=steps, sampler="euler", guidance_scale=7.5, seed=0, height=side,
                      width=side, output_type="np").images
        return torch.from_numpy(images)


def child(config: str, names: list[str], work: Path, sizes: Sizes, repeats: int) -> dict:
    """Load `config` in this fresh process, run each measurement (warm-up, then `repeats` timed calls).

    Peak RSS is the process's (VmHWM), so it includes what each library's import costs. Private memory
    (RssAnon, after the measurement) leaves out the clean pages of memory-mapped weight files, which the
    kernel can drop and re-read under memory pressure.
    """
    reset_peak()
    start = time.perf_counter()
    runner = Reference(work, config == "ref-bf16") if config.startswith("ref") else Ours(work, config)
    results = {"load_s": time.perf_counter() - start}
    context_dim = json.loads((work / "folder" / "unet" / "config.json").read_text())["cross_attention_dim"]
    outputs = {}
    with torch.no_grad():
        for name in names:
            inputs = _inputs(name, sizes, context_dim)
            start = time.perf_counter()
            runner.run(name, inputs, sizes, steps=1)                       # warm-up (and compile)
            first = time.perf_counter() - start
            times = []
            for _ in range(1 if name == "pipeline" else repeats):
                start = time.perf_counter()
                output = runner.run(name, inputs, sizes, steps=sizes.steps)
                times.append(time.perf_counter() - start)
            outputs[name] = output.float()
            used = memory()
            results[name] = {"s": min(times), "first_s": first, "peak_gib": used["VmHWM"],
                             "private_gib": used["RssAnon"]}
    torch.save(outputs, work / f"outputs-{config}-{'+'.join(names)}.pt")
    return results


def peak_child(quick: bool, dtypes: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float32)) -> dict:
    """Best rates (GFLOP/s) of a square matmul and a 3x3 conv in each of `dtypes` on this machine."""
    n, channels, side = (512, 64, 16) if quick else (4096, 512, 64)
    rates = {}
    for dtype in dtypes:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        x = torch.randn(1, channels, side, side, dtype=dtype).contiguous(memory_format=torch.channels_last)
        w = torch.randn(channels, channels, 3, 3, dtype=dtype).contiguous(memory_format=torch.channels_last)
        conv_flops = 2 * 9 * channels**2 * side**2
        for op, call, flops in (("matmul", lambda: a @ b, 2 * n**3),
                                ("conv", lambda: torch.conv2d(x, w, padding=1), conv_flops)):
            call()
            best = math.inf
            for _ in range(3):
                start = time.perf_counter()
                call()
                best = min(best, time.perf_counter() - start)
            rates[f"{op}-{str(dtype)[6:]}"] = flops / best / 1e9
    return rates


def convert_child(work: Path) -> dict:
    """Write work/model-bf16.safetensors: the weights in bf16 (what `nanodiffusion convert --dtype bf16`
    writes), so the bf16 path maps 2 GB of weights instead of reading 4 GB of fp32 pages."""
    from nanodiffusion.weights import load_sd, save_single_file
    start = time.perf_counter()
    components = load_sd(work / "model.safetensors", dtype=torch.bfloat16)
    save_single_file(components, work / "model-bf16.safetensors")
    return {"convert_s": time.perf_counter() - start}


# ---------------------------------------------------------------------------------------------- parent


def count_flops(work: Path, sizes: Sizes) -> dict[str, float]:
    """FLOPs of each measurement in diffusers' formulation, counted on the meta device (no memory or time)."""
    import diffusers
    import transformers
    from torch.utils.flop_counter import FlopCounterMode

    def counted(call) -> float:
        with FlopCounterMode(display=False) as counter:
            call()
        return counter.get_total_flops()

    def read(part: str) -> dict:
        return json.loads((work / "folder" / part / "config.json").read_text())

    with torch.device("meta"), torch.no_grad():
        unet = diffusers.UNet2DConditionModel.from_config(read("unet"))
        vae = diffusers.AutoencoderKL.from_config(read("vae"))
        text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**read("text_encoder")))
        context = torch.randn(2, 77, unet.config.cross_attention_dim)

        def unet_flops(side: int) -> float:
            x = torch.randn(2, 4, side, side)
            return counted(lambda: unet(x, torch.tensor([1.0, 1.0]), encoder_hidden_states=context))

        def vae_flops(side: int) -> float:
            return counted(lambda: vae.decode(torch.randn(1, 4, side, side)))

        flops = {f"unet-{side}": unet_flops(side) for side in sizes.unet}
        flops[f"vae-{sizes.vae}"] = vae_flops(sizes.vae)
        flops["text"] = counted(lambda: text(torch.zeros(2, 77, dtype=torch.long)))
        flops["pipeline"] = (flops["text"] + sizes.steps * unet_flops(sizes.pipeline)
                             + vae_flops(sizes.pipeline))
    return flops


def _run(args, *extra) -> dict:
    command = [sys.executable, __file__, "--work", str(args.work), *(["--quick"] if args.quick else []),
               "--repeats", str(args.repeats), *extra]
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode:
        sys.exit(f"{' '.join(extra)} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _step(args, name: str) -> dict:
    """A preparation step: in a fresh process at full size (memory), in this one with --quick (time)."""
    if not args.quick:
        return _run(args, "--child", name)
    steps = {"make": lambda: make(args.work, tiny=True), "convert": lambda: convert_child(args.work),
             "peak": lambda: peak_child(quick=True)}
    return steps[name]()


def psnr(image: torch.Tensor, reference: torch.Tensor, *, signed: bool) -> float:
    """PSNR in dB on the [0, 1] scale; `signed` images are in [-1, 1] (decoded), others in [0, 1]."""
    if signed:
        image, reference = (image / 2 + 0.5).clamp(0, 1), (reference / 2 + 0.5).clamp(0, 1)
    mse = (image - reference).square().mean().item()
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def agreement(name: str, output: torch.Tensor, reference: torch.Tensor, exact: bool) -> tuple[str, bool]:
    """(text, ok): max-abs difference for the fp32 path, PSNR (images) or relative error (tensors) else."""
    difference = (output - reference).abs().max().item()
    if exact:
        return f"max|diff| {difference:.1e}", difference <= FP32_TOLERANCE
    if name.startswith(("vae", "pipeline")):
        db = psnr(output, reference, signed=name.startswith("vae"))
        return f"PSNR {db:.1f} dB", db >= IMAGE_TOLERANCE_DB
    return f"max|diff|/max|ref| {difference / reference.abs().max().item():.1e}", True


def _outputs(work: Path) -> dict[str, dict[str, torch.Tensor]]:
    found = {}
    for path in work.glob("outputs-*.pt"):
        config = next(c for c in CONFIGS if path.name.startswith(f"outputs-{c}-"))
        found.setdefault(config, {}).update(torch.load(path))
    return found


def prepare(args) -> None:
    """Build the networks, the folder and the bf16 file unless --work holds them from an earlier run."""
    if (args.work / "model-bf16.safetensors").is_file():
        print(f"reusing the weights in {args.work}")
        return
    made = _step(args, "make")
    converted = _step(args, "convert")
    print(f"built the networks in {made['build_s']:.0f} s, wrote the folder in {made['save_folder_s']:.0f} s "
          f"and the files in {made['save_single_s']:.0f} + {converted['convert_s']:.0f} s (bf16)")


def report(args) -> None:
    sizes = QUICK if args.quick else FULL
    configs = [c for c in CONFIGS if c != "ours-compiled" or args.compile]
    print(f"{time.strftime('%Y-%m-%d %H:%M %Z')}: torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads, load average {os.getloadavg()[0]:.2f} at the start, "
          f"{'tiny networks' if args.quick else 'SD v1.5'}")
    prepare(args)
    for path in args.work.glob("outputs-*.pt"):
        path.unlink()
    # torch.compile's cache starts empty, so the first compiled measurement shows a cold compile
    shutil.rmtree(args.work / "inductor-cache", ignore_errors=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(args.work / "inductor-cache")
    peak_rates = _step(args, "peak")
    peak = max(rate for name, rate in peak_rates.items() if name.endswith("bfloat16"))
    print("measured peak GFLOP/s: " + ", ".join(f"{name} {rate:.0f}" for name, rate in peak_rates.items()))
    flops = count_flops(args.work, sizes)
    names = measurements(sizes)
    results = {config: {} for config in configs}
    for config in configs:
        todo = list(names)
        if config == "ours-compiled":               # compiling is minutes per network and size: no pipeline
            todo = [name for name in names if name.startswith(("unet", "vae"))]
        if config == "ours-bf16" and sizes.tiled:
            todo += [f"vae-{sizes.tiled}", f"vae-tiled-{sizes.tiled}"]
        for group in [todo] if args.quick else [[name] for name in todo]:
            results[config].update(_run(args, "--child", config, "--names", ",".join(group)))
        print(f"  {config}: done (load {results[config]['load_s']:.1f} s)", flush=True)
    _print_tables(results, names, flops, peak)
    ok = _print_agreement(_outputs(args.work), names)
    _print_extras(results, sizes)
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    if not ok:
        sys.exit("some outputs disagree beyond the stated tolerances")


TARGETS = {("unet", "ref-fp32"): 0.2, ("unet", "ref-bf16"): 0.5, ("vae", "ref-fp32"): 0.25}
RSS_TARGET = 0.5                        # pipeline peak RSS, ours / diffusers fp32


def _ratio(results: dict, ours: str, reference: str, name: str, key: str, target: float | None) -> str:
    if name not in results[ours]:
        return "-"
    value = results[ours][name][key] / results[reference][name][key]
    if target is None:
        return f"{value:.2f}"
    return f"{value:.2f} [<={target:g} {'met' if value <= target else 'NOT met'}]"


def _print_tables(results: dict, names: dict, flops: dict, peak: float) -> None:
    ours = [c for c in results if c.startswith("ours") and c != "ours-fp32"]
    quotients = [(o, r) for o in ours for r in ("ref-fp32", "ref-bf16")]
    columns = "".join(f"{config:>14}" for config in results)
    columns += "".join(f"{o + '/' + r:>28}" for o, r in quotients)
    for title, key, targets in (("time, s (best of the repeats)", "s", TARGETS),
                                ("peak RSS of the process, GiB", "peak_gib", {}),
                                ("private (anonymous) memory after, GiB", "private_gib", {})):
        print(f"\n{title:<36}{columns}")
        for name, what in names.items():
            row = "".join(f"{results[c][name][key]:14.3g}" if name in results[c] else f"{'-':>14}"
                          for c in results)
            for o, r in quotients:
                target = targets.get((name.split("-")[0], r))
                if key == "peak_gib" and name == "pipeline" and r == "ref-fp32":
                    target = RSS_TARGET
                row += f"{_ratio(results, o, r, name, key, target):>28}"
            print(f"{what:<36}{row}")
    print(f"\nachieved GFLOP/s (diffusers' FLOPs / time) and % of the bf16 peak ({peak:.0f} GFLOP/s)")
    print(f"{'':<36}{'GFLOP':>10}" + "".join(f"{config:>14}" for config in results))
    for name, what in names.items():
        cells = ""
        for config in results:
            if name not in results[config]:
                cells += f"{'-':>14}"
                continue
            rate = flops[name] / results[config][name]["s"] / 1e9
            cells += f"{rate:9.0f} {100 * rate / peak:3.0f}%"
        print(f"{what:<36}{flops[name] / 1e9:10.1f}{cells}")


def _print_agreement(outputs: dict, names: dict) -> bool:
    print(f"\noutputs against ref-fp32 (fp32: max|diff| <= {FP32_TOLERANCE:g}; "
          f"bf16 images: PSNR >= {IMAGE_TOLERANCE_DB:g} dB)")
    reference, ok = outputs["ref-fp32"], True
    for config in [c for c in outputs if c != "ref-fp32"]:
        cells = []
        for name in [name for name in names if name in outputs[config]]:
            exact = config == "ours-fp32"
            text, passed = agreement(name, outputs[config][name], reference[name], exact=exact)
            ok &= passed or config.startswith("ref")         # the reference's own autocast is only shown
            cells.append(f"{name} {text}{'' if passed else ' (FAILS)'}")
        print(f"  {config:<14} " + " | ".join(cells))
    return ok


def _print_extras(results: dict, sizes: Sizes) -> None:
    if "ours-compiled" in results:
        compiled = results["ours-compiled"]
        print("\ntorch.compile, first call (compiles; the cache starts empty at the first measurement) / "
              "later calls: " + ", ".join(f"{name} {r['first_s']:.0f} s / {r['s']:.2f} s"
                                    for name, r in compiled.items() if name != "load_s"))
    if sizes.tiled:
        plain, tiled = (results["ours-bf16"][f"vae-{kind}{sizes.tiled}"] for kind in ("", "tiled-"))
        side = sizes.tiled * sizes.factor
        print(f"\nours-bf16 VAE decode {side}²: whole {plain['s']:.1f} s, "
              f"peak RSS {plain['peak_gib']:.2f} GiB; "
              f"tiled (64-latent tiles) {tiled['s']:.1f} s, peak RSS {tiled['peak_gib']:.2f} GiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny networks and sizes (CI, under a minute)")
    parser.add_argument("--compile", action="store_true", help="also time ours-bf16 under torch.compile")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per measurement (best is shown)")
    parser.add_argument("--work", type=Path, help="folder for the weights (kept and reused; default: a "
                                                  "temporary one, removed after)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--names", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    if args.child:
        steps = {"make": lambda: make(args.work, tiny=args.quick),
                 "convert": lambda: convert_child(args.work), "peak": lambda: peak_child(args.quick)}
        result = (steps[args.child]() if args.child in steps
                  else child(args.child, args.names.split(","), args.work, sizes, args.repeats))
        print(json.dumps(result))
        return
    with work_folder(args.work, "sd15_speed_") as args.work:
        report(args)


if __name__ == "__main__":
    main()
