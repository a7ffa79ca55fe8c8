"""A standalone autoencoder file, as A1111's `--vae` takes one (`vae-ft-mse-840000-ema-pruned.safetensors`).

Such files hold only the VAE, in the original ldm layout (`encoder.down.0.block.0.conv1.weight`; some keep the
`first_stage_model.` prefix of a whole checkpoint) or in diffusers' (`encoder.down_blocks.0.resnets.0...`, a
`vae/diffusion_pytorch_model.safetensors` on its own). The config comes from our metadata when we wrote the
file, else from tensor shapes (32 GroupNorm groups and SD's scaling factor, as every released SD VAE).
"""

import json
from pathlib import Path

import torch

from nanodiffusion.errors import UserError
from nanodiffusion.nets.vae import AutoencoderKL, VAEConfig
from nanodiffusion.weights.components import build_on_meta, expected_shapes, materialize
from nanodiffusion.weights.diffusers_folder import _modern_vae_name
from nanodiffusion.weights.original_keys import PREFIXES, is_conv_as_linear, is_ignored, rename_table
from nanodiffusion.weights.safe_load import read_weights
from nanodiffusion.weights.single_file import METADATA_KEY, _count, infer_vae_config

# A key each layout always has: how the file is told apart.
ORIGINAL_KEY = "encoder.down.0.block.0.conv1.weight"
DIFFUSERS_KEY = "encoder.down_blocks.0.resnets.0.conv1.weight"


def load_vae_file(path: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                  trust_pickle: bool = False,
                  memory_format: torch.memory_format = torch.preserve_format) -> AutoencoderKL:
    """Load an AutoencoderKL from one `.safetensors` / `.ckpt` / `.pt` file (pickles need `trust_pickle`)."""
    path = Path(path)
    tensors, metadata = read_weights(path, trust_pickle=trust_pickle)
    prefix = PREFIXES["vae"]
    tensors = {key: value for key, value in tensors.items() if not is_ignored(key)}
    if any(key.startswith(prefix) for key in tensors):              # cut out of a whole checkpoint
        tensors = {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}
    stored = json.loads(metadata[METADATA_KEY]).get("vae") if METADATA_KEY in metadata else None
    if ORIGINAL_KEY in tensors:
        config = VAEConfig.from_dict(stored) if stored else _inferred(path, infer_vae_config, tensors)
        state = _from_original(tensors, config)
    elif DIFFUSERS_KEY in tensors:
        state = {_modern_vae_name(key): value for key, value in tensors.items()}
        config = VAEConfig.from_dict(stored) if stored else _inferred(path, infer_diffusers_vae_config, state)
    else:
        raise UserError(f"{path} is not an autoencoder file: neither {ORIGINAL_KEY} (original layout) nor "
                        f"{DIFFUSERS_KEY} (diffusers) is in it; first keys: {', '.join(sorted(tensors)[:5])}")
    return materialize("vae", config, state, dtype=dtype, device=device, what=str(path),
                       memory_format=memory_format)


def _inferred(path: Path, infer, tensors: dict[str, torch.Tensor]) -> VAEConfig:
    try:
        return infer({key: value.shape for key, value in tensors.items()})
    except (KeyError, ValueError) as error:
        raise UserError(f"{path}: cannot infer the autoencoder config from its tensor shapes ({error}); "
                        "what shapes cannot tell takes SD's values (32 GroupNorm groups)") from None


def infer_diffusers_vae_config(shapes: dict[str, torch.Size]) -> VAEConfig:
    """Autoencoder config from the shapes of diffusers-named keys."""
    levels = _count(set(shapes), "encoder.down_blocks.{}.")
    return VAEConfig(
        in_channels=shapes["encoder.conv_in.weight"][1], out_channels=shapes["decoder.conv_out.weight"][0],
        latent_channels=shapes["decoder.conv_in.weight"][1],
        block_channels=tuple(shapes[f"encoder.down_blocks.{i}.resnets.0.conv2.weight"][0]
                             for i in range(levels)),
        layers_per_block=_count(set(shapes), "encoder.down_blocks.0.resnets.{}."))


def _from_original(tensors: dict[str, torch.Tensor], config: VAEConfig) -> dict[str, torch.Tensor]:
    """The tensors under our names (through the one rename table); unknown keys are kept for the strict
    check to name. The attention's 1x1 convs become linears (views)."""
    prefix = PREFIXES["vae"]
    table = rename_table("vae", config, expected_shapes(build_on_meta("vae", config)))
    ours = {original[len(prefix):]: key for key, original in table.items()}
    state = {}
    for key, value in tensors.items():
        name = ours.get(key, key)
        if is_conv_as_linear("vae", name) and value.ndim == 4 and value.shape[2:] == (1, 1):
            value = value[:, :, 0, 0]
        state[name] = value
    return state
