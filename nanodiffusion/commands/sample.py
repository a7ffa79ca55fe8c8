"""Sample a DDPM model: a grid PNG, optionally a GIF of the reverse process and one PNG per image."""

from pathlib import Path

import torch

from nanodiffusion.atomic import check_output_file, check_output_folder
from nanodiffusion.commands.sampler_flags import add_sampler_option_flags, sampler_option_flags
from nanodiffusion.diffusion.samplers import SAMPLERS
from nanodiffusion.errors import UserError
from nanodiffusion.images import save_png, to_pil
from nanodiffusion.pipelines.ddpm import DDPMPipeline, save_reverse_gif
from nanodiffusion.pipelines.memory import ddpm_bytes
from nanodiffusion.validation import check_fits, finite_float
from nanodiffusion.weights.models import BUILTIN_DDPM

GIF_FRAMES = 50


def add_arguments(p) -> None:
    p.add_argument("model", nargs="?", default="fashion-mnist",
                   help=f"checkpoint file, or a built-in model: {', '.join(BUILTIN_DDPM)}")
    p.add_argument("-n", "--num-images", type=int, default=20, help="number of images")
    # defaults chosen by `nanodiffusion eval` on the built-in model (README): 99 % class agreement
    p.add_argument("--sampler", default="dpmpp_2m_sde", choices=list(SAMPLERS), help="sampler")
    p.add_argument("--steps", type=int, default=20, help="sampling steps (the tutorial's DDPM uses 1000)")
    add_sampler_option_flags(p)
    p.add_argument("--seed", type=int, default=0, help="random seed: the same seed gives the same images")
    p.add_argument("--guidance", type=finite_float, default=2.0,
                   help="classifier-free guidance scale for class-conditional models (1 = none)")
    p.add_argument("--label", action="append",
                   help="class to draw (index or name, repeatable); default: cycle through every class")
    p.add_argument("--out", default="samples.png", help="grid PNG")
    p.add_argument("--out-dir", help="also write every image as its own PNG in this folder")
    p.add_argument("--gif", help="write an animated GIF of the reverse process")
    p.add_argument("--gif-frames", type=int,
                   help=f"frames in the GIF, x_T to the image, the last one held (default: steps + 1, at "
                        f"most {GIF_FRAMES})")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA ones")


def run(args) -> None:
    gif_frames = _check_outputs(args)
    pipe = DDPMPipeline.from_pretrained(args.model, use_ema=not args.no_ema)
    guided = bool(pipe.num_classes) and args.guidance != 1
    with_gif = f" with {gif_frames} GIF frames" if gif_frames else ""
    check_fits(ddpm_bytes(pipe, args.num_images, guided, gif_frames), torch.device("cpu"),
               f"sampling {args.num_images} images at once{with_gif}",
               "ask for fewer images (-n)" + (" or --gif-frames" if gif_frames else ""))
    result = pipe.sample_grid(args.out, num_images=args.num_images, sampler=args.sampler, num_steps=args.steps,
                              seed=args.seed, guidance_scale=args.guidance, labels=args.label,
                              gif_frames=gif_frames, **sampler_option_flags(args))
    print(f"wrote {args.out}")
    if args.gif is not None:
        save_reverse_gif(result.frames, args.gif, cols=_grid_cols(pipe, args.num_images))
        print(f"wrote {args.gif} ({len(result.frames)} frames)")
    if args.out_dir is not None:
        out = Path(args.out_dir)
        for i, image in enumerate(to_pil(result.images)):
            prefix = f"label{int(result.labels[i])}_" if result.labels is not None else ""
            save_png(image, out / f"{prefix}{i:04d}.png")
        print(f"wrote {len(result.images)} images to {out}")


def _check_outputs(args) -> int:
    """Check every output path before the model loads; return the GIF's frame count (0: no GIF)."""
    check_output_file(args.out, "--out", suffix=".png")
    if args.out_dir is not None:
        check_output_folder(args.out_dir, "--out-dir")
    if args.gif is None:
        return 0
    check_output_file(args.gif, "--gif", suffix=".gif")
    frames = args.gif_frames if args.gif_frames is not None else min(GIF_FRAMES, args.steps + 1)
    if not 2 <= frames <= args.steps + 1:
        raise UserError(f"--gif-frames must be from 2 (x_T and the image) to --steps + 1 = {args.steps + 1}, "
                        f"got {frames}")
    return frames


def _grid_cols(pipe: DDPMPipeline, n: int) -> int | None:
    return pipe.num_classes if pipe.num_classes and n % pipe.num_classes == 0 else None
