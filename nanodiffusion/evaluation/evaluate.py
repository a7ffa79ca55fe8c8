"""Measure generated images against a data set's test split with its shipped classifier.

`evaluate_images(classifier, images, labels, reference)` works for any generator that was asked for known
classes (a text-to-image model's prompts map to class indices the same way); `evaluate_ddpm` and
`sweep_ddpm` sample a DDPM pipeline class-balanced and call it. Every result also holds the same metrics for
as many real training images: the score of a perfect model at that sample size, since the Fréchet distance is
biased upwards for small samples (Chong & Forsyth 2020).
"""

import math
from dataclasses import dataclass

import torch

from nanodiffusion.data.datasets import ImageDataset, load_dataset
from nanodiffusion.diffusion.samplers import get_sampler
from nanodiffusion.diffusion.schedules import check_num_steps
from nanodiffusion.errors import UserError
from nanodiffusion.evaluation.classifier import Classifier, classifier_for_dataset
from nanodiffusion.evaluation.metrics import (
    confusion_matrix, diversity_ratio, embed, frechet_distance_from_stats, gaussian_stats,
    per_class_agreement,
)
from nanodiffusion.images import float_to_uint8, uint8_to_float

SWEEP_SAMPLERS = ("ddim", "euler", "heun", "dpmpp_2m", "ddpm")
SWEEP_STEPS = (10, 20, 50, 100)


@dataclass(frozen=True)
class ReferenceSet:
    """Classifier features (N, F) of real images with their labels (N,), and the Gaussian fitted to them."""
    features: torch.Tensor
    labels: torch.Tensor
    class_names: tuple[str, ...]
    mean: torch.Tensor                  # (F,) float64
    cov: torch.Tensor                   # (F, F) float64


def reference_set(classifier: Classifier, dataset: ImageDataset) -> ReferenceSet:
    """Embed every image of a labelled data set (usually the test split) with the classifier."""
    images, labels = dataset.batch(torch.arange(len(dataset)))
    features, _ = embed(classifier, images)
    mean, cov = gaussian_stats(features)
    return ReferenceSet(features, labels, tuple(dataset.class_names), mean, cov)


def evaluate_images(classifier: Classifier, images: torch.Tensor, labels: torch.Tensor | None,
                    reference: ReferenceSet) -> dict:
    """Class agreement (when `labels` are given), Fréchet distance and diversity ratio of images in [-1, 1].

    Diversity is measured within the intended classes, or within the predicted ones when `labels` is None.
    Images are rounded to 8 bits first, as if saved as PNG, so generated and real images are treated alike.
    """
    images = uint8_to_float(float_to_uint8(images.cpu()))
    features, predicted = embed(classifier, images)
    names, num_classes = reference.class_names, len(reference.class_names)
    distance = frechet_distance_from_stats(*gaussian_stats(features), reference.mean, reference.cov)
    groups = predicted if labels is None else labels.cpu()
    diversity, per_class_diversity = diversity_ratio(features, groups, reference.features, reference.labels,
                                                     num_classes)
    result = {"num_images": len(images), "frechet_distance": distance, "diversity_ratio": _number(diversity),
              "per_class_diversity_ratio": dict(zip(names, map(_number, per_class_diversity.tolist())))}
    if labels is not None:
        confusion = confusion_matrix(predicted, labels.cpu(), num_classes)
        per_class = per_class_agreement(confusion)
        result |= {"class_agreement": confusion.diagonal().sum().item() / len(images),
                   "per_class_agreement": dict(zip(names, map(_number, per_class.tolist()))),
                   "confusion_matrix": confusion.tolist()}
    return result


def evaluate_ddpm(pipe, dataset_name: str = "fashion-mnist", num_images: int = 1000, *,
                  sampler: str = "dpmpp_2m", num_steps: int = 50, guidance_scale: float = 2.0, seed: int = 0,
                  data_dir: str | None = None, batch_size: int = 250, progress: bool = True) -> dict:
    """Sample `num_images` (classes in turn) from a `DDPMPipeline` and measure them against the data set's
    test split; "real" holds the same metrics for as many training images.
    """
    sweep = sweep_ddpm(pipe, dataset_name, num_images, samplers=(sampler,), step_counts=(num_steps,),
                       guidance_scale=guidance_scale, seed=seed, data_dir=data_dir, batch_size=batch_size,
                       progress=progress)
    return sweep["runs"][0] | {key: value for key, value in sweep.items() if key != "runs"}


def sweep_ddpm(pipe, dataset_name: str = "fashion-mnist", num_images: int = 200, *,
               samplers=SWEEP_SAMPLERS, step_counts=SWEEP_STEPS, guidance_scale: float = 2.0, seed: int = 0,
               data_dir: str | None = None, batch_size: int = 250, progress: bool = True) -> dict:
    """Evaluate every sampler x step count on the same initial noise (the layout of DDIM's Table 1).

    Returns {"dataset", "classifier_test_accuracy", "real": metrics of real training images, "runs": [...]}.
    """
    if num_images < 2:
        raise UserError(f"evaluation needs at least 2 images (for a covariance), got {num_images}")
    for name in samplers:
        get_sampler(name)
    for steps in step_counts:
        check_num_steps(steps, pipe.schedule.num_timesteps)
    classifier, meta = classifier_for_dataset(dataset_name)
    _check_compatible(pipe, classifier, meta["class_names"], dataset_name)
    reference = reference_set(classifier, load_dataset(dataset_name, split="test", data_dir=data_dir))
    labels = torch.arange(num_images) % pipe.num_classes if pipe.num_classes else None
    train_set = load_dataset(dataset_name, data_dir=data_dir)
    real_images, real_labels = real_sample(train_set, num_images, labels, seed)
    real = evaluate_images(classifier, real_images, real_labels if labels is not None else None, reference)
    runs = []
    for name in samplers:
        for steps in step_counts:
            images = sample_images(pipe, num_images, labels, sampler=name, num_steps=steps,
                                   guidance_scale=guidance_scale, seed=seed, batch_size=batch_size,
                                   progress=progress)
            settings = {"sampler": name, "num_steps": steps, "guidance_scale": guidance_scale, "seed": seed}
            runs.append(settings | evaluate_images(classifier, images, labels, reference))
    return {"dataset": dataset_name, "classifier_test_accuracy": meta.get("test_accuracy"), "real": real,
            "runs": runs}


def sample_images(pipe, num_images: int, labels: torch.Tensor | None, *, sampler: str, num_steps: int,
                  guidance_scale: float, seed: int, batch_size: int = 250,
                  progress: bool = True) -> torch.Tensor:
    """Draw images (N, C, H, W) in [-1, 1] of the given classes, in batches with seeds drawn from `seed`: the
    initial noise depends on (seed, batch_size) only, so every sampler and step count starts from the same.
    """
    if batch_size < 1:
        raise UserError(f"batch size must be >= 1, got {batch_size}")
    num_batches = math.ceil(num_images / batch_size)
    batch_seeds = torch.randint(2**62, (num_batches,), generator=torch.Generator().manual_seed(seed))
    images = []
    for i, batch_seed in enumerate(batch_seeds.tolist()):
        size = min(batch_size, num_images - i * batch_size)
        batch_labels = labels[i * batch_size:i * batch_size + size].tolist() if labels is not None else None
        result = pipe(size, sampler=sampler, num_steps=num_steps, seed=batch_seed,
                      guidance_scale=guidance_scale, labels=batch_labels, progress=progress)
        images.append(result.images.cpu())
    return torch.cat(images)


def _check_compatible(pipe, classifier: Classifier, class_names, dataset_name: str) -> None:
    """Raise a UserError unless the model draws images and classes that the classifier knows."""
    cfg, unet = classifier.config, pipe.unet.config
    if (unet.in_channels, unet.image_size) != (cfg.in_channels, cfg.image_size):
        raise UserError(f"the model draws {unet.in_channels}x{unet.image_size}x{unet.image_size} images but "
                        f"the {dataset_name} classifier takes "
                        f"{cfg.in_channels}x{cfg.image_size}x{cfg.image_size}")
    if pipe.num_classes and pipe.num_classes != len(class_names):
        raise UserError(f"the model has {pipe.num_classes} classes, {dataset_name} has {len(class_names)}")
    if pipe.class_names and tuple(pipe.class_names) != tuple(class_names):
        raise UserError(f"the model's classes ({', '.join(pipe.class_names)}) are not those of "
                        f"{dataset_name} ({', '.join(class_names)}): pass the --dataset it was trained on")


def real_sample(dataset: ImageDataset, num_images: int, labels: torch.Tensor | None,
                 seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random real images with the class counts of `labels` (any classes when None), and their labels."""
    generator = torch.Generator().manual_seed(seed)
    if labels is None:
        indices = torch.randperm(len(dataset), generator=generator)[:num_images]
    else:
        counts = torch.bincount(labels, minlength=dataset.num_classes)
        indices = torch.cat([_shuffled(torch.nonzero(dataset.labels == k).flatten(), generator)[:count]
                             for k, count in enumerate(counts.tolist())])
    images, real_labels = dataset.batch(indices)
    return images, real_labels


def _shuffled(values: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return values[torch.randperm(len(values), generator=generator)]


def _number(value: float) -> float | None:
    """NaN (a class without enough images) becomes None, which JSON can hold."""
    return None if math.isnan(value) else value
