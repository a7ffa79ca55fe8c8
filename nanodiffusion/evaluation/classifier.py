"""A small CNN classifier for 28x28 images, used to judge generated ones, and its shipped weights.

`Classifier(config)(x)` returns class logits for images x in [-1, 1]; `features(x)` returns the penultimate
layer that the Fréchet distance and the diversity measure are computed on (the role Inception-v3's pool3
features play in FID, Heusel et al. 2017), and `head(features)` the logits from it.
"""

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from nanodiffusion.config import JSONConfig
from nanodiffusion.errors import UserError
from nanodiffusion.weights.checkpoint import load_checkpoint, prefixed, save_checkpoint, unprefixed

BUILTIN_DIR = Path(__file__).resolve().parent.parent / "builtin" / "classifiers"
BUILTIN_CLASSIFIERS = {                # data set name -> shipped weights, made by scripts/train_classifier.py
    "fashion-mnist": BUILTIN_DIR / "fashion-mnist.safetensors",
    "mnist": BUILTIN_DIR / "mnist.safetensors",
}
CHECKPOINT_KIND = "classifier"


@dataclass(frozen=True)
class ClassifierConfig(JSONConfig):
    in_channels: int = 1
    image_size: int = 28
    channels: tuple[int, ...] = (32, 64, 128)   # one conv block per entry, each halving the side: 28 -> 3
    feature_dim: int = 128                      # width of the penultimate layer (the features of the metrics)
    num_classes: int = 10
    dropout: float = 0.3                        # before the last linear layer, during training only

    def __post_init__(self):
        for name in ("in_channels", "image_size", "feature_dim", "num_classes"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise UserError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not self.channels or not all(isinstance(c, int) and c > 0 for c in self.channels):
            raise UserError(f"channels must be a non-empty tuple of positive integers, got {self.channels!r}")
        if self.image_size >> len(self.channels) < 1:
            raise UserError(f"image_size {self.image_size} is too small for {len(self.channels)} blocks "
                            f"that each halve it")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def final_side(self) -> int:
        """Side of the last block's feature map (max pooling floors: 28 -> 14 -> 7 -> 3)."""
        return self.image_size >> len(self.channels)


class ConvBlock(nn.Module):
    """3x3 convolution, BatchNorm, ReLU, then 2x2 max pooling (halves the side, flooring)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)   # BatchNorm has the bias
        self.norm = nn.BatchNorm2d(out_channels)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(torch.relu(self.norm(self.conv(x))))


class Classifier(nn.Module):
    """Conv blocks -> linear, BatchNorm, ReLU (the features, (B, feature_dim)) -> dropout -> linear."""

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = config
        widths = (config.in_channels, *config.channels)
        self.blocks = nn.ModuleList(ConvBlock(a, b) for a, b in zip(widths[:-1], widths[1:]))
        flat = config.channels[-1] * config.final_side**2
        self.to_features = nn.Linear(flat, config.feature_dim, bias=False)     # BatchNorm has the bias
        self.feature_norm = nn.BatchNorm1d(config.feature_dim)
        self.dropout = nn.Dropout(config.dropout)
        self.to_logits = nn.Linear(config.feature_dim, config.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (B, feature_dim) of images x (B, C, H, W) in [-1, 1]."""
        cfg = self.config
        if x.shape[1:] != (cfg.in_channels, cfg.image_size, cfg.image_size):
            raise UserError(f"the classifier takes ({cfg.in_channels}, {cfg.image_size}, {cfg.image_size}) "
                            f"images, got {tuple(x.shape[1:])}")
        for block in self.blocks:
            x = block(x)
        x = x.flatten(1)                                                        # (B, C * side * side)
        return torch.relu(self.feature_norm(self.to_features(x)))              # (B, feature_dim)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        """Class logits (B, num_classes) from penultimate features."""
        return self.to_logits(self.dropout(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def save_classifier(path: str | os.PathLike, model: Classifier, class_names, metadata: dict | None = None,
                    half: bool = True) -> None:
    """Write the weights (floating ones as fp16 when `half`) with the config, class names and `metadata`."""
    state = {k: v.half() if half and v.is_floating_point() else v for k, v in model.state_dict().items()}
    if len(class_names) != model.config.num_classes:
        raise ValueError(f"{len(class_names)} class names for {model.config.num_classes} classes")
    meta = {"kind": CHECKPOINT_KIND, "config": model.config.to_dict(), "class_names": list(class_names)}
    save_checkpoint(path, prefixed("classifier", state), meta | (metadata or {}))


def load_classifier(name_or_path: str | os.PathLike) -> tuple[Classifier, dict]:
    """Return (classifier in eval mode, fp32, metadata) from a shipped data set name or a checkpoint file."""
    path = BUILTIN_CLASSIFIERS.get(str(name_or_path), Path(name_or_path))
    tensors, meta = load_checkpoint(path)
    if meta.get("kind") != CHECKPOINT_KIND:
        raise UserError(f"{path} is not a classifier checkpoint (kind={meta.get('kind')!r})")
    model = Classifier(ClassifierConfig.from_dict(meta["config"]))
    state = unprefixed("classifier", tensors)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    missing, unexpected = set(model.state_dict()) - set(state), set(state) - set(model.state_dict())
    if missing or unexpected:
        raise UserError(f"{path} does not match its config: missing {sorted(missing)}, "
                        f"unexpected {sorted(unexpected)}")
    model.load_state_dict(state)
    return model.eval(), meta


def builtin_classifier_path(dataset_name: str) -> Path:
    """The shipped classifier file of a data set, or a UserError naming the data sets that have one."""
    if dataset_name not in BUILTIN_CLASSIFIERS:
        raise UserError(f"no classifier for data set {dataset_name!r}: evaluation needs one trained on its "
                        f"images; shipped classifiers: {', '.join(BUILTIN_CLASSIFIERS)}")
    path = BUILTIN_CLASSIFIERS[dataset_name]
    if not path.is_file():
        raise UserError(f"the classifier for {dataset_name} is missing from this installation ({path}); "
                        f"train it with scripts/train_classifier.py --dataset {dataset_name} --out {path}")
    return path


def classifier_for_dataset(dataset_name: str) -> tuple[Classifier, dict]:
    """The shipped classifier of a data set and its metadata (class names, test accuracy, training)."""
    return load_classifier(builtin_classifier_path(dataset_name))
