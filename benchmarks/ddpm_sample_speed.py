"""Sampling speed of a DDPM model: the tutorial's 1000-step loop against our samplers, same network.

    python benchmarks/ddpm_sample_speed.py [MODEL] [--threads 2] [-n 16]

MODEL defaults to the built-in Fashion-MNIST model (a random-weight default UNet if it is not there). The
reference is the tutorial's ancestral loop written plainly (fp32, one network call per step, x_{t-1} from
eq. 11 of Ho et al.); ours is `DDPMPipeline` with each sampler at the given steps, fp32 and bf16 autocast.
"""

import argparse
import time

import torch

from nanodiffusion.diffusion.schedules import ScheduleConfig, get_alphas_cumprod, get_betas
from nanodiffusion.errors import UserError
from nanodiffusion.nets.ddpm_unet import DEFAULT_UNET, DDPMUNet
from nanodiffusion.pipelines.ddpm import DDPMPipeline


@torch.no_grad()
def reference_seconds(pipe: DDPMPipeline, n: int) -> float:
    """The tutorial's sampling loop: for t = T-1..0, x = (x - beta/sqrt(1-a_bar)·eps)/sqrt(alpha) + sqrt(beta)·z."""
    betas = get_betas(pipe.schedule).float()
    alpha_bars = get_alphas_cumprod(pipe.schedule).float()
    cfg = pipe.unet.config
    x = torch.randn(n, cfg.in_channels, cfg.image_size, cfg.image_size)
    labels = torch.arange(n) % cfg.num_classes if cfg.num_classes else None
    tic = time.perf_counter()
    for t in range(pipe.schedule.num_timesteps - 1, -1, -1):
        eps = pipe.unet(x, torch.full((n,), float(t)), class_labels=labels)
        x = (x - betas[t] / (1 - alpha_bars[t]).sqrt() * eps) / (1 - betas[t]).sqrt()
        if t > 0:
            x = x + betas[t].sqrt() * torch.randn_like(x)
    return time.perf_counter() - tic


def ours_seconds(pipe: DDPMPipeline, n: int, sampler: str, steps: int, bf16: bool) -> float:
    tic = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        pipe(n, sampler=sampler, num_steps=steps, guidance_scale=1.0, progress=False)
    return time.perf_counter() - tic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="fashion-mnist")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("-n", type=int, default=16, help="images per run")
    parser.add_argument("--reference", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the 1000-step reference loop (slow)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    try:
        pipe = DDPMPipeline.from_pretrained(args.model)
    except UserError:
        pipe = DDPMPipeline(DDPMUNet(DEFAULT_UNET), ScheduleConfig("linear"))
        print("(built-in model not found: random-weight default UNet)")
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.n} images, guidance off")
    ref = reference_seconds(pipe, args.n) if args.reference else None
    print(f"{'sampler':28s} {'steps':>5s} {'seconds':>8s} {'images/s':>9s} {'speed-up':>13s}")
    if ref:
        print(f"{'reference tutorial DDPM loop':28s} {1000:5d} {ref:8.2f} {args.n / ref:9.2f} {1.0:12.2f}x")
    for sampler, steps in (("ddpm", 1000), ("ddpm", 100), ("ddim", 50), ("dpmpp_2m", 20), ("heun", 10)):
        for bf16 in (False, True):
            s = ours_seconds(pipe, args.n, sampler, steps, bf16)
            ratio = f"{ref / s:12.2f}x" if ref else ""
            print(f"{sampler + (' bf16' if bf16 else ' fp32'):28s} {steps:5d} {s:8.2f} {args.n / s:9.2f} {ratio}")


if __name__ == "__main__":
    main()
