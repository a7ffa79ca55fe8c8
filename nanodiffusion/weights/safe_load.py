"""Read weight files safely: sniff what a file really is, refuse pickles by default, explain bad downloads.

Tensors come back memory-mapped (safetensors via `safe_open`, pickles via `torch.load(mmap=True)`): nothing
is copied until a tensor is converted or moved, so loading never holds a second copy of the weights.
"""

import json
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from nanodiffusion.atomic import atomic_write
from nanodiffusion.errors import UserError

SAFETENSORS, PICKLE = "safetensors", "pickle"
_LFS_POINTER = b"version https://git-lfs.github.com/spec/v1"
_MAX_HEADER = 100_000_000           # safetensors' own limit on the JSON header
_REDOWNLOAD = "download it again (a browser or a proxy may have saved an error page, or stopped early)"


def sniff(path: str | Path) -> str:
    """SAFETENSORS or PICKLE, judged by the file's first bytes (never by its suffix); other content fails."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no such file: {path}")
    size = path.stat().st_size
    with open(path, "rb") as file:
        head = file.read(1024)
    if size == 0:
        raise UserError(f"{path} is empty: {_REDOWNLOAD}")
    if head.startswith(_LFS_POINTER):
        raise UserError(f"{path} is a Git LFS pointer ({size} bytes of text), not the weights: the clone was "
                        "made without git-lfs. Run `git lfs install && git lfs pull` in it, or download the "
                        "file itself")
    text = head.lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html", b"<?xml")) or b"<html" in text[:200]:
        raise UserError(f"{path} is an HTML page, not weights (a login, 404 or error page saved under the "
                        f"file's name): {_REDOWNLOAD}; gated models need you to accept their license first")
    if text.startswith(b"{"):
        raise UserError(f"{path} holds JSON text, not weights (often a server error message): "
                        f"{head[:200].decode('utf-8', 'replace')!r}")
    # safetensors first: its 8-byte header length may well start with byte 0x80 (e.g. 2944 = 0x0b80)
    header_size = int.from_bytes(head[:8], "little") if len(head) >= 8 else 0
    if 2 <= header_size <= _MAX_HEADER and head[8:9] == b"{":
        return SAFETENSORS
    if head.startswith(b"PK\x03\x04") or head.startswith(b"\x80"):
        return PICKLE                # torch.save's zip archive, or the legacy raw pickle (protocol >= 2)
    raise UserError(f"{path} is neither a safetensors file nor a PyTorch checkpoint "
                    f"(it starts with {head[:16]!r}): {_REDOWNLOAD}")


def check_safetensors(path: Path) -> dict:
    """Parse a safetensors header and check the file holds all the data it announces; return the header."""
    size = path.stat().st_size
    with open(path, "rb") as file:
        header_size = int.from_bytes(file.read(8), "little")
        raw = file.read(header_size)
    if len(raw) < header_size:
        raise UserError(f"{path} is truncated inside its header ({size} bytes): {_REDOWNLOAD}")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{path} has a corrupt safetensors header ({error}): {_REDOWNLOAD}") from None
    ends = [entry["data_offsets"][1] for name, entry in header.items()
            if name != "__metadata__" and isinstance(entry, dict) and "data_offsets" in entry]
    expected = 8 + header_size + max(ends, default=0)
    if size < expected:
        raise UserError(f"{path} is truncated: it has {size:,} bytes but its header describes {expected:,} "
                        f"({100 * size / expected:.0f}% downloaded): {_REDOWNLOAD}")
    return header


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a safetensors file, memory-mapped (no copy), and its `__metadata__` strings."""
    path = Path(path)
    check_safetensors(path)
    try:
        with safe_open(path, framework="pt", device="cpu") as file:
            # get_tensor maps the file's bytes: each tensor keeps the mapping alive after the file closes
            tensors = {name: file.get_tensor(name) for name in file.keys()}
            metadata = file.metadata() or {}
    except SafetensorError as error:
        raise UserError(f"{path} is not a valid safetensors file ({error}): {_REDOWNLOAD}") from None
    return tensors, metadata


def read_pickle(path: str | Path) -> dict:
    """`torch.load(weights_only=True)` of a pickle checkpoint, memory-mapped where the format allows.

    weights_only unpickles tensors and plain containers only, so no code stored in the file runs; a file
    that needs more (a training run's full state) is refused with an explanation.
    """
    path = Path(path)
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error) and "zip" not in str(error):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)   # legacy (pre-1.6) format
    except pickle.UnpicklingError as error:
        # torch's message is long; its line "WeightsUnpickler error: Unsupported global: ..." names the object
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        reason = next((line for line in lines if "Unsupported" in line), lines[-1] if lines else "no reason")
        raise UserError(
            f"{path} holds Python objects besides tensors, which a weights-only load refuses "
            f"({reason.split('. Please use')[0]}). Reading it fully "
            "would run code stored in the file, which nanodiffusion never does. If you trust it, extract its "
            "state dict elsewhere (torch.load(..., weights_only=False)['state_dict']) and save that with "
            "safetensors.torch.save_file") from None
    except (EOFError, RuntimeError) as error:
        first_sentence = str(error).split(". ")[0]
        raise UserError(f"{path} is a damaged or truncated PyTorch checkpoint ({first_sentence}): "
                        f"{_REDOWNLOAD}") from None


def refuse_pickle(path: Path) -> None:
    """Raise the message that explains why a pickle is not loaded without the trust flag."""
    raise UserError(f"{path} is a pickle checkpoint: unpickling can run code hidden in the file. Prefer a "
                    f".safetensors version of the model. If you trust the file's source, pass "
                    f"trust_pickle=True in Python; on the command line convert the model once and use the "
                    f"copy: nanodiffusion convert --trust-pickle MODEL COPY (COPY: a .safetensors file or a "
                    f"folder). It is then read with torch.load(weights_only=True), which only accepts "
                    f"tensors and plain containers")


def read_weights(path: str | Path, *, trust_pickle: bool) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of one weight file of either format; pickles need `trust_pickle`."""
    path = Path(path)
    if sniff(path) == SAFETENSORS:
        return read_safetensors(path)
    if not trust_pickle:
        refuse_pickle(path)
    loaded = read_pickle(path)
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]      # the original (PyTorch Lightning) layout wraps the weights
    if not isinstance(loaded, dict):
        raise UserError(f"{path} holds a {type(loaded).__name__}, not a state dict of tensors")
    tensors = {key: value for key, value in loaded.items() if isinstance(value, torch.Tensor)}
    if not tensors:
        raise UserError(f"{path} holds no tensors (keys: {sorted(map(str, loaded))[:10]})")
    return tensors, {}


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> None:
    """Write `tensors` as a safetensors file atomically (a reader never sees a half-written file)."""
    with atomic_write(path) as file:
        # save_file streams each tensor to the (empty) temporary file by name; safetensors.torch.save would
        # first build the whole file in memory, a second copy of the weights
        save_file({key: value.contiguous() for key, value in tensors.items()}, file.name, metadata=metadata)
