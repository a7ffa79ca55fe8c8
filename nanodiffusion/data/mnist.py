"""MNIST and Fashion-MNIST from their four gzipped IDX files: look-up, download and decoding.

Folders are searched in this order: `data_dir` (the CLI's --data-dir), then $NANODIFFUSION_DATA, then
~/.cache/nanodiffusion/<name>/; the first two may be the folder holding the files or its parent holding
<name>/. Only the cache is downloaded into, and only when neither of the first two has the files.
"""

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from nanodiffusion.data.download import DownloadError, download_file
from nanodiffusion.data.idx import read_idx
from nanodiffusion.errors import UserError

ENV_VAR = "NANODIFFUSION_DATA"
SPLITS = ("train", "test")
SPLIT_FILES = {                     # split -> (images, labels), the names of the official release
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
MNIST_CLASSES = tuple(str(digit) for digit in range(10))


@dataclass(frozen=True)
class MnistFamily:
    """Where a 28x28 MNIST-format data set comes from: mirrors (tried in order), official MD5s, classes."""
    title: str
    mirrors: tuple[str, ...]        # URL prefixes; the file name is appended
    md5: dict[str, str]             # file name -> MD5 of the official .gz file
    class_names: tuple[str, ...]
    hint: str = ""                  # extra advice printed when the files cannot be found


MNIST_FAMILY = {
    "mnist": MnistFamily(
        title="MNIST",
        mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
        md5={"train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
             "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
             "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
             "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"},
        class_names=MNIST_CLASSES,
    ),
    "fashion-mnist": MnistFamily(
        title="Fashion-MNIST",
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        md5={"train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
             "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
             "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
             "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310"},
        class_names=FASHION_MNIST_CLASSES,
        hint="On Debian/Ubuntu, the package dataset-fashion-mnist installs them in "
             "/usr/share/datasets/fashion-mnist (then pass --data-dir /usr/share/datasets).",
    ),
}


def cache_dir(name: str) -> Path:
    """Return ~/.cache/nanodiffusion/<name>, the folder downloads go to."""
    return Path.home() / ".cache" / "nanodiffusion" / name


def find_mnist_files(name: str, split: str = "train",
                     data_dir: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """Return the (images, labels) IDX paths of data set `name`, downloading them into the cache if needed."""
    family = _family(name)
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r} for {name}: valid splits are {', '.join(SPLITS)}")
    filenames = SPLIT_FILES[split]
    if data_dir is not None:        # an explicit folder must hold the files: no silent fallback elsewhere
        found = _find_in(Path(data_dir).expanduser(), name, filenames)
        if found is None:
            raise UserError(f"{family.title} {split} files not found in {data_dir} (nor in "
                            f"{Path(data_dir) / name}).\n{_where_to_put(name)}")
        return found
    if os.environ.get(ENV_VAR):
        found = _find_in(Path(os.environ[ENV_VAR]).expanduser(), name, filenames)
        if found is not None:
            return found
    folder = cache_dir(name)
    try:
        for filename in filenames:
            if _gz_or_plain(folder / filename) is None:
                download_file([mirror + filename for mirror in family.mirrors], folder / filename,
                              family.md5[filename])
    except DownloadError as error:
        raise UserError(f"could not download {family.title} ({error}).\n{_where_to_put(name)}") from None
    return _find_in(folder, name, filenames, with_parent=False)


def read_mnist(name: str, split: str = "train",
               data_dir: str | os.PathLike | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return images (N, 1, 28, 28) uint8 and labels (N,) int64 of an MNIST-family data set."""
    images_path, labels_path = find_mnist_files(name, split, data_dir)
    images, labels = read_idx(images_path), read_idx(labels_path)
    num_classes = len(MNIST_FAMILY[name].class_names)
    if images.ndim != 3 or images.dtype != "uint8":
        raise UserError(f"{images_path}: expected uint8 images of shape (N, H, W), got {images.dtype} "
                        f"{images.shape}")
    if labels.ndim != 1 or labels.dtype != "uint8" or len(labels) != len(images):
        raise UserError(f"{labels_path}: expected {len(images)} uint8 labels, got {labels.dtype} "
                        f"{labels.shape}")
    if labels.max(initial=0) >= num_classes:
        raise UserError(f"{labels_path}: label {labels.max()} out of range 0..{num_classes - 1}")
    return torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels).long()


def _family(name: str) -> MnistFamily:
    if name not in MNIST_FAMILY:
        raise UserError(f"unknown MNIST-family data set {name!r}: valid names are {', '.join(MNIST_FAMILY)}")
    return MNIST_FAMILY[name]


def _find_in(folder: Path, name: str, filenames: tuple[str, ...],
             with_parent: bool = True) -> tuple[Path, ...] | None:
    """Return the paths of `filenames` in `folder` (or `folder/name`), each gzipped or not, else None."""
    for candidate in (folder, folder / name) if with_parent else (folder,):
        paths = [_gz_or_plain(candidate / filename) for filename in filenames]
        if all(paths):
            return tuple(paths)
    return None


def _gz_or_plain(path: Path) -> Path | None:
    """Return `path` (a .gz name) if it exists, else the decompressed file's path if that exists."""
    for candidate in (path, path.with_suffix("")):
        if candidate.is_file():
            return candidate
    return None


def _where_to_put(name: str) -> str:
    family = MNIST_FAMILY[name]
    files = "\n".join(f"  {filename}" for filename in family.md5)
    return (f"Put the {family.title} files\n{files}\n(the train-* ones for --split train, t10k-* for test) "
            f"into one of:\n"
            f"  a folder given with --data-dir (or data_dir=), or its sub-folder {name}/\n"
            f"  the folder in ${ENV_VAR}, or its sub-folder {name}/\n"
            f"  {cache_dir(name)}/\n"
            f"Official downloads: {', '.join(family.mirrors)}" + (f"\n{family.hint}" if family.hint else ""))
