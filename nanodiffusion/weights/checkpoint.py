"""Single-file checkpoints: tensors in safetensors, configs and counters as JSON in its metadata.

One file per checkpoint, written through `atomic_write`: a crash leaves either the old checkpoint or the new one,
never a torn file. A SHA-256 of the tensors, stored beside the metadata, finds bytes changed since (a bad disk
or copy) when the file is read.
"""

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from nanodiffusion.atomic import atomic_write
from nanodiffusion.errors import UserError
from nanodiffusion.validation import json_object
from nanodiffusion.weights.components import check_state_dict, expected_shapes

METADATA_KEY = "nanodiffusion"
CHECKSUM_KEY = "nanodiffusion_tensors_sha256"      # a second header entry: older files have none


def save_checkpoint(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict) -> None:
    """Atomically write `tensors` (contiguous CPU copies) and JSON `metadata` to one safetensors file."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    header = {METADATA_KEY: json.dumps(metadata), CHECKSUM_KEY: tensors_digest(tensors)}
    with atomic_write(path) as file:
        save_file(tensors, file.name, metadata=header)


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Return (tensors, metadata) of a file written by `save_checkpoint`; clear errors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        tensors = load_file(path)
        with safe_open(path, framework="pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable safetensors checkpoint ({e})") from None
    if METADATA_KEY not in header:
        raise UserError(f"{path} is a safetensors file but not a nanodiffusion checkpoint (no config in it)")
    if CHECKSUM_KEY in header and header[CHECKSUM_KEY] != tensors_digest(tensors):
        raise UserError(f"{path} is corrupted: its tensors differ from the checksum stored when it was "
                        "written (a disk or copy error); use another checkpoint or copy it again")
    metadata = json_object(header[METADATA_KEY], f"{path} is damaged: its {METADATA_KEY!r} metadata")
    return tensors, metadata


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """Hex SHA-256 of `tensors` in key order: each name, dtype, shape and the raw bytes."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def require(metadata: dict, path: str | os.PathLike, *keys: str) -> None:
    """A UserError naming `path` and the first of `keys` its metadata lacks."""
    for key in keys:
        if key not in metadata:
            raise UserError(f"{path} is damaged or not this kind of checkpoint: its metadata has no {key!r}")


def load_module(module: torch.nn.Module, tensors: dict[str, torch.Tensor], prefix: str,
                path: str | os.PathLike) -> None:
    """Load the `prefix.*` tensors into `module`, strictly; a UserError naming the file and the keys that
    are missing, unexpected or of the wrong shape."""
    state = unprefixed(prefix, tensors)
    check_state_dict(expected_shapes(module), state, f"{path} ({prefix!r} tensors)")
    module.load_state_dict(state)              # copies into the module's tensors, casting fp16/bf16 exports


def prefixed(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in state.items()}


def unprefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    start = len(prefix) + 1
    return {k[start:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer's state_dict into tensors (for safetensors) and JSON-safe rest (no pickle)."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for param_id, param_state in state["state"].items():
        for name, value in param_state.items():
            if torch.is_tensor(value):
                tensors[f"{param_id}.{name}"] = value
            else:
                scalars[f"{param_id}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Load what `optimizer_to_tensors` produced back into `optimizer`."""
    state: dict[int, dict] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        param_id, name = key.split(".", 1)
        state.setdefault(int(param_id), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
