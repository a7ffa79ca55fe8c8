"""Training the evaluation classifier: AdamW with a one-cycle learning rate, random shifts (and flips).

On one CPU thread, 10 epochs reach 92.8 % on Fashion-MNIST (7 minutes) and 6 epochs 99.6 % on MNIST
(4 minutes): see scripts/train_classifier.py, which trained the shipped weights.
"""

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from nanodiffusion.data.datasets import ImageDataset
from nanodiffusion.errors import UserError
from nanodiffusion.evaluation.classifier import Classifier, ClassifierConfig


@dataclass(frozen=True)
class ClassifierTrainConfig:
    epochs: int = 5
    batch_size: int = 128
    lr: float = 3e-3                  # peak of the one-cycle schedule (Smith & Topin 2017)
    weight_decay: float = 0.05        # AdamW's decoupled decay
    max_shift: int = 2                # random translation by up to this many pixels each way
    hflip: bool = False               # random horizontal flips: fine for clothes, wrong for digits
    label_smoothing: float = 0.1
    bf16: bool = True                 # bf16 autocast: about 1.5x faster on AVX-512-BF16 CPUs
    seed: int = 0

    def __post_init__(self):
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_shift < 0:
            raise UserError(f"max_shift must be >= 0, got {self.max_shift}")


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image of x (B, C, H, W) by its own random offset in [-max_shift, max_shift] pixels,
    filling with -1 (the black background of the MNIST family).
    """
    if max_shift == 0:
        return x
    B, C, H, W = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)                          # (B, C, H + 2m, W + 2m)
    offsets = torch.randint(0, 2 * max_shift + 1, (2, B), generator=generator)
    rows = (offsets[0, :, None] + torch.arange(H))[:, None, :, None]         # (B, 1, H, 1)
    cols = (offsets[1, :, None] + torch.arange(W))[:, None, None, :]         # (B, 1, 1, W)
    batch = torch.arange(B)[:, None, None, None]
    channel = torch.arange(C)[None, :, None, None]
    return padded[batch, channel, rows, cols]                                # (B, C, H, W)


def random_hflip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror a random half of the images (B, C, H, W) left to right."""
    flip = torch.rand(x.shape[0], generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def train_classifier(config: ClassifierConfig, train: ClassifierTrainConfig, dataset: ImageDataset,
                     progress: bool = True) -> Classifier:
    """Train a classifier on a labelled data set and return it in eval mode (float32, CPU)."""
    if dataset.labels is None or dataset.num_classes != config.num_classes:
        raise UserError(f"the classifier needs a labelled data set with {config.num_classes} classes")
    if dataset.images.shape[1:] != (config.in_channels, config.image_size, config.image_size):
        raise UserError(f"the data set's images are {tuple(dataset.images.shape[1:])}, the classifier takes "
                        f"({config.in_channels}, {config.image_size}, {config.image_size})")
    torch.manual_seed(train.seed)                                            # weights and dropout
    generator = torch.Generator().manual_seed(train.seed)                    # batch order and augmentation
    model = Classifier(config).to(memory_format=torch.channels_last)        # faster convolutions on CPU
    optimizer = torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    steps_per_epoch = -(-len(dataset) // train.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=train.lr,
                                                   total_steps=train.epochs * steps_per_epoch)
    model.train()
    for epoch in range(train.epochs):
        order = torch.randperm(len(dataset), generator=generator)
        bar = tqdm(order.split(train.batch_size), desc=f"epoch {epoch + 1}/{train.epochs}",
                   disable=not progress)
        tic, correct, seen = time.perf_counter(), 0, 0
        for indices in bar:
            x, labels = dataset.batch(indices)
            x = random_shift(x, train.max_shift, generator)
            if train.hflip:
                x = random_hflip(x, generator)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=train.bf16):
                logits = model(x.contiguous(memory_format=torch.channels_last))
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=train.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            correct += (logits.argmax(dim=1) == labels).sum().item()
            seen += len(labels)
            bar.set_postfix(loss=f"{loss.item():.3f}", train_acc=f"{correct / seen:.3f}",
                            img_s=f"{seen / (time.perf_counter() - tic):.0f}")
    return model.to(memory_format=torch.contiguous_format).eval()
