"""IDX files, MNIST-family look-up and download, image folders, and the in-memory ImageDataset."""

import dataclasses
import gzip
import hashlib
import io
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nanodiffusion.data import download, mnist
from nanodiffusion.data.datasets import ImageDataset, load_dataset
from nanodiffusion.data.idx import read_idx, write_idx
from nanodiffusion.errors import UserError
from fixtures import SHARED_DATA

TRAIN_FILES = mnist.SPLIT_FILES["train"]


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    """Point ~ at an empty folder and clear $NANODIFFUSION_DATA, so that no test sees the real cache."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv(mnist.ENV_VAR, raising=False)


def write_fake_mnist(folder: Path, num_images: int, split: str = "train", seed: int = 0) -> np.ndarray:
    """Write random 28x28 IDX image and label files for `split` into `folder`; return the labels."""
    rng = np.random.default_rng(seed)
    images_name, labels_name = mnist.SPLIT_FILES[split]
    labels = rng.integers(0, 10, num_images, dtype=np.uint8)
    write_idx(folder / images_name, rng.integers(0, 256, (num_images, 28, 28), dtype=np.uint8))
    write_idx(folder / labels_name, labels)
    return labels


# --- IDX ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("filename", ["a-idx3-ubyte.gz", "a-idx3-ubyte"])
@pytest.mark.parametrize("shape, dtype", [((7,), np.uint8), ((5, 4, 3), np.uint8), ((2, 3), np.int32),
                                          ((4,), np.float32), ((2, 2), np.int16), ((3,), np.float64)])
def test_idx_round_trip(tmp_path, filename, shape, dtype):
    array = (np.arange(np.prod(shape)).reshape(shape) * 3 - 1).astype(dtype)
    write_idx(tmp_path / filename, array)
    assert (tmp_path / filename).read_bytes()[:2] == (b"\x1f\x8b" if filename.endswith(".gz") else b"\0\0")
    loaded = read_idx(tmp_path / filename)
    assert loaded.dtype == dtype and loaded.shape == shape and loaded.flags.writeable
    np.testing.assert_array_equal(loaded, array)


def test_idx_layout_is_big_endian(tmp_path):
    write_idx(tmp_path / "x", np.array([1, 258], dtype=np.int32))
    assert (tmp_path / "x").read_bytes() == b"\0\0\x0c\x01" + b"\0\0\0\x02" + b"\0\0\0\x01" + b"\0\0\x01\x02"


@pytest.mark.parametrize("data, message", [
    (b"\x01\x00\x08\x01\x00\x00\x00\x02ab", "magic"),
    (b"\x00\x00\x42\x01\x00\x00\x00\x02ab", "dtype code"),
    (b"\x00\x00\x08\x03\x00\x00\x00\x02", "truncated header"),
    (b"\x00\x00\x08\x01\x00\x00\x00\x05ab", "truncated"),
    (b"\x00\x00\x08\x01\x00\x00\x00\x02abc", "trailing"),
    (b"\x00\x00", "magic"),
])
def test_idx_corrupt_file_is_a_user_error(tmp_path, data, message):
    for path, content in [(tmp_path / "x", data), (tmp_path / "x.gz", gzip.compress(data))]:
        path.write_bytes(content)
        with pytest.raises(UserError, match=message) as error:
            read_idx(path)
        assert str(path) in str(error.value)


def test_idx_broken_gzip_and_missing_file(tmp_path):
    (tmp_path / "x.gz").write_bytes(gzip.compress(b"\0\0\x08\x01\0\0\0\x10" + bytes(16))[:-9])   # cut short
    with pytest.raises(UserError, match="gzip"):
        read_idx(tmp_path / "x.gz")
    with pytest.raises(UserError, match="not found"):
        read_idx(tmp_path / "missing.gz")


# --- MNIST-family look-up ----------------------------------------------------------------------------------

def test_lookup_order_data_dir_then_env_then_cache(tmp_path, monkeypatch):
    write_fake_mnist(tmp_path / "explicit", 3)                       # the folder itself
    write_fake_mnist(tmp_path / "env" / "fashion-mnist", 4)          # the parent form
    write_fake_mnist(mnist.cache_dir("fashion-mnist"), 5)
    monkeypatch.setenv(mnist.ENV_VAR, str(tmp_path / "env"))
    assert len(load_dataset("fashion-mnist", data_dir=str(tmp_path / "explicit"))) == 3
    assert len(load_dataset("fashion-mnist")) == 4
    monkeypatch.delenv(mnist.ENV_VAR)
    assert len(load_dataset("fashion-mnist")) == 5
    monkeypatch.setenv(mnist.ENV_VAR, str(tmp_path / "elsewhere"))  # env without the files: on to the cache
    assert len(load_dataset("fashion-mnist")) == 5


def test_data_dir_accepts_parent_and_plain_files(tmp_path):
    write_fake_mnist(tmp_path / "mnist", 6, split="test")
    for name in mnist.SPLIT_FILES["test"]:                           # decompressed copies work too
        path = tmp_path / "mnist" / name
        path.with_suffix("").write_bytes(gzip.decompress(path.read_bytes()))
        path.unlink()
    dataset = load_dataset("mnist", split="test", data_dir=str(tmp_path))
    assert dataset.images.shape == (6, 1, 28, 28) and dataset.class_names == mnist.MNIST_CLASSES


def test_missing_files_in_data_dir_name_the_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(download, "urlopen", _fail_to_download)
    with pytest.raises(UserError) as error:
        load_dataset("mnist", data_dir=str(tmp_path / "nowhere"))
    assert str(tmp_path / "nowhere") in str(error.value) and TRAIN_FILES[0] in str(error.value)


def test_mnist_dataset_shapes_resize_and_channels(tmp_path):
    labels = write_fake_mnist(tmp_path, 10)
    dataset = load_dataset("fashion-mnist", data_dir=str(tmp_path), image_size=32, channels=3)
    assert dataset.images.shape == (10, 3, 32, 32) and dataset.images.dtype == torch.uint8
    assert torch.equal(dataset.images[:, 0], dataset.images[:, 2])
    assert torch.equal(dataset.labels, torch.from_numpy(labels).long())
    assert dataset.class_names == mnist.FASHION_MNIST_CLASSES and dataset.num_classes == 10
    x, y = dataset.batch(torch.tensor([1, 4]))
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
    assert torch.equal(y, dataset.labels[[1, 4]])


def test_unknown_name_and_split(tmp_path):
    with pytest.raises(UserError, match="mnist, fashion-mnist"):
        load_dataset("cifar10")
    with pytest.raises(UserError, match="train, test"):
        load_dataset("mnist", split="val", data_dir=str(tmp_path))
    with pytest.raises(UserError, match="not found"):
        load_dataset(str(tmp_path / "no-such-folder"))


# --- download ----------------------------------------------------------------------------------------------

class FakeResponse(io.BytesIO):
    """What `urlopen` returns, served from memory."""
    def __init__(self, data: bytes):
        super().__init__(data)
        self.headers = {"Content-Length": str(len(data))}


def _fail_to_download(url, timeout=None):
    raise urllib.error.URLError("no network")


@pytest.fixture
def fake_mirror(tmp_path, monkeypatch):
    """Serve fake Fashion-MNIST train files from two mirrors (the first one down); return {url: bytes}."""
    write_fake_mnist(tmp_path / "served", 7)
    files = {name: (tmp_path / "served" / name).read_bytes() for name in TRAIN_FILES}
    family = dataclasses.replace(mnist.MNIST_FAMILY["fashion-mnist"], mirrors=("http://down/", "http://up/"),
                                 md5={name: hashlib.md5(data).hexdigest() for name, data in files.items()})
    monkeypatch.setitem(mnist.MNIST_FAMILY, "fashion-mnist", family)
    served = {f"http://up/{name}": data for name, data in files.items()}
    requested = []

    def fake_urlopen(url, timeout=None):
        requested.append(url)
        if url not in served:
            raise urllib.error.URLError("connection refused")
        return FakeResponse(served[url])

    monkeypatch.setattr(download, "urlopen", fake_urlopen)
    return served, requested


def test_download_into_cache_with_fallback_mirror(fake_mirror):
    served, requested = fake_mirror
    dataset = load_dataset("fashion-mnist")
    assert len(dataset) == 7
    cache = mnist.cache_dir("fashion-mnist")
    assert sorted(path.name for path in cache.iterdir()) == sorted(TRAIN_FILES)   # no temporary files left
    assert requested == [f"http://{host}/{name}" for name in TRAIN_FILES for host in ("down", "up")]
    requested.clear()
    assert len(load_dataset("fashion-mnist")) == 7 and requested == []          # cached: no new request


def test_download_rejects_bad_md5(fake_mirror):
    served, _ = fake_mirror
    served[f"http://up/{TRAIN_FILES[0]}"] = b"not the right bytes"
    with pytest.raises(UserError, match="MD5 mismatch"):
        load_dataset("fashion-mnist")
    cache = mnist.cache_dir("fashion-mnist")
    assert not cache.exists() or not any(cache.iterdir())


def test_offline_error_says_which_files_go_where(monkeypatch):
    monkeypatch.setattr(download, "urlopen", _fail_to_download)
    with pytest.raises(UserError) as error:
        load_dataset("fashion-mnist")
    message = str(error.value)
    for expected in (*mnist.SPLIT_FILES["train"], *mnist.SPLIT_FILES["test"], "--data-dir",
                     "NANODIFFUSION_DATA", str(mnist.cache_dir("fashion-mnist")), "dataset-fashion-mnist",
                     "/usr/share/datasets/fashion-mnist", "no network"):
        assert expected in message


# --- image folders -----------------------------------------------------------------------------------------

def _save_image(path: Path, size: tuple[int, int], color, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


def test_image_folder_with_class_subfolders(tmp_path):
    _save_image(tmp_path / "dogs" / "a.png", (40, 30), (255, 0, 0))
    _save_image(tmp_path / "cats" / "deeper" / "b.jpg", (30, 50), (0, 255, 0))
    _save_image(tmp_path / "cats" / "c.PNG", (32, 32), (0, 0, 255))
    _save_image(tmp_path / ".hidden" / "d.png", (32, 32), (0, 0, 0))
    (tmp_path / "notes.txt").write_text("not an image")
    dataset = load_dataset(str(tmp_path), image_size=16)
    assert dataset.class_names == ("cats", "dogs")
    assert dataset.images.shape == (3, 3, 16, 16) and dataset.images.dtype == torch.uint8
    assert dataset.labels.tolist() == [0, 0, 1]                   # cats/c, cats/deeper/b, dogs/a
    assert dataset.images[2, :, 8, 8].tolist() == [255, 0, 0]


def test_image_folder_gray_rgb_and_no_labels(tmp_path):
    _save_image(tmp_path / "a.png", (20, 20), 100, mode="L")
    _save_image(tmp_path / "b.png", (20, 20), 200, mode="L")
    gray = load_dataset(str(tmp_path))
    assert gray.images.shape == (2, 1, 20, 20) and gray.labels is None and gray.class_names is None
    assert load_dataset(str(tmp_path), channels=3).images.shape == (2, 3, 20, 20)
    _save_image(tmp_path / "c.png", (20, 20), (10, 20, 30))
    rgb = load_dataset(str(tmp_path))                             # one color image makes the set RGB
    assert rgb.images.shape == (3, 3, 20, 20) and rgb.images[2, :, 0, 0].tolist() == [10, 20, 30]
    assert load_dataset(str(tmp_path), channels=1).images.shape == (3, 1, 20, 20)


def test_image_folder_errors(tmp_path):
    with pytest.raises(UserError, match="no images"):
        load_dataset(str(tmp_path))
    _save_image(tmp_path / "a.png", (20, 20), (0, 0, 0))
    _save_image(tmp_path / "b.png", (24, 20), (0, 0, 0))
    with pytest.raises(UserError, match="differ in size"):
        load_dataset(str(tmp_path))
    _save_image(tmp_path / "class" / "c.png", (20, 20), (0, 0, 0))
    with pytest.raises(UserError, match="sub-folders"):
        load_dataset(str(tmp_path), image_size=8)
    (tmp_path / "class" / "broken.png").write_bytes(b"garbage")
    (tmp_path / "a.png").unlink()
    (tmp_path / "b.png").unlink()
    with pytest.raises(UserError, match="broken.png"):
        load_dataset(str(tmp_path), image_size=8)


def test_image_dataset_validates_and_moves():
    with pytest.raises(ValueError, match="uint8"):
        ImageDataset(torch.zeros(2, 1, 4, 4))
    with pytest.raises(ValueError, match="labels"):
        ImageDataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64))
    dataset = ImageDataset(torch.full((2, 1, 4, 4), 255, dtype=torch.uint8)).to("cpu")
    x, y = dataset.batch(torch.tensor([1]))
    assert y is None and torch.all(x == 1.0) and dataset.num_classes == 0


# --- real data (skipped when absent) -----------------------------------------------------------------------

@pytest.mark.skipif(not (SHARED_DATA / "fashion-mnist" / TRAIN_FILES[0]).is_file(),
                    reason="real Fashion-MNIST not in ../shared/data")
def test_real_fashion_mnist():
    dataset = load_dataset("fashion-mnist", data_dir=str(SHARED_DATA))
    assert dataset.images.shape == (60000, 1, 28, 28) and dataset.images.dtype == torch.uint8
    assert dataset.labels.bincount().tolist() == [6000] * 10
    assert dataset.class_names[9] == "Ankle boot"
