"""Speed of the built-in text-to-image model (issue 5: 4 images in <= 2 s with the default sampler and steps),
side by side with diffusers' StableDiffusionPipeline running the same weights and scheduler.

Measured, each the best of --repeats after a warm-up call, 4 prompts in one call:
    ours        TextToImage.from_pretrained("builtin")(prompts) with every default (sampler, steps, guidance)
    ours-bf16   the same with dtype=torch.bfloat16
    diffusers   StableDiffusionPipeline.from_pretrained(the same folder) with DPMSolverMultistepScheduler (our
                default sampler's counterpart), the same steps and guidance
    cli         `nanodiffusion generate PROMPT -n 4` in a fresh process (imports, loading and PNGs included;
                the CLI draws the images one call each, so that each PNG replays alone)

    python benchmarks/builtin_t2i_speed.py [--threads 2] [--repeats 5]
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PROMPTS = ["a photo of a sneaker", "the handwritten digit 7", "a small red circle in the top left",
           "a blue square left of a green triangle"]


def best_time(call, repeats: int) -> float:
    call()                                                             # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-diffusers", action="store_true", help="skip the reference")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from nanodiffusion.pipelines.request import GenerationRequest, read_generation_defaults
    from nanodiffusion.pipelines.text_to_image import TextToImage
    from nanodiffusion.weights.models import BUILTIN_TEXT_TO_IMAGE
    folder = BUILTIN_TEXT_TO_IMAGE["builtin"]
    defaults = GenerationRequest(PROMPTS, **read_generation_defaults(folder))   # what generate uses for it
    print(f"{time.strftime('%Y-%m-%d')}: torch {torch.__version__}, {args.threads} threads; built-in model, "
          f"4 prompts, its defaults: sampler {defaults.sampler}, {defaults.num_steps} steps, guidance "
          f"{defaults.guidance_scale:g} (diffusers: DPMSolverMultistepScheduler, the same steps and guidance)")
    rows = []
    for name, dtype in (("ours", torch.float32), ("ours-bf16", torch.bfloat16)):
        pipe = TextToImage.from_pretrained(folder, dtype=dtype)
        pipe.show_progress = False
        seconds = best_time(lambda: pipe(PROMPTS, seed=0), args.repeats)
        rows.append((name, seconds))
    if not args.no_diffusers:
        import diffusers
        reference = diffusers.StableDiffusionPipeline.from_pretrained(
            folder, torch_dtype=torch.float32, safety_checker=None, requires_safety_checker=False)
        reference.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(reference.scheduler.config)
        reference.set_progress_bar_config(disable=True)
        seconds = best_time(lambda: reference(PROMPTS, num_inference_steps=defaults.num_steps,
                                              guidance_scale=defaults.guidance_scale,
                                              generator=torch.Generator().manual_seed(0)), args.repeats)
        rows.append(("diffusers", seconds))
    with tempfile.TemporaryDirectory() as work:
        command = [sys.executable, "-m", "nanodiffusion", "generate", PROMPTS[0], "-n", "4", "--seed", "0",
                   "--out-dir", str(Path(work) / "out")]
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        rows.append(("cli (fresh process)", time.perf_counter() - start))
    reference_time = dict(rows).get("diffusers")
    print(f"\n{'':<22}{'4 images, s':>12}{'per image, s':>14}{'ours / diffusers':>18}")
    for name, seconds in rows:
        ratio = f"{seconds / reference_time:.2f}" if reference_time and name != "cli (fresh process)" else "-"
        print(f"{name:<22}{seconds:12.3f}{seconds / 4:14.3f}{ratio:>18}")


if __name__ == "__main__":
    main()
