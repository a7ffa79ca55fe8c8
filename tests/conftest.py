import os

import numpy as np
import pytest

from nanodiffusion.data.idx import write_idx

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """The model-hash cache of every test run goes to a temporary folder, never to ~/.cache."""
    os.environ["NANODIFFUSION_CACHE"] = str(tmp_path_factory.mktemp("nanodiffusion-cache"))


def make_fake_mnist(folder, n: int = 64, size: int = 28, num_classes: int = 10, seed: int = 0) -> None:
    """Write MNIST-format IDX files of learnable toy images: class k is a bright bar at row 2k+2."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % num_classes).astype(np.uint8)
    images = rng.integers(0, 40, size=(n, size, size), dtype=np.uint8)
    for i, k in enumerate(labels):
        images[i, 2 * k + 2: 2 * k + 4, 4:size - 4] = 230
    folder.mkdir(parents=True, exist_ok=True)
    for prefix in ("train", "t10k"):
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)


@pytest.fixture
def fake_fashion_dir(tmp_path):
    folder = tmp_path / "data" / "fashion-mnist"
    make_fake_mnist(folder)
    return folder


@pytest.fixture
def shared_data_dir():
    if not os.path.isdir(os.path.join(SHARED_DATA, "fashion-mnist")):
        pytest.skip("real data not available (../shared/data)")
    return os.path.abspath(SHARED_DATA)
