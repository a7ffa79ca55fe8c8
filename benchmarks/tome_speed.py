"""Token merging (ToMe for SD, `tome_ratio`): its speed and how far it moves the image, on this CPU.

    speed  one classifier-free-guidance UNet step (batch 2) at --size, per ratio: the best of --repeats rounds
           over all ratios (interleaved, so that a load change hits every ratio alike), after a warm-up at
           64²; wall time, and the process's CPU time, which other processes on a shared CPU disturb less
    image  a whole generation at --image-size (DPM++ 2M, --steps, CFG 7), per ratio: PSNR and max abs
           difference against the unmerged image (ratio 0), on the [0, 1] scale

The UNet is SD v1.5's config with seeded random weights (--model takes a diffusers folder instead, e.g. the
one time_to_image.py writes): random weights say how fast, not how good; the paper (Bolya & Hoffman 2023)
reports FID barely changed at ratio 0.5 on trained SD v1.5.

    OMP_NUM_THREADS=2 python benchmarks/tome_speed.py --model /tmp/tti/sd15
    python benchmarks/tome_speed.py --quick                 # tiny UNet with full-resolution attention
"""

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from time_to_image import cpu_model  # noqa: E402

from nanodiffusion.nets.token_merging import merging_tokens  # noqa: E402
from nanodiffusion.pipelines.text_to_image import TextToImage  # noqa: E402

PROMPT = "a photograph of an astronaut riding a horse"


def build(args) -> TextToImage:
    """The pipeline: --model's folder, else random SD v1.5 (or, --quick, tiny) networks."""
    if args.model:
        return TextToImage.from_pretrained(args.model)
    from nanodiffusion.nets import clip_text, sd_unet, vae
    from nanodiffusion.nets.clip_text import CLIPTextModel
    from nanodiffusion.nets.sd_unet import SDUNet, SDUNetConfig
    from nanodiffusion.nets.vae import AutoencoderKL
    from nanodiffusion.tokenizer import CLIPTokenizer
    torch.manual_seed(0)
    if args.quick:
        unet = SDUNetConfig(model_channels=32, channel_mult=(1, 2), attention_levels=(0, 1), num_heads=2,
                            context_dim=32, norm_groups=8, sample_size=8)
        parts = (SDUNet(unet), AutoencoderKL(vae.TINY_VAE), CLIPTextModel(clip_text.TINY_TEXT))
    else:
        parts = (SDUNet(sd_unet.SD15_UNET), AutoencoderKL(vae.SD15_VAE), CLIPTextModel(clip_text.SD15_TEXT))
    return TextToImage(*parts, CLIPTokenizer.clip())


def unet_step(pipe: TextToImage, side: int, ratio: float) -> None:
    latent = side // pipe.vae_factor
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, latent, latent, generator=generator)
    context = torch.randn(2, 77, pipe.unet.config.context_dim, generator=generator)
    with merging_tokens(pipe.unet, ratio, seed=0):
        pipe.unet(x, torch.tensor([500.0, 500.0]), context)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a diffusers folder (default: random SD v1.5 networks)")
    parser.add_argument("--quick", action="store_true", help="a tiny UNet at small sizes (seconds)")
    parser.add_argument("--ratios", default="0,0.3,0.5,0.7", help="comma-separated ratios; 0 first")
    parser.add_argument("--size", type=int, default=512, help="image side of the UNet step (default 512)")
    parser.add_argument("--image-size", type=int, default=256, help="image side of the generations")
    parser.add_argument("--steps", type=int, default=8, help="sampling steps of the generations (0: none)")
    parser.add_argument("--repeats", type=int, default=1, help="timed UNet steps per ratio (best shown)")
    args = parser.parse_args()
    ratios = [float(r) for r in args.ratios.split(",")]
    if ratios[0] != 0:
        parser.error("--ratios must start with 0 (the reference)")
    if args.quick:
        args.size, args.image_size, args.steps = 64, 48, 3
    pipe = build(args)
    pipe.show_progress = False
    print(f"{time.strftime('%Y-%m-%d %H:%M %Z')}: {cpu_model()}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}; "
          f"{args.model or ('tiny UNet' if args.quick else 'SD v1.5 config, random weights')}, fp32")
    with torch.no_grad():
        unet_step(pipe, 64, 0.5)                                          # warm-up
        wall, cpu = {ratio: math.inf for ratio in ratios}, {ratio: math.inf for ratio in ratios}
        for _ in range(args.repeats):
            for ratio in ratios:
                start, start_cpu = time.perf_counter(), time.process_time()
                unet_step(pipe, args.size, ratio)
                wall[ratio] = min(wall[ratio], time.perf_counter() - start)
                cpu[ratio] = min(cpu[ratio], time.process_time() - start_cpu)
    images = {ratio: pipe(PROMPT, seed=0, num_steps=args.steps, sampler="dpmpp_2m", guidance_scale=7.0,
                          height=args.image_size, width=args.image_size, tome_ratio=ratio,
                          output_type="np").images for ratio in ratios} if args.steps else {}
    print(f"\n{'ratio':>6} {'UNet CFG step ' + str(args.size) + '², s':>24} {'speed-up':>9} {'CPU s':>8} "
          f"{'speed-up':>9} {'PSNR vs ratio 0, dB':>20} {'max|diff|':>10}   "
          f"({args.image_size}², {args.steps} steps)")
    for ratio in ratios:
        if images:
            mse = float(np.square(images[ratio] - images[0]).mean())
            db = math.inf if mse == 0 else 10 * math.log10(1 / mse)
            quality = f"{db:20.1f} {float(np.abs(images[ratio] - images[0]).max()):10.3f}"
        else:
            quality = f"{'-':>20} {'-':>10}"
        print(f"{ratio:6.2f} {wall[ratio]:24.2f} {wall[0] / wall[ratio]:9.2f} {cpu[ratio]:8.2f} "
              f"{cpu[0] / cpu[ratio]:9.2f} {quality}")
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
