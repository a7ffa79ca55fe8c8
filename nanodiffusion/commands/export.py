"""Export a DDPM training checkpoint as a lean model file: EMA weights and config, no optimizer or RNG state."""

import json

import torch

from nanodiffusion.pipelines.ddpm import DDPMPipeline

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def add_arguments(p) -> None:
    p.add_argument("checkpoint", help="a checkpoint written by `nanodiffusion train` (e.g. runs/fm/best.safetensors)")
    p.add_argument("out", help="the model file to write (.safetensors)")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="storage precision of the weights")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA ones")
    p.add_argument("--notes", help="JSON object stored with the model (how it was trained, ...)")


def run(args) -> None:
    pipe = DDPMPipeline.from_pretrained(args.checkpoint, use_ema=not args.no_ema)
    notes = json.loads(args.notes) if args.notes else None
    pipe.save_pretrained(args.out, dtype=DTYPES[args.dtype], notes=notes)
    print(f"wrote {args.out}")
