"""k-diffusion as a test oracle (STYLE §8.2): the samplers and schedules A1111 and ComfyUI run.

Its package imports torchvision and scikit-image, so its `sampling` and `external` modules are loaded from
their files, with the two imports they make but our tests never use (`utils`, for `append_dims`, and
torchdiffeq) replaced by stand-ins.
"""

import importlib.util
import sys
import types
from pathlib import Path

import pytest


def _load(patch, name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    patch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


def load_k_diffusion() -> types.SimpleNamespace:
    """k-diffusion's `sampling` and `external` modules, loaded from site-packages without its package; the
    calling test skips when k-diffusion or what its sampling module imports (torchsde, scipy) is missing."""
    pytest.importorskip("torchsde")
    pytest.importorskip("scipy")
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None:
        pytest.skip("k-diffusion is not installed")
    folder = Path(spec.submodule_search_locations[0])
    package = types.ModuleType("k_diffusion")
    package.__path__ = [str(folder)]
    package.utils = types.ModuleType("k_diffusion.utils")
    package.utils.append_dims = lambda x, ndim: x.reshape(*x.shape, *([1] * (ndim - x.ndim)))
    with pytest.MonkeyPatch.context() as patch:                   # sys.modules is restored afterwards
        patch.setitem(sys.modules, "k_diffusion", package)
        patch.setitem(sys.modules, "k_diffusion.utils", package.utils)
        if importlib.util.find_spec("torchdiffeq") is None:
            patch.setitem(sys.modules, "torchdiffeq", types.SimpleNamespace(odeint=None))
        package.sampling = _load(patch, "k_diffusion.sampling", folder / "sampling.py")
        external = _load(patch, "k_diffusion.external", folder / "external.py")
    return types.SimpleNamespace(sampling=package.sampling, external=external)
