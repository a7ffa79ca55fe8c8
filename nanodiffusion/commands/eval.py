"""Evaluate a DDPM model with the data set's shipped classifier: class agreement, Fréchet distance on the
classifier's features to the test split, and diversity; or, with --sweep, a sampler x steps table.

A text-to-image model (a diffusers folder, or the built-in one: `nanodiffusion eval builtin`) is judged on its
prompt adherence instead: class prompts of --prompts' data sets by their classifiers, and coloured-shapes
prompts by exact checks (evaluation/text_to_image_eval.py).
"""

import argparse
import json
from pathlib import Path

import torch

from nanodiffusion.atomic import atomic_write, check_output_file
from nanodiffusion.diffusion.samplers import SAMPLERS
from nanodiffusion.errors import UserError
from nanodiffusion.evaluation.classifier import BUILTIN_CLASSIFIERS, builtin_classifier_path
from nanodiffusion.evaluation.evaluate import SWEEP_SAMPLERS, SWEEP_STEPS, evaluate_ddpm, sweep_ddpm
from nanodiffusion.evaluation.report import (
    format_evaluation, format_sweep, format_text_to_image, format_text_to_image_sweep,
)
from nanodiffusion.evaluation.text_to_image_eval import (
    PROMPT_SETS, evaluate_text_to_image, sweep_text_to_image,
)
from nanodiffusion.pipelines.ddpm import DDPMPipeline
from nanodiffusion.pipelines.memory import ddpm_bytes
from nanodiffusion.pipelines.request import GenerationRequest
from nanodiffusion.pipelines.text_to_image import TextToImage
from nanodiffusion.validation import check_fits, check_seed, finite_float
from nanodiffusion.weights.models import BUILTIN_DDPM, BUILTIN_TEXT_TO_IMAGE

DEFAULT_SAMPLER, DEFAULT_STEPS = "dpmpp_2m", 50
DEFAULT_IMAGES, DEFAULT_SWEEP_IMAGES = 1000, 200
DEFAULT_GUIDANCE = 2.0


def add_arguments(p) -> None:
    # -n, --sampler and --steps have defaults that depend on --sweep: SUPPRESS keeps argparse from printing
    # "(default: None)" after the help that states them; `run` reads them with vars(args).get
    depends = argparse.SUPPRESS
    p.add_argument("model", nargs="?", default="fashion-mnist",
                   help=f"DDPM checkpoint file or built-in model ({', '.join(BUILTIN_DDPM)}); or a "
                        f"text-to-image diffusers folder or built-in model ({', '.join(BUILTIN_TEXT_TO_IMAGE)})")
    p.add_argument("--dataset", default="fashion-mnist",
                   help=f"the data set the model was trained on; one of {', '.join(BUILTIN_CLASSIFIERS)}")
    p.add_argument("--data-dir", help="folder holding the dataset files")
    p.add_argument("-n", "--num-images", type=int, default=depends,
                   help=f"images to generate (default {DEFAULT_IMAGES}; with --sweep, "
                        f"{DEFAULT_SWEEP_IMAGES} per sampler and step count)")
    p.add_argument("--sampler", nargs="+", default=depends, metavar="NAME",
                   help=f"sampler: {', '.join(SAMPLERS)} (default {DEFAULT_SAMPLER}); with --sweep, several "
                        f"(default {' '.join(SWEEP_SAMPLERS)})")
    p.add_argument("--steps", nargs="+", type=int, default=depends, metavar="N",
                   help=f"sampling steps (default {DEFAULT_STEPS}); with --sweep, several "
                        f"(default {' '.join(map(str, SWEEP_STEPS))})")
    p.add_argument("--guidance", type=finite_float, default=depends,
                   help=f"classifier-free guidance scale, 1 = none (default {DEFAULT_GUIDANCE:g} for a DDPM model, "
                        "the model's generation default for text-to-image)")
    text = p.add_argument_group("text-to-image models")
    text.add_argument("--prompts", nargs="+", choices=PROMPT_SETS, default=list(PROMPT_SETS),
                      help="prompt sets to judge (default: all)")
    text.add_argument("--images-per-class", type=int, default=100, help="images per class prompt")
    text.add_argument("--num-shapes", type=int, default=300,
                      help="coloured-shapes prompts (as the training scenes: 30 %% with two objects)")
    text.add_argument("--num-relations", type=int, default=300, help="two-object prompts (relations)")
    p.add_argument("--seed", type=int, default=0, help="random seed: the same seed gives the same images")
    p.add_argument("--sweep", action="store_true", help="tabulate every sampler x step count")
    p.add_argument("--batch-size", type=int, default=250, help="images sampled at a time")
    p.add_argument("--json", help="also write the full results (confusion matrix included) to this JSON file")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA ones")


def is_text_to_image(model: str) -> bool:
    return model in BUILTIN_TEXT_TO_IMAGE or (Path(model) / "model_index.json").is_file()


def run(args) -> None:
    given = vars(args)
    samplers, step_counts, num_images = given.get("sampler"), given.get("steps"), given.get("num_images")
    if not args.sweep and max(len(samplers or ()), len(step_counts or ())) > 1:
        raise UserError("several samplers or step counts need --sweep")
    check_seed(args.seed, name="--seed")
    if args.json:
        check_output_file(args.json, "--json")
    if is_text_to_image(args.model):
        if num_images is not None:
            raise UserError("-n is for DDPM models; a text-to-image model's count is --images-per-class "
                            "and --num-shapes")
        return run_text_to_image(args, samplers, step_counts)
    builtin_classifier_path(args.dataset)           # an unknown data set fails before the model loads
    pipe = DDPMPipeline.from_pretrained(args.model, use_ema=not args.no_ema)
    options = {"guidance_scale": given.get("guidance", DEFAULT_GUIDANCE), "seed": args.seed, "data_dir": args.data_dir,
               "batch_size": args.batch_size}
    check_fits(ddpm_bytes(pipe, args.batch_size, bool(pipe.num_classes) and options["guidance_scale"] != 1),
               torch.device("cpu"), f"sampling {args.batch_size} images at once", "lower --batch-size")
    if args.sweep:
        count = num_images if num_images is not None else DEFAULT_SWEEP_IMAGES
        result = sweep_ddpm(pipe, args.dataset, count,
                            samplers=tuple(samplers or SWEEP_SAMPLERS),
                            step_counts=tuple(step_counts or SWEEP_STEPS), **options)
        print(format_sweep(result))
    else:
        result = evaluate_ddpm(pipe, args.dataset, num_images if num_images is not None else DEFAULT_IMAGES,
                               sampler=(samplers or [DEFAULT_SAMPLER])[0],
                               num_steps=(step_counts or [DEFAULT_STEPS])[0], **options)
        print(format_evaluation(result))
    if args.json:
        with atomic_write(args.json) as file:
            file.write(json.dumps(result | {"model": str(args.model)}, indent=1).encode())
        print(f"wrote {args.json}")


def run_text_to_image(args, samplers, step_counts) -> None:
    """Prompt adherence of a text-to-image model (sampler, steps and guidance default to the model's)."""
    if min(args.images_per_class, args.num_shapes, args.num_relations) < 1:
        raise UserError("--images-per-class, --num-shapes and --num-relations must be >= 1")
    pipe = TextToImage.from_pretrained(args.model)           # built-in names resolve there
    defaults = GenerationRequest("", **pipe.generation_defaults)   # the model's own, else SD's
    options = {"guidance_scale": vars(args).get("guidance", defaults.guidance_scale),
               "seed": args.seed, "data_dir": args.data_dir, "batch_size": args.batch_size,
               "images_per_class": args.images_per_class, "num_shapes": args.num_shapes,
               "num_relations": args.num_relations}
    samplers = samplers or [defaults.sampler]
    step_counts = step_counts or [defaults.num_steps]
    if args.sweep:
        result = sweep_text_to_image(pipe, tuple(args.prompts), samplers=samplers, step_counts=step_counts,
                                     **options)
        print(format_text_to_image_sweep(result))
    else:
        result = evaluate_text_to_image(pipe, tuple(args.prompts), sampler=samplers[0],
                                        num_steps=step_counts[0], **options)
        print(format_text_to_image(result))
    if args.json:
        with atomic_write(args.json) as file:
            file.write(json.dumps(result | {"model": str(args.model)}, indent=1).encode())
        print(f"wrote {args.json}")
