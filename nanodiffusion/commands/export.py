"""Export a DDPM training checkpoint as a lean model file: EMA weights and config, no optimizer or RNG state."""

import json
import math

import torch

from nanodiffusion.atomic import check_output_file
from nanodiffusion.errors import UserError
from nanodiffusion.pipelines.ddpm import DDPMPipeline

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def add_arguments(p) -> None:
    p.add_argument("checkpoint", help="a checkpoint written by `nanodiffusion train` (e.g. runs/fm/best.safetensors)")
    p.add_argument("out", help="the model file to write (.safetensors)")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="storage precision of the weights")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA ones")
    p.add_argument("--notes", help="JSON object stored with the model (how it was trained, ...)")


def run(args) -> None:
    notes = parse_notes(args.notes)
    if not args.out.endswith(".safetensors"):
        raise UserError(f"the model file must end with .safetensors, got {args.out}")
    check_output_file(args.out, "OUT")
    pipe = DDPMPipeline.from_pretrained(args.checkpoint, use_ema=not args.no_ema)
    size = sum(tensor.numel() for tensor in pipe.unet.state_dict().values()) * DTYPES[args.dtype].itemsize
    check_output_file(args.out, "OUT", size=size)
    pipe.save_pretrained(args.out, dtype=DTYPES[args.dtype], notes=notes)
    print(f"wrote {args.out}")


def parse_notes(text: str | None) -> dict | None:
    """--notes as a dict: a JSON object, else a UserError that says where the JSON is wrong."""
    if text is None:
        return None
    try:
        notes = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite)
    except json.JSONDecodeError as error:
        raise UserError(f"--notes must be a JSON object such as '{{\"data\": \"fashion-mnist\"}}': {error}") \
            from None
    if not isinstance(notes, dict):
        raise UserError(f"--notes must be a JSON object ({{...}}), got a JSON {type(notes).__name__}")
    return notes


def _refuse_constant(name: str):
    raise UserError(f"--notes must be standard JSON: {name} is not a JSON number")


def _finite(text: str) -> float:
    if not math.isfinite(value := float(text)):
        raise UserError(f"--notes must hold finite numbers, got {text} (it overflows)")
    return value
