"""pytest fixtures of the suite; the helpers they use are in fixtures.py."""

import os

import pytest
from fixtures import SHARED_DATA, make_fake_mnist


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """The model-hash cache of every test run goes to a temporary folder, never to ~/.cache."""
    os.environ["NANODIFFUSION_CACHE"] = str(tmp_path_factory.mktemp("nanodiffusion-cache"))


@pytest.fixture
def fake_fashion_dir(tmp_path):
    folder = tmp_path / "data" / "fashion-mnist"
    make_fake_mnist(folder)
    return folder


@pytest.fixture
def shared_data_dir():
    if not (SHARED_DATA / "fashion-mnist").is_dir():
        pytest.skip("real data not available (../shared/data)")
    return str(SHARED_DATA)
