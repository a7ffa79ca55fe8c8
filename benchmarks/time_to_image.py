"""Time to a 512² image on this CPU: nanodiffusion against diffusers, same weights and recipe (issue 15).

Random weights built from the real configs (seeded, as sd15_speed.py does) are written once as diffusers
folders, with a random TAESD (AutoencoderTiny) folder. Each recipe then runs in a fresh process per
implementation, so that each peak RSS is that run's alone:

    a  SD v1.5 config, LCM, 4 steps, guidance 1 (no CFG batch); decoded by the full VAE and by TAESD
    b  SD 2.1 config (SD-Turbo's, trailing timesteps), 1 Euler step, guidance 0; decoded by TAESD
    c  SD v1.5 config, 20 steps DPM++ 2M, CFG 7; decoded by the full VAE (the classic recipe)

Implementations: ours (bf16 weights, channels_last, on a CPU with native bf16, else fp32; --ours-dtype),
diffusers fp32, and diffusers fp32 weights under torch.autocast('cpu', torch.bfloat16). After one warm-up
generation at 64² (one-time kernel set-up), the timed stages run back to back: prompt -> latents (text
encoder and sampler), then per decoder: decode -> uint8 -> PNG file. Time to image = their sum; loading the
weights is shown apart. Images are checked against diffusers fp32: fp32 within 1e-4 (max abs, [0, 1] scale),
bf16 by PSNR >= 35 dB.

    OMP_NUM_THREADS=2 python benchmarks/time_to_image.py --work /tmp/tti --recipes b,a
    python benchmarks/time_to_image.py --quick            # tiny networks, in one process (CI, seconds)
"""

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sd15_speed import IMAGE_TOLERANCE_DB, PROMPT, peak_child, psnr  # noqa: E402
from sd15_weights import memory, reset_peak, work_folder  # noqa: E402

from nanodiffusion.commands.generate import cpu_has_native_bf16  # noqa: E402

FP32_TOLERANCE = 1e-4
IMPLEMENTATIONS = ("ours", "ref-fp32", "ref-bf16")
# SD-Turbo's scheduler/scheduler_config.json (stabilityai/sd-turbo): Euler on trailing timesteps.
TURBO_SCHEDULER = {"_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                   "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
                   "prediction_type": "epsilon", "steps_offset": 1, "timestep_spacing": "trailing",
                   "interpolation_type": "linear",
                   "use_karras_sigmas": False, "trained_betas": None}


@dataclass(frozen=True)
class Recipe:
    model: str                          # "sd15" or "sd21": a folder of the work folder
    sampler: str                        # ours (diffusers' scheduler class in SCHEDULERS)
    steps: int
    guidance: float
    decoders: tuple[str, ...]           # "vae" (the model's) and/or "taesd"


RECIPES = {"a": Recipe("sd15", "lcm", 4, 1.0, ("vae", "taesd")),
           "b": Recipe("sd21", "euler", 1, 0.0, ("taesd",)),
           "c": Recipe("sd15", "dpmpp_2m", 20, 7.0, ("vae",))}
SCHEDULERS = {"lcm": "LCMScheduler", "euler": "EulerDiscreteScheduler",
              "dpmpp_2m": "DPMSolverMultistepScheduler"}
SIZES = {False: 512, True: 32}          # image side, full and --quick
QUICK_STEPS = 2                         # --quick runs at most this many steps


def num_steps(recipe: Recipe, quick: bool) -> int:
    return min(recipe.steps, QUICK_STEPS) if quick else recipe.steps


# ---------------------------------------------------------------------------------------------- weights


def make_weights(work: Path, quick: bool) -> dict:
    """work/sd15, work/sd21 (diffusers folders of random networks) and work/taesd; the real configs, or the
    tests' tiny ones with `quick` (whose VAE is 2x, so their TAESD is too)."""
    from nanodiffusion.nets import clip_text, sd_unet, taesd, vae
    from nanodiffusion.nets.clip_text import CLIPTextModel
    from nanodiffusion.nets.sd_unet import SDUNet
    from nanodiffusion.nets.taesd import AutoencoderTiny
    from nanodiffusion.nets.vae import AutoencoderKL
    from nanodiffusion.tokenizer import CLIPTokenizer
    from nanodiffusion.weights import SDComponents, save_diffusers
    from nanodiffusion.weights.components import SD15_SCHEDULER
    from nanodiffusion.weights.safe_load import write_safetensors
    tiny = {"sd15": (sd_unet.TINY_UNET, clip_text.TINY_TEXT),
            "sd21": (sd_unet.TINY_SD2_UNET, clip_text.TINY_SD2_TEXT)}
    real = {"sd15": (sd_unet.SD15_UNET, clip_text.SD15_TEXT), "sd21": (sd_unet.SD2_UNET, clip_text.SD2_TEXT)}
    start, sizes = time.perf_counter(), {}
    for seed, (name, (unet, text)) in enumerate((tiny if quick else real).items()):
        torch.manual_seed(seed)
        tokenizer = CLIPTokenizer.clip(pad_token="!") if name == "sd21" else CLIPTokenizer.clip()
        autoencoder = AutoencoderKL(vae.TINY_VAE if quick else vae.SD15_VAE).eval()
        components = SDComponents(SDUNet(unet).eval(), autoencoder, CLIPTextModel(text).eval(), tokenizer,
                                  TURBO_SCHEDULER if name == "sd21" else SD15_SCHEDULER)
        save_diffusers(components, work / name)
        sizes[name] = {part: sum(p.numel() for p in network.parameters()) * 2 / 2**30
                       for part, network in components.networks().items()}           # GiB in bf16
        del components
    config = taesd.TAESD if not quick else taesd.AutoencoderTinyConfig(encoder_blocks=(1, 1),
                                                                       decoder_blocks=(1, 1))
    folder = work / "taesd"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config.to_diffusers_config()))
    write_safetensors(AutoencoderTiny(config).state_dict(), folder / "diffusion_pytorch_model.safetensors",
                      metadata={"format": "pt"})
    (work / "sizes.json").write_text(json.dumps(sizes))
    return {"make_s": time.perf_counter() - start}


# ---------------------------------------------------------------------------------------------- runners


class Ours:
    """nanodiffusion's TextToImage, and a second one sharing its networks with TAESD as its VAE."""

    def __init__(self, work: Path, recipe: Recipe, dtype: str):
        from nanodiffusion.pipelines.text_to_image import TextToImage
        from nanodiffusion.weights import load_vae
        self.pipe = TextToImage.from_pretrained(work / recipe.model, dtype=dtype)
        self.pipe.show_progress = False
        pipe = self.pipe
        self.decoders = {"vae": pipe}
        if "taesd" in recipe.decoders:
            taesd = load_vae(work / "taesd", dtype=dtype, memory_format=torch.channels_last
                             if dtype == "bf16" else torch.preserve_format)
            self.decoders["taesd"] = TextToImage(pipe.unet, taesd, pipe.text_encoder, pipe.tokenizer,
                                                 pipe.scheduler_config)
        self.recipe = recipe

    def latents(self, side: int, steps: int) -> torch.Tensor:
        r = self.recipe
        return self.pipe(PROMPT, num_steps=steps, guidance_scale=r.guidance, sampler=r.sampler, seed=0,
                         height=side, width=side, output_type="latent").images

    def decode(self, decoder: str, latents: torch.Tensor) -> torch.Tensor:
        return self.decoders[decoder].decode_latents(latents)


class Reference:
    """diffusers' StableDiffusionPipeline with the recipe's scheduler, optionally under bf16 autocast."""

    def __init__(self, work: Path, recipe: Recipe, autocast: bool):
        import diffusers
        self.pipe = diffusers.StableDiffusionPipeline.from_pretrained(
            work / recipe.model, safety_checker=None, requires_safety_checker=False)
        scheduler = getattr(diffusers, SCHEDULERS[recipe.sampler])
        self.pipe.scheduler = scheduler.from_config(self.pipe.scheduler.config)
        self.pipe.set_progress_bar_config(disable=True)
        self.vaes = {"vae": self.pipe.vae}
        if "taesd" in recipe.decoders:
            self.vaes["taesd"] = diffusers.AutoencoderTiny.from_pretrained(work / "taesd").eval()
        self.recipe, self.autocast = recipe, autocast

    def latents(self, side: int, steps: int) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            return self.pipe(PROMPT, num_inference_steps=steps, guidance_scale=self.recipe.guidance,
                             height=side, width=side, generator=torch.Generator().manual_seed(0),
                             output_type="latent").images

    def decode(self, decoder: str, latents: torch.Tensor) -> torch.Tensor:
        vae = self.vaes[decoder]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            return vae.decode(latents / vae.config.scaling_factor).sample.float()


def write_png(images: torch.Tensor, path: Path) -> np.ndarray:
    """Save the first image (in [-1, 1]) as a PNG, as both pipelines do; return it as floats in [0, 1]."""
    floats = (images[0] / 2 + 0.5).clamp(0, 1).permute(1, 2, 0).cpu().numpy()       # (H, W, 3)
    Image.fromarray((floats * 255).round().astype(np.uint8)).save(path)
    return floats


def child(work: Path, recipe_name: str, implementation: str, quick: bool, ours_dtype: str) -> dict:
    """Load `implementation` in this process, warm it up, then time each stage of `recipe_name`."""
    recipe, side = RECIPES[recipe_name], SIZES[quick]
    reset_peak()
    start = time.perf_counter()
    runner = (Ours(work, recipe, ours_dtype) if implementation == "ours"
              else Reference(work, recipe, implementation == "ref-bf16"))
    result = {"load_s": time.perf_counter() - start}
    with torch.no_grad():
        warm = runner.latents(side=min(side, 64), steps=1)               # kernels' one-time set-up
        for decoder in recipe.decoders:
            runner.decode(decoder, warm)
        start = time.perf_counter()
        latents = runner.latents(side=side, steps=num_steps(recipe, quick))
        result["latents_s"] = time.perf_counter() - start
        for decoder in recipe.decoders:
            start = time.perf_counter()
            image = write_png(runner.decode(decoder, latents), work / f"{recipe_name}-{implementation}.png")
            result[f"{decoder}_s"] = time.perf_counter() - start
            np.save(work / f"image-{recipe_name}-{implementation}-{decoder}.npy", image)
    result["peak_gib"] = memory()["VmHWM"]
    return result


# ---------------------------------------------------------------------------------------------- parent


def cpu_model() -> str:
    """The CPU's model name and its bf16-relevant flags, from /proc/cpuinfo."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU"
    names = (line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name"))
    name = next(names, "unknown CPU")
    flags = sorted({flag for flag in ("avx512f", "avx512_bf16", "amx_bf16") if f" {flag}" in text})
    return f"{name} ({os.cpu_count()} cores visible; {', '.join(flags) or 'no AVX-512/bf16/AMX'})"


def _run(args, recipe: str, implementation: str) -> dict:
    if args.quick:                                  # one process: seconds, but the peak RSS is shared
        return child(args.work, recipe, implementation, True, args.ours_dtype)
    command = [sys.executable, __file__, "--work", str(args.work), "--ours-dtype", args.ours_dtype,
               "--child", f"{recipe}:{implementation}"]
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode:
        sys.exit(f"{recipe} {implementation} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def agreement(work: Path, recipe: str, implementation: str, decoder: str, exact: bool) -> tuple[str, bool]:
    """Against diffusers fp32: max abs difference (fp32) or PSNR (bf16)."""
    image, reference = (np.load(work / f"image-{recipe}-{name}-{decoder}.npy")
                        for name in (implementation, "ref-fp32"))
    if exact:
        difference = float(np.abs(image - reference).max())
        return f"max|diff| {difference:.1e}", difference <= FP32_TOLERANCE
    db = psnr(torch.from_numpy(image), torch.from_numpy(reference), signed=False)
    return f"PSNR {db:.1f} dB", db >= IMAGE_TOLERANCE_DB


def report(args) -> None:
    side = SIZES[args.quick]
    print(f"{time.strftime('%Y-%m-%d %H:%M %Z')}: {cpu_model()}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}; "
          f"{'tiny networks' if args.quick else 'SD v1.5 / SD 2.1 configs'}, {side}² images; "
          f"ours in {args.ours_dtype}")
    if not (args.work / "sizes.json").is_file():
        made = make_weights(args.work, args.quick)
        print(f"built and wrote the random weights in {made['make_s']:.0f} s")
    # bf16 without hardware support is emulated, minutes for the full-size probe: only measured where native
    native = args.quick or cpu_has_native_bf16()
    peak = peak_child(args.quick, (torch.bfloat16, torch.float32) if native else (torch.float32,))
    print("measured peak GFLOP/s: " + ", ".join(f"{name} {rate:.0f}" for name, rate in peak.items())
          + ("" if native else " (bf16 not native here: not measured)"))
    sizes = json.loads((args.work / "sizes.json").read_text())
    ok = True
    for name in args.recipes:
        recipe = RECIPES[name]
        results = {}
        for implementation in args.implementations:
            results[implementation] = _run(args, name, implementation)
            figures = ", ".join(f"{key} {value:.2f}" for key, value in results[implementation].items())
            print(f"  {name} {implementation}: done ({figures})", flush=True)
        ok &= _print_recipe(args, name, recipe, results, sum(sizes[recipe.model].values()))
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    if not ok:
        sys.exit("some images disagree beyond the stated tolerances")


def _print_recipe(args, name: str, recipe: Recipe, results: dict, bf16_gib: float) -> bool:
    guidance = "no CFG" if recipe.guidance <= 1 else f"CFG {recipe.guidance:g}"
    print(f"\nrecipe {name}: {recipe.model}, {recipe.sampler}, {num_steps(recipe, args.quick)} step(s), "
          f"{guidance}, {SIZES[args.quick]}²")
    runs = list(results)                            # "ours" first, then the references run
    print(f"{'':<28}" + "".join(f"{impl:>11}" for impl in runs)
          + "".join(f"{'ours/' + ref.removeprefix('ref-'):>11}" for ref in runs[1:]))

    def row(label: str, values: list[float]) -> None:
        cells = "".join(f"{value:11.2f}" for value in values)
        print(f"{label:<28}{cells}" + "".join(f"{values[0] / value:11.2f}" for value in values[1:]))

    row("load, s", [results[i]["load_s"] for i in runs])
    row("prompt -> latents, s", [results[i]["latents_s"] for i in runs])
    for decoder in recipe.decoders:
        row(f"decode ({decoder}) -> PNG, s", [results[i][f"{decoder}_s"] for i in runs])
        row(f"TIME TO IMAGE ({decoder}), s",
            [results[i]["latents_s"] + results[i][f"{decoder}_s"] for i in runs])
    peak = [results[i]["peak_gib"] for i in runs]
    target = bf16_gib + 1
    print(f"{'peak RSS, GiB':<28}" + "".join(f"{value:11.2f}" for value in peak)
          + f"  target: ours <= bf16 weights + 1 GiB = {target:.2f}: "
          + ("met" if peak[0] <= target else "NOT met")
          + (" (--quick: one process for all)" if args.quick else ""))
    ok = True
    for implementation in [i for i in ("ours", "ref-bf16") if i in results]:
        for decoder in recipe.decoders:
            exact = implementation == "ours" and args.ours_dtype == "fp32"
            text, passed = agreement(args.work, name, implementation, decoder, exact)
            ok &= passed or implementation != "ours"                # diffusers' own autocast is only shown
            print(f"  {implementation} ({decoder}) against ref-fp32: {text}"
                  f"{'' if passed or implementation != 'ours' else ' (FAILS)'}")
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help=f"tiny networks at 32², <= {QUICK_STEPS} steps, in one process (CI)")
    parser.add_argument("--recipes", default="a,b,c", help="comma-separated recipes to run (default: a,b,c)")
    parser.add_argument("--ours-dtype", choices=("fp32", "bf16"), default=None,
                        help="our weights' dtype (default: bf16 on a CPU with native bf16, else fp32)")
    parser.add_argument("--work", type=Path, help="folder for the weights (kept and reused; default: a "
                                                  "temporary one, removed after)")
    parser.add_argument("--skip-autocast", action="store_true",
                        help="leave out diffusers under bf16 autocast (minutes where bf16 is emulated)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.implementations = IMPLEMENTATIONS[:2] if args.skip_autocast else IMPLEMENTATIONS
    args.ours_dtype = args.ours_dtype or ("bf16" if cpu_has_native_bf16() else "fp32")
    args.recipes = args.recipes.split(",")
    if any(name not in RECIPES for name in args.recipes):
        parser.error(f"--recipes takes names among {', '.join(RECIPES)}, got {','.join(args.recipes)}")
    if args.child:
        recipe, implementation = args.child.split(":")
        print(json.dumps(child(args.work, recipe, implementation, False, args.ours_dtype)))
        return
    import diffusers
    import transformers
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    with work_folder(args.work, "time_to_image_") as args.work:
        report(args)


if __name__ == "__main__":
    main()
