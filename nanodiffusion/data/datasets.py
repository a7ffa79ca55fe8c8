"""Data sets by name ("mnist", "fashion-mnist") or by folder, held in memory as uint8 image tensors."""

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from nanodiffusion.data.folder import check_images_fit, read_image_folder
from nanodiffusion.data.mnist import MNIST_FAMILY, read_mnist
from nanodiffusion.errors import UserError
from nanodiffusion.images import uint8_to_float

RESIZE_CHUNK = 8192                 # images resized at a time: bounds the float32 working memory


@dataclass(frozen=True)
class UInt8Images:
    """Images (N, C, H, W) uint8 held in memory: what the labelled and the captioned data sets share."""
    images: torch.Tensor

    def __post_init__(self):
        if self.images.ndim != 4 or self.images.dtype != torch.uint8:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} "
                             f"{tuple(self.images.shape)}")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> int:
        """The side of the (square) images; use `images.shape` for non-square ones."""
        return self.images.shape[2]


@dataclass(frozen=True)
class ImageDataset(UInt8Images):
    """Images (N, C, H, W) uint8 in memory, optional labels (N,) int64 and the names of their classes."""
    labels: torch.Tensor | None = None
    class_names: tuple[str, ...] | None = None

    def __post_init__(self):
        super().__post_init__()
        labels, class_names = self.labels, self.class_names
        if labels is not None:
            if labels.shape != (len(self.images),) or labels.dtype != torch.int64:
                raise ValueError(f"labels must be int64 of shape ({len(self.images)},), got {labels.dtype} "
                                 f"{tuple(labels.shape)}")
            if class_names is not None and len(labels) and labels.max() >= len(class_names):
                raise ValueError(f"label {labels.max()} out of range for {len(class_names)} classes")

    @property
    def num_classes(self) -> int:
        """The number of classes, 0 for an unlabeled data set."""
        return len(self.class_names) if self.class_names is not None else 0

    def batch(self, indices: torch.Tensor,
              device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return float images in [-1, 1] (B, C, H, W) and labels (B,) (or None) at `indices`, on `device`."""
        indices = indices.to(self.images.device)
        images = self.images[indices].to(device, non_blocking=True)      # move uint8: 4x fewer bytes
        labels = self.labels[indices].to(device, non_blocking=True) if self.labels is not None else None
        return uint8_to_float(images), labels

    def to(self, device: torch.device | str) -> "ImageDataset":
        """Return a copy held on `device` (MNIST fits on any GPU, which makes batches free to gather)."""
        labels = self.labels.to(device) if self.labels is not None else None
        return dataclasses.replace(self, images=self.images.to(device), labels=labels)


def load_dataset(name_or_path: str, *, image_size: int | None = None, channels: int | None = None,
                 split: str = "train", data_dir: str | None = None) -> ImageDataset:
    """Load "mnist", "fashion-mnist" (see `nanodiffusion.data.mnist` for where files are looked up) or a
    folder of images, resized to `image_size` and converted to `channels` (1 or 3) when given.
    """
    if image_size is not None and image_size < 1:
        raise UserError(f"image size must be positive, got {image_size}")
    if channels not in (None, 1, 3):
        raise UserError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    if name_or_path in MNIST_FAMILY:
        images, labels = read_mnist(name_or_path, split, data_dir)
        if image_size is not None and image_size != images.shape[-1]:
            check_images_fit(len(images), channels or 1, image_size, working=min(len(images), RESIZE_CHUNK))
            images = resize_uint8(images, image_size)
        if channels == 3:
            images = images.repeat(1, 3, 1, 1)      # a real copy: in-place edits stay per channel
        return ImageDataset(images, labels, MNIST_FAMILY[name_or_path].class_names)
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        looks_like_path = os.sep in name_or_path or name_or_path.startswith((".", "~")) or path.exists()
        if looks_like_path:
            raise UserError(f"image folder not found: {name_or_path}")
        raise UserError(f"unknown data set {name_or_path!r}: valid names are {', '.join(MNIST_FAMILY)}, "
                        f"or the path of a folder of images")
    if split != "train":
        raise UserError(f"an image folder has no {split!r} split: load test images from their own folder")
    if data_dir is not None:
        raise UserError("data_dir (--data-dir) applies to mnist and fashion-mnist only; "
                        "pass the image folder itself as the data set")
    images, labels, class_names = read_image_folder(path, image_size, channels)
    return ImageDataset(images, labels, class_names)


def resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize uint8 images (N, C, H, W) to size x size: bilinear, antialiased (matters when shrinking)."""
    chunks = []
    for chunk in images.split(RESIZE_CHUNK):
        resized = F.interpolate(chunk.float(), size=(size, size), mode="bilinear", antialias=True,
                                align_corners=False)
        chunks.append(resized.round().clamp(0, 255).to(torch.uint8))
    return torch.cat(chunks)
