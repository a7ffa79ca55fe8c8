"""A folder of PNG/JPEG images as a data set; images in sub-folders take the sub-folder name as class."""

import os
from pathlib import Path

import torch
from PIL import Image, ImageOps
from tqdm import tqdm

from nanodiffusion.errors import UserError
from nanodiffusion.images import pil_to_uint8
from nanodiffusion.validation import check_fits

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")


def check_images_fit(count: int, channels: int, size: int, working: int) -> None:
    """Refuse an image size whose `count` uint8 images (plus `working` of them as float32 while they are
    resized) would not fit in memory, before any is resized."""
    needed = (count + 5 * working) * channels * size * size
    check_fits(needed, torch.device("cpu"), f"loading {count} images at {size}x{size}",
               "ask for a smaller --image-size")


def list_images(root: str | os.PathLike) -> list[Path]:
    """Return the image files under `root`, recursively and sorted, skipping hidden files and folders."""
    root = Path(root)
    return sorted(path for path in root.rglob("*")
                  if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()
                  and not any(part.startswith(".") for part in path.relative_to(root).parts))


def read_image_folder(root: str | os.PathLike, image_size: int | None = None, channels: int | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor | None, tuple[str, ...] | None]:
    """Return images (N, C, H, W) uint8, labels (N,) int64 or None, and class names or None.

    With `image_size`, images are resized (shorter side) and center-cropped; without it they must all have one
    size. `channels` (1 or 3) defaults to 1 if every image is grayscale, else 3.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UserError(f"image folder not found: {root}")
    if channels not in (None, 1, 3):
        raise UserError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    paths = list_images(root)
    if not paths:
        raise UserError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {root}")
    labels, class_names = _folder_labels(root, paths)
    if channels is None:
        channels = 1 if all(_mode(path) in GRAY_MODES for path in paths) else 3
    if image_size is not None:
        check_images_fit(len(paths), channels, image_size, working=1)
    images = []
    for path in tqdm(paths, desc=f"loading {root.name}", unit="image", disable=len(paths) < 1000):
        try:
            with Image.open(path) as image:
                image = ImageOps.exif_transpose(image)  # phone photos store their rotation in EXIF
                images.append(pil_to_uint8(image, image_size, channels))
        except OSError as error:                        # includes UnidentifiedImageError, truncated files
            raise UserError(f"cannot read image {path}: {error}") from error
        if image_size is None and images[-1].shape != images[0].shape:
            raise UserError(f"images differ in size ({paths[0].name}: {tuple(images[0].shape[2:])}, "
                            f"{path.name}: {tuple(images[-1].shape[2:])}): pass an image size to resize them")
    return torch.cat(images), labels, class_names


def _folder_labels(root: Path, paths: list[Path]) -> tuple[torch.Tensor | None, tuple[str, ...] | None]:
    """Labels from the first sub-folder under `root` of each image, or (None, None) if all sit in `root`."""
    folders = [path.relative_to(root).parts[0] if path.parent != root else None for path in paths]
    if all(folder is None for folder in folders):
        return None, None
    if any(folder is None for folder in folders):
        loose = next(path for path, folder in zip(paths, folders) if folder is None)
        raise UserError(f"{root} has images both in class sub-folders and directly inside (e.g. "
                        f"{loose.name}): move every image into a class sub-folder, or all out of them")
    class_names = tuple(sorted(set(folders)))
    index = {name: i for i, name in enumerate(class_names)}
    return torch.tensor([index[folder] for folder in folders], dtype=torch.int64), class_names


def _mode(path: Path) -> str:
    """Return the PIL mode of an image file (reads only its header)."""
    try:
        with Image.open(path) as image:
            return image.mode
    except OSError as error:
        raise UserError(f"cannot read image {path}: {error}") from error
