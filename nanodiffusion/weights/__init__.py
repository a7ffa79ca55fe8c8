"""Stable Diffusion v1.x / 2.x weights: load a diffusers folder, a single file or a Hub repo; save both layouts.

    components = load_sd("path/to/model.safetensors", dtype=torch.float16)
    save_diffusers(components, "path/to/folder")
"""

from pathlib import Path

import torch

from nanodiffusion.errors import UserError
from nanodiffusion.tokenizer import CLIPTokenizer
from nanodiffusion.weights.components import SDComponents, resolve_dtype
from nanodiffusion.weights.diffusers_folder import load_diffusers, load_vae_folder, save_diffusers
from nanodiffusion.weights.models import model_path
from nanodiffusion.weights.single_file import load_single_file, save_single_file
from nanodiffusion.weights.vae_file import load_vae_file

__all__ = ["SDComponents", "load_sd", "load_vae", "load_vae_file", "save_diffusers", "save_single_file"]


def load_sd(path_or_repo: str | Path, *, dtype: torch.dtype | str = torch.float32,
            device: str | torch.device = "cpu", variant: str | None = None, trust_pickle: bool = False,
            tokenizer: CLIPTokenizer | None = None,
            memory_format: torch.memory_format = torch.preserve_format) -> SDComponents:
    """Load SD v1.x or 2.x from a diffusers folder, a single `.safetensors` / `.ckpt` file, a Hub repo id or a
    built-in name (`models.model_path`).

    Weights are memory-mapped and converted tensor by tensor to `dtype` on `device`, conv weights to
    `memory_format` (one copy each, whatever changes). Pickle files need `trust_pickle=True`. `tokenizer`,
    when given, replaces the source's (a single file holds none).
    """
    dtype = resolve_dtype(dtype)
    path = model_path(path_or_repo, variant=variant)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            found = sorted(p.name for p in path.iterdir())[:10]
            raise UserError(f"{path} is not a diffusers folder (no model_index.json; it holds {found})")
        components = load_diffusers(path, dtype=dtype, device=device, variant=variant,
                                    memory_format=memory_format)
    elif variant is not None:
        raise UserError("variant selects files inside a diffusers folder; a single file has none")
    else:
        components = load_single_file(path, dtype=dtype, device=device, trust_pickle=trust_pickle,
                                      memory_format=memory_format)
    if tokenizer is not None:
        components.tokenizer = tokenizer
    return components


def load_vae(path: str | Path, *, dtype: torch.dtype | str = torch.float32,
             device: str | torch.device = "cpu", variant: str | None = None, trust_pickle: bool = False,
             memory_format: torch.memory_format = torch.preserve_format) -> torch.nn.Module:
    """Load an autoencoder to replace a model's: a diffusers folder (TAESD's AutoencoderTiny or an
    AutoencoderKL, `load_vae_folder`) or one VAE file (A1111's VAE files, `load_vae_file`)."""
    path, dtype = Path(path), resolve_dtype(dtype)
    if path.is_dir():
        return load_vae_folder(path, dtype=dtype, device=device, variant=variant, memory_format=memory_format)
    if variant is not None:
        raise UserError("variant selects files inside a diffusers folder; a single VAE file has none")
    return load_vae_file(path, dtype=dtype, device=device, trust_pickle=trust_pickle,
                         memory_format=memory_format)
