"""Prompt adherence of a text-to-image model, judged by feature extractors the project trains itself.

- Class prompts ("a photo of a sneaker", "the handwritten digit 7"): images are drawn for each class's
  canonical prompt, made grayscale at the classifier's size, and judged by the data set's shipped classifier
  (class agreement), with the Fréchet distance and diversity of `evaluate_images` against the test split.
  "real" holds the same metrics for as many real test images sent through the same size round trip (the
  score of a perfect model).
- Coloured-shapes prompts ("a small red circle in the top left", "a blue square left of a green triangle"):
  each image is checked exactly for colour, shape, size, position and relation (`shapes_check`). "shapes"
  draws scenes as the training data does (30 % with two objects), "relations" two-object scenes only.

`sweep_text_to_image` repeats this for each sampler x step count on the same seeds (DDIM's Table 1 layout).
"""

import math

import numpy as np
import torch

from nanodiffusion.data.captions import CAPTIONED_CLASSES, class_prompt
from nanodiffusion.data.datasets import load_dataset, resize_uint8
from nanodiffusion.data.shapes import ShapesDataset, describe
from nanodiffusion.diffusion.samplers import resolve_sampler
from nanodiffusion.errors import UserError
from nanodiffusion.evaluation.classifier import classifier_for_dataset
from nanodiffusion.evaluation.evaluate import evaluate_images, real_sample, reference_set
from nanodiffusion.evaluation.shapes_check import shapes_adherence
from nanodiffusion.images import float_to_uint8, uint8_to_float

SHAPE_SETS = {"shapes": 0.3, "relations": 1.0}    # prompt set -> fraction of scenes with two objects
PROMPT_SETS = (*CAPTIONED_CLASSES, *SHAPE_SETS)
SHAPES_SEED = 1234                  # the shapes prompts are drawn from this seed: not the training scenes' 0
RELATIONS_SEED = 1235               # and the two-object prompts from this one


def class_prompt_list(dataset_name: str, images_per_class: int) -> tuple[list[str], torch.Tensor]:
    """Each class's canonical prompt `images_per_class` times, classes in turn, and the labels."""
    num_classes = 10
    labels = torch.arange(num_classes * images_per_class) % num_classes
    return [class_prompt(dataset_name, int(label)) for label in labels], labels


def shapes_prompt_list(num_prompts: int, seed: int = SHAPES_SEED, two_object_prob: float = 0.3) -> list[str]:
    """Captions of random shapes scenes (one or two objects, every attribute), drawn from `seed`."""
    scenes = ShapesDataset(32, seed=seed, num_items=num_prompts, two_object_prob=two_object_prob)
    return [describe(scenes.attributes(i)) for i in range(num_prompts)]


def generate_images(pipe, prompts: list[str], *, sampler: str, num_steps: int, guidance_scale: float,
                    seed: int = 0, batch_size: int = 100, height: int | None = None,
                    width: int | None = None) -> torch.Tensor:
    """Images (N, C, H, W) in [-1, 1] for `prompts`, in batches seeded from `seed`: the initial noise depends
    on (seed, batch_size) only, so every sampler and step count starts from the same."""
    if batch_size < 1:
        raise UserError(f"batch size must be >= 1, got {batch_size}")
    batch_seeds = torch.randint(2**62, (math.ceil(len(prompts) / batch_size),),
                                generator=torch.Generator().manual_seed(seed)).tolist()
    show, pipe.show_progress = pipe.show_progress, False
    try:
        images = []
        for i, batch_seed in enumerate(batch_seeds):
            chunk = prompts[i * batch_size:(i + 1) * batch_size]
            array = pipe(chunk, sampler=sampler, num_steps=num_steps, guidance_scale=guidance_scale,
                         seed=batch_seed, height=height, width=width, output_type="np").images
            images.append(torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2) * 2 - 1)
    finally:
        pipe.show_progress = show
    return torch.cat(images)


def classifier_view(images: torch.Tensor, size: int) -> torch.Tensor:
    """Images in [-1, 1] as an MNIST-family classifier sees them: 8-bit, grayscale (channel mean), resized
    to `size` (antialiased bilinear, as the data sets are resized); (N, 1, size, size) in [-1, 1]."""
    pixels = float_to_uint8(images.cpu()).float().mean(dim=1, keepdim=True).round().to(torch.uint8)
    if pixels.shape[-1] != size:
        pixels = resize_uint8(pixels, size)
    return uint8_to_float(pixels)


def evaluate_class_prompts(pipe, dataset_name: str, images_per_class: int = 50, *, sampler: str,
                           num_steps: int, guidance_scale: float, seed: int = 0, data_dir: str | None = None,
                           batch_size: int = 100) -> dict:
    """Class agreement, Fréchet distance and diversity of the images of each class's canonical prompt."""
    if dataset_name not in CAPTIONED_CLASSES:
        raise UserError(f"no class prompts for {dataset_name!r}; valid: {', '.join(CAPTIONED_CLASSES)}")
    classifier, meta = classifier_for_dataset(dataset_name)
    size = classifier.config.image_size
    test_set = load_dataset(dataset_name, split="test", data_dir=data_dir)
    reference = reference_set(classifier, test_set)
    prompts, labels = class_prompt_list(dataset_name, images_per_class)
    images = generate_images(pipe, prompts, sampler=sampler, num_steps=num_steps, guidance_scale=guidance_scale,
                             seed=seed, batch_size=batch_size)
    result = evaluate_images(classifier, classifier_view(images, size), labels, reference)
    return {"prompts": sorted(set(prompts), key=prompts.index), **result,
            "classifier_test_accuracy": meta.get("test_accuracy"),
            "real": _real_round_trip(classifier, reference, test_set, labels, images.shape, seed)}


def evaluate_shapes_prompts(pipe, num_prompts: int = 300, *, sampler: str, num_steps: int,
                            guidance_scale: float, seed: int = 0, batch_size: int = 100,
                            prompt_set: str = "shapes") -> dict:
    """Rates of the colour, shape, size, position, relation and count checks on random shapes prompts of
    `prompt_set` ("shapes" or "relations": two-object prompts only)."""
    if prompt_set not in SHAPE_SETS:
        raise UserError(f"unknown shapes prompt set {prompt_set!r}; valid: {', '.join(SHAPE_SETS)}")
    prompt_seed = SHAPES_SEED if prompt_set == "shapes" else RELATIONS_SEED
    prompts = shapes_prompt_list(num_prompts, prompt_seed, SHAPE_SETS[prompt_set])
    images = generate_images(pipe, prompts, sampler=sampler, num_steps=num_steps, guidance_scale=guidance_scale,
                             seed=seed, batch_size=batch_size)
    if images.shape[1] != 3:
        raise UserError("the shapes prompts need a colour model: this one draws grayscale images")
    return shapes_adherence(images, prompts)


def evaluate_text_to_image(pipe, prompt_sets=PROMPT_SETS, *, images_per_class: int = 100,
                           num_shapes: int = 300, num_relations: int = 300, sampler: str, num_steps: int,
                           guidance_scale: float, seed: int = 0, data_dir: str | None = None,
                           batch_size: int = 100) -> dict:
    """{prompt set: its result} for class prompt sets ("mnist", "fashion-mnist"), "shapes" and
    "relations"."""
    resolve_sampler(sampler)                            # an unknown name fails before any work
    unknown = set(prompt_sets) - set(PROMPT_SETS)
    if unknown:
        raise UserError(f"unknown prompt set(s) {', '.join(sorted(unknown))}; valid: {', '.join(PROMPT_SETS)}")
    settings = dict(sampler=sampler, num_steps=num_steps, guidance_scale=guidance_scale, seed=seed,
                    batch_size=batch_size)
    results = {}
    for name in prompt_sets:
        if name in SHAPE_SETS:
            count = num_shapes if name == "shapes" else num_relations
            results[name] = evaluate_shapes_prompts(pipe, count, prompt_set=name, **settings)
        else:
            results[name] = evaluate_class_prompts(pipe, name, images_per_class, data_dir=data_dir, **settings)
    return {"settings": settings, "results": results}


def sweep_text_to_image(pipe, prompt_sets=PROMPT_SETS, *, samplers, step_counts, **options) -> dict:
    """`evaluate_text_to_image` for every sampler x step count, on the same seeds."""
    runs = [evaluate_text_to_image(pipe, prompt_sets, sampler=sampler, num_steps=steps, **options)
            for sampler in samplers for steps in step_counts]
    return {"runs": runs}


def headline(result: dict) -> dict[str, float]:
    """The one number per prompt set: class agreement for class prompts, all checks passed for shapes."""
    return {name: value["all"] if name in SHAPE_SETS else value["class_agreement"]
            for name, value in result["results"].items()}


def _real_round_trip(classifier, reference, test_set, labels: torch.Tensor, shape: torch.Size,
                     seed: int) -> dict:
    """The metrics of real test images of the same classes, resized to the generated size and back, in as
    many channels as the generated ones."""
    images, real_labels = real_sample(test_set, len(labels), labels, seed)
    pixels = float_to_uint8(images)
    if pixels.shape[-1] != shape[-1]:
        pixels = resize_uint8(pixels, shape[-1])
    view = classifier_view(uint8_to_float(pixels).expand(-1, shape[1], -1, -1), classifier.config.image_size)
    return evaluate_images(classifier, view, real_labels, reference)
