"""Load and save ControlNets: a diffusers folder (config.json + diffusion_pytorch_model.safetensors) or an
original single file (`control_v11p_sd15_canny.pth` / `.safetensors`; pickles only with trust_pickle).

A single file's config comes from its metadata when we wrote it, otherwise from tensor shapes; what shapes
cannot tell (head counts, GroupNorm groups, fp32 attention) is the UNet's when one is given (a ControlNet
is a copy of its UNet's encoder), else SD v1.x's, and residual pooling is on for "shuffle" files, as in
A1111. Files of other kinds are named, not half-loaded.
"""

import dataclasses
import json
from pathlib import Path

import torch

from nanodiffusion.errors import UserError
from nanodiffusion.nets.controlnet import ControlNet, ControlNetConfig
from nanodiffusion.nets.sd_unet import SDUNetConfig
from nanodiffusion.weights.components import (build_on_meta, check_state_dict, expected_shapes, materialize,
                                              resolve_dtype)
from nanodiffusion.weights.controlnet_keys import PREFIX, SD_PREFIXES, infer_hint_channels, original_names
from nanodiffusion.weights.diffusers_folder import WEIGHT_NAMES, read_component, read_json, write_json
from nanodiffusion.weights.original_keys import is_ignored
from nanodiffusion.weights.safe_load import read_weights, write_safetensors
from nanodiffusion.weights.single_file import METADATA_KEY, infer_unet_config


def load_controlnet(path: str | Path, *, dtype: torch.dtype | str = torch.float32,
                    device: str | torch.device = "cpu", variant: str | None = None,
                    trust_pickle: bool = False, unet: SDUNetConfig | None = None,
                    memory_format: torch.memory_format = torch.preserve_format) -> ControlNet:
    """Load a ControlNet from a diffusers folder or an original single file, in `dtype` on `device`.

    With `unet` (the config of the model it will steer), a ControlNet made for another model family or
    shape fails here with a message naming both.
    """
    dtype, path = resolve_dtype(dtype), Path(path)
    if not path.exists():
        raise UserError(f"no such ControlNet file or folder: {path}")
    if path.is_dir():
        config, state = _read_folder(path, variant)
    elif variant is not None:
        raise UserError("variant selects files inside a diffusers folder; a single file has none")
    else:
        config, state = _read_single_file(path, trust_pickle, unet)
    if unet is not None:
        try:
            config.check_fits(unet)
        except UserError as error:
            raise UserError(f"{path}: {error}") from None
    return materialize("controlnet", config, state, dtype=dtype, device=device, what=str(path),
                       memory_format=memory_format)


def _read_folder(folder: Path, variant: str | None) -> tuple[ControlNetConfig, dict[str, torch.Tensor]]:
    if not (folder / "config.json").is_file():
        inside = " (a pipeline folder: pass its controlnet/ subfolder)" \
            if (folder / "controlnet" / "config.json").is_file() else ""
        raise UserError(f"{folder} is not a diffusers ControlNet folder: it has no config.json{inside}")
    config = ControlNetConfig.from_diffusers_config(read_json(folder / "config.json"))
    return config, read_component(folder, "controlnet", variant)


def _read_single_file(path: Path, trust_pickle: bool,
                      unet: SDUNetConfig | None) -> tuple[ControlNetConfig, dict[str, torch.Tensor]]:
    """The config and the tensors under our names; the file's keys are checked in its own names."""
    tensors, metadata = read_weights(path, trust_pickle=trust_pickle)
    prefix = identify_controlnet(path, {key: value.shape for key, value in tensors.items()})
    if METADATA_KEY in metadata:
        config = ControlNetConfig.from_dict(json.loads(metadata[METADATA_KEY]))
    else:
        shapes = {key[len(prefix):]: value.shape for key, value in tensors.items() if key.startswith(prefix)}
        # shapes cannot tell that a ControlNet pools its residuals: A1111 goes by the file's name
        pooled = "shuffle" in path.name.lower()                 # control_v11e_sd15_shuffle
        config = dataclasses.replace(infer_controlnet_config(shapes, unet), global_pool=pooled)
    shapes = expected_shapes(build_on_meta("controlnet", config))
    table = original_names(config, shapes, prefix)
    # v1.0 files hold a whole SD model beside `control_model.*`: not read, as the training leftovers
    found = {key: value for key, value in tensors.items()
             if not is_ignored(key) and not (prefix and key.startswith(SD_PREFIXES))}
    check_state_dict({table[key]: shape for key, shape in shapes.items()}, found, str(path))
    return config, {ours: found[original] for ours, original in table.items()}


def identify_controlnet(path: Path, shapes: dict[str, torch.Size]) -> str:
    """The prefix of the ControlNet keys (`control_model.` or none); other kinds of files raise a UserError
    that names them."""
    keys = set(shapes)
    if "difference" in keys:
        raise UserError(f"{path} is a 'difference' ControlNet (stored as changes to a base model's weights), "
                        "which is not supported: use the plain version of this ControlNet")
    if "lora_controlnet" in keys:
        raise UserError(f"{path} is a Control-LoRA (low-rank changes to an SDXL UNet), not a ControlNet")
    if any(key.startswith(PREFIX) for key in keys):
        prefix = PREFIX
    elif "input_hint_block.0.weight" in keys:
        prefix = ""
    else:
        raise UserError(f"{path} holds no ControlNet ({PREFIX}*, input_hint_block.*): {_other_kind(keys)}")
    contexts = {shapes[key][1] for key in keys
                if key.startswith(prefix) and key.endswith("attn2.to_k.weight")}
    if f"{prefix}label_emb.0.0.weight" in keys or 2048 in contexts:
        raise UserError(f"{path} is an SDXL ControlNet; only SD v1.x and 2.x ControlNets are supported")
    return prefix


def _other_kind(keys: set[str]) -> str:
    if "add_embedding.linear_1.weight" in keys:
        return "it is an SDXL ControlNet in diffusers' layout; only SD v1.x and 2.x ControlNets are supported"
    if "controlnet_cond_embedding.conv_in.weight" in keys:
        return ("it holds the weights of a diffusers ControlNet: pass the folder that holds them with "
                "their config.json")
    if any(key.startswith("model.diffusion_model.") for key in keys):
        return "it is a Stable Diffusion model, not a ControlNet"
    if any("lora" in key for key in keys):
        return "it looks like a LoRA"
    return f"first keys: {', '.join(sorted(keys)[:5])}"


def infer_controlnet_config(shapes: dict[str, torch.Size],
                            unet: SDUNetConfig | None = None) -> ControlNetConfig:
    """ControlNet config from original-layout shapes (keys without prefix); what shapes cannot tell is
    `unet`'s, else SD v1.x's (8 heads, 32 groups)."""
    try:
        # the encoder copy is read as the UNet it came from; it has no output conv, so give it one
        output = {"out.2.weight": torch.Size([shapes["input_blocks.0.0.weight"][1]])}
        encoder = dataclasses.replace(infer_unet_config({**shapes, **output}), sample_size=None)
        if unet is not None:
            encoder = dataclasses.replace(encoder, num_heads=unet.num_heads, norm_groups=unet.norm_groups,
                                          upcast_attention=unet.upcast_attention)
        channels, widths = infer_hint_channels(shapes)
        return ControlNetConfig(unet=encoder, conditioning_channels=channels, embedding_channels=widths)
    except KeyError as error:
        raise UserError(f"cannot infer the ControlNet config: {error.args[0]} is missing") from None


def to_original(controlnet: ControlNet, prefix: str = PREFIX) -> dict[str, torch.Tensor]:
    """The ControlNet's weights under their original single-file names (views, no copies)."""
    state = controlnet.state_dict()
    table = original_names(controlnet.config, state, prefix)
    return {original: state[key] for key, original in table.items()}


def save_controlnet(controlnet: ControlNet, path: str | Path) -> None:
    """Write a diffusers folder (a path without suffix) or an original-layout `.safetensors` file that
    carries its config in the metadata."""
    path = Path(path)
    if path.suffix == ".safetensors":
        metadata = {"format": "pt", METADATA_KEY: json.dumps(controlnet.config.to_dict())}
        write_safetensors(to_original(controlnet), path, metadata=metadata)
    elif path.suffix:
        raise UserError(f"a ControlNet is saved as a folder or a .safetensors file, got {path.name!r}")
    else:
        write_safetensors(controlnet.state_dict(), path / f"{WEIGHT_NAMES['controlnet']}.safetensors",
                          metadata={"format": "pt"})
        write_json(path / "config.json", controlnet.config.to_diffusers_config())   # last: marks it complete
