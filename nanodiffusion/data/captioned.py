"""Captioned image data sets for text-to-image training: MNIST-family with label captions, coloured shapes,
captioned image folders, and mixes of them ("fashion-mnist+mnist+shapes"), all held in memory as uint8.

Each item has a tuple of captions to draw from (one for folders, every wording of its class for MNIST-family
or of its scene for shapes); `batch(indices, generator)` draws one per item from the generator, so a training
run that saves and restores its generator replays the same captions.
"""

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from nanodiffusion.data.captions import class_prompts
from nanodiffusion.data.datasets import UInt8Images, load_dataset
from nanodiffusion.data.folder import check_images_fit, list_images, read_image_folder
from nanodiffusion.data.mnist import MNIST_FAMILY
from nanodiffusion.data.shapes import ShapesDataset
from nanodiffusion.data.shapes_captions import caption_choices
from nanodiffusion.errors import UserError
from nanodiffusion.images import uint8_to_float
from nanodiffusion.validation import json_object

SHAPES = "shapes"
SHAPES_DEFAULT_SIZE = 32            # shapes have no size of their own: this one when nothing else sets it
METADATA_FILE = "metadata.jsonl"    # the Hugging Face ImageFolder convention: {"file_name": ..., "text": ...}
MAX_LISTED = 5                      # file names listed in an error message


@dataclass(frozen=True)
class CaptionedDataset(UInt8Images):
    """Images (N, C, H, W) uint8 in memory, the captions each item draws from, and the parts it joins."""
    caption_choices: tuple[tuple[str, ...], ...]        # per item; the first is its canonical caption
    parts: tuple[tuple[str, int], ...] = ()             # (source name, number of items), in order

    def __post_init__(self):
        super().__post_init__()
        if len(self.caption_choices) != len(self.images):
            raise ValueError(f"{len(self.caption_choices)} caption tuples for {len(self.images)} images")
        if not all(self.caption_choices):
            raise ValueError("every item needs at least one caption")

    def caption(self, index: int, generator: torch.Generator | None = None) -> str:
        """The canonical caption of item `index` (no generator), else one drawn from `generator`."""
        if generator is None:
            return self.caption_choices[index][0]
        return self.captions(torch.tensor([index]), generator)[0]

    def captions(self, indices: torch.Tensor, generator: torch.Generator) -> list[str]:
        """One caption per index, drawn from `generator`: exactly one number per item whatever its choices,
        so the generator's state after a batch depends on the batch size alone."""
        draws = torch.rand(len(indices), generator=generator, dtype=torch.float64).tolist()
        choices = self.caption_choices
        return [choices[i][int(u * len(choices[i]))] for i, u in zip(indices.tolist(), draws)]

    def batch(self, indices: torch.Tensor, generator: torch.Generator,
              device: torch.device | str | None = None) -> tuple[torch.Tensor, list[str]]:
        """Float images in [-1, 1] (B, C, H, W) on `device` and one caption each, drawn from `generator`."""
        images = self.images[indices.cpu()].to(device, non_blocking=True)     # move uint8: 4x fewer bytes
        return uint8_to_float(images), self.captions(indices, generator)


def load_captioned(name_or_path: str, *, image_size: int | None = None, channels: int | None = None,
                   data_dir: str | None = None, seed: int = 0, num_shapes: int = 60_000,
                   two_object_prob: float = 0.3, num_class_images: int | None = None) -> CaptionedDataset:
    """Load "mnist", "fashion-mnist", "shapes" (`num_shapes` scenes drawn from `seed`, `two_object_prob` of
    them with two objects), a captioned image folder, or a mix joined by "+", at one size and channel count
    (grayscale parts become RGB beside RGB ones). `num_class_images` keeps the first N of each MNIST-family
    part.

    `image_size` None keeps the parts' own size (28 for MNIST-family, 32 for shapes alone); `channels`
    None is 3 if any part is in colour, else 1. `data_dir` is where MNIST-family files are looked up.
    """
    if image_size is not None and image_size < 1:
        raise UserError(f"image size must be positive, got {image_size}")
    if channels not in (None, 1, 3):
        raise UserError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    names = _split_names(name_or_path)
    if data_dir is not None and not any(name in MNIST_FAMILY for name in names):
        raise UserError("data_dir (--data-dir) applies to mnist and fashion-mnist only; "
                        "pass an image folder itself as the data set")
    if SHAPES in names and channels == 1:
        raise UserError("the shapes data set is in colour (its captions name colours): use channels=3")
    if num_class_images is not None and num_class_images < 1:
        raise UserError(f"num_class_images must be positive, got {num_class_images}")
    parts = {name: _load_part(name, image_size, channels, data_dir, num_class_images)
             for name in names if name != SHAPES}
    sizes = {name: part.images.shape[2:] for name, part in parts.items()}
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{name} {tuple(size)}" for name, size in sizes.items())
        raise UserError(f"the data sets differ in image size ({listed}): pass an image size")
    if SHAPES in names:
        size = image_size or (next(iter(sizes.values()))[0] if sizes else SHAPES_DEFAULT_SIZE)
        parts[SHAPES] = shapes_captioned(num_shapes, size, seed, two_object_prob)
    return concat_captioned([parts[name] for name in names])


def concat_captioned(datasets: list[CaptionedDataset]) -> CaptionedDataset:
    """Join data sets of one image size in order; grayscale ones become RGB if any other is RGB."""
    if len(datasets) == 1:
        return datasets[0]
    if len({dataset.images.shape[2:] for dataset in datasets}) > 1:
        raise UserError("captioned data sets of different image sizes cannot be joined")
    channels = max(dataset.channels for dataset in datasets)
    images = [dataset.images.expand(-1, channels, -1, -1) for dataset in datasets]   # 1 -> 3 channels
    choices = tuple(choice for dataset in datasets for choice in dataset.caption_choices)
    parts = tuple(part for dataset in datasets for part in dataset.parts)
    return CaptionedDataset(torch.cat(images), choices, parts)


def mnist_captioned(name: str, image_size: int | None = None, channels: int | None = None,
                    data_dir: str | None = None, num_items: int | None = None) -> CaptionedDataset:
    """MNIST or Fashion-MNIST (the train split, or its first `num_items`), each image captioned by every
    wording of its class."""
    data = load_dataset(name, image_size=image_size, channels=channels, data_dir=data_dir)
    images, labels = data.images[:num_items], data.labels[:num_items]
    prompts = [class_prompts(name, label) for label in range(len(data.class_names))]
    choices = tuple(prompts[label] for label in labels.tolist())
    return CaptionedDataset(images, choices, ((name, len(images)),))


def shapes_captioned(num_items: int, image_size: int, seed: int = 0,
                     two_object_prob: float = 0.3) -> CaptionedDataset:
    """The first `num_items` scenes of `ShapesDataset(image_size, seed, two_object_prob=...)`, rendered
    (0.2 ms each at 32x32), each captioned by every wording of `shapes_captions.caption_choices`."""
    check_images_fit(num_items, 3, image_size, working=0)
    shapes = ShapesDataset(image_size, seed=seed, num_items=num_items, two_object_prob=two_object_prob)
    images = torch.empty((num_items, 3, image_size, image_size), dtype=torch.uint8)
    choices = []
    for i in tqdm(range(num_items), desc="drawing shapes", unit="image", disable=num_items < 10_000):
        images[i], _, attributes = shapes[i]
        choices.append(caption_choices(attributes))
    return CaptionedDataset(images, tuple(choices), ((SHAPES, num_items),))


def folder_captioned(root: str | os.PathLike, image_size: int | None = None,
                     channels: int | None = None) -> CaptionedDataset:
    """A folder of images captioned by its metadata.jsonl ("file_name", "text" per line) or, without one, by
    a .txt file beside each image (same name stem)."""
    root = Path(root).expanduser()
    images, _, _ = read_image_folder(root, image_size, channels)      # sub-folder labels are not used
    paths = list_images(root)                                         # the order read_image_folder uses
    captions = folder_captions(root, paths)
    return CaptionedDataset(images, tuple((caption,) for caption in captions), ((str(root), len(paths)),))


def folder_captions(root: Path, paths: list[Path]) -> list[str]:
    """The caption of each image in `paths` (files under `root`), from metadata.jsonl or .txt files."""
    if (root / METADATA_FILE).is_file():
        table = read_metadata(root / METADATA_FILE)
        source = METADATA_FILE
    elif (root / "metadata.csv").is_file():
        raise UserError(f"{root / 'metadata.csv'}: only {METADATA_FILE} is read; write one JSON object per "
                        f'line, e.g. {{"file_name": "0001.png", "text": "a red car"}}')
    else:
        table = {path: _read_text(path.with_suffix(".txt"))
                 for path in paths if path.with_suffix(".txt").is_file()}
        source = "a .txt file of the same name"
    missing = [path.relative_to(root).as_posix() for path in paths if path not in table]
    if missing:
        raise UserError(f"{len(missing)} of {len(paths)} images in {root} have no caption in {source} "
                        f"(e.g. {', '.join(missing[:MAX_LISTED])})")
    return [table[path] for path in paths]


def read_metadata(path: Path) -> dict[Path, str]:
    """Read a metadata.jsonl: image path (resolved against its folder) -> caption."""
    table = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        entry = json_object(line, f"{path} line {number}")
        for column in ("file_name", "text"):
            if column not in entry:
                raise UserError(f"{path} line {number} has no {column!r} column (it has: "
                                f"{', '.join(entry) or 'none'}); each line needs \"file_name\" and \"text\"")
            if not isinstance(entry[column], str):
                raise UserError(f"{path} line {number}: {column!r} must be a string, got {entry[column]!r}")
        image = Path(os.path.normpath(path.parent / entry["file_name"]))
        if not image.is_file():
            raise UserError(f"{path} line {number}: image {entry['file_name']!r} not found in {path.parent}")
        if image in table:
            raise UserError(f"{path} line {number}: a second caption for {entry['file_name']!r}")
        table[image] = entry["text"]
    return table


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read caption {path}: {error}") from None


def _split_names(name_or_path: str) -> list[str]:
    """The parts of a (mixed) data set name; an existing folder is one part even if its name has a "+"."""
    if name_or_path and Path(name_or_path).expanduser().is_dir():
        return [name_or_path]
    names = name_or_path.split("+")
    for name in names:
        if not name:
            raise UserError(f"empty data set name in {name_or_path!r}")
        if name in MNIST_FAMILY or name == SHAPES or Path(name).expanduser().is_dir():
            continue
        if os.sep in name or name.startswith((".", "~")):
            raise UserError(f"image folder not found: {name}")
        valid = ", ".join((*MNIST_FAMILY, SHAPES))
        raise UserError(f"unknown data set {name!r}: valid names are {valid}, the path of a captioned image "
                        f"folder, or several joined by '+' (e.g. fashion-mnist+mnist+shapes)")
    if len(set(names)) < len(names):
        raise UserError(f"{name_or_path!r} names a data set twice")
    return names


def _load_part(name: str, image_size: int | None, channels: int | None,
               data_dir: str | None, num_class_images: int | None) -> CaptionedDataset:
    if name in MNIST_FAMILY:
        return mnist_captioned(name, image_size, channels, data_dir, num_class_images)
    return folder_captioned(name, image_size, channels)
