"""Checks of single values from users, shared by the command line, the configs and the pipelines' public
calls: each failure is a UserError (UserTypeError for a wrong type) naming the argument, its value and what is
valid. The seed range is defined here, once, and so is the check that a request's estimated memory fits
this machine.
"""

import argparse
import json
import math
import os

import torch

from nanodiffusion.errors import UserError, UserTypeError

SEED_LIMIT = 2**64          # 0 <= seed < 2**64: what torch.Generator.manual_seed takes without wrapping


def check_int(name: str, value, minimum: int | None = None, maximum: int | None = None) -> int:
    """`value` when it is an int (not a bool) within [minimum, maximum]."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise UserTypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    _check_range(name, value, minimum, maximum)
    return value


def check_float(name: str, value, minimum: float | None = None, maximum: float | None = None, *,
                above: float | None = None) -> float:
    """`value` as a float when it is a finite real number within [minimum, maximum] (and > `above`)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise UserTypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise UserError(f"{name} must be a finite number, got {value}")
    if above is not None and not value > above:
        raise UserError(f"{name} must be > {above:g}, got {value:g}")
    _check_range(name, value, minimum, maximum)
    return float(value)


def _check_range(name: str, value, minimum, maximum) -> None:
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        valid = (f"between {minimum:g} and {maximum:g}" if minimum is not None and maximum is not None
                 else f">= {minimum:g}" if minimum is not None else f"<= {maximum:g}")
        raise UserError(f"{name} must be {valid}, got {value:g}")


def check_seed(seed, count: int = 1, name: str = "seed") -> int:
    """`seed` when seed, seed + 1, ..., seed + count - 1 all lie in 0 <= s < 2**64 (SEED_LIMIT)."""
    check_int(name, seed)
    if not 0 <= seed < SEED_LIMIT:
        raise UserError(f"{name} must be an integer from 0 to 2**64 - 1, got {seed}")
    if seed + count > SEED_LIMIT:
        raise UserError(f"{name} {seed} is too large for {count} images: image k has seed + k, which must "
                        f"stay below 2**64; use a {name} of at most {SEED_LIMIT - count}")
    return seed


def check_text(name: str, value) -> str:
    """`value` when it is a str that is valid Unicode (no lone surrogates, which invalid UTF-8 bytes on a
    command line become)."""
    if not isinstance(value, str):
        raise UserTypeError(f"{name} must be a string, got {value!r} ({type(value).__name__})")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise UserError(f"{name} is not valid text: character {error.start} is a lone surrogate "
                        f"({value[error.start]!r}), as invalid UTF-8 bytes become; write it in UTF-8") \
            from None
    return value


def json_object(text: str, what: str) -> dict:
    """The JSON object in `text`; a UserError saying `what` is damaged when it is not JSON or not an object."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise UserError(f"{what} is not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise UserError(f"{what} is a JSON {type(value).__name__}, not an object")
    return value


DEVICE_TYPES = ("cpu", "cuda", "mps")


def resolve_device(device: "str | torch.device | None") -> torch.device:
    """The torch.device of `device` ("cpu", "cuda", "cuda:1", "mps"; None: cuda if available, else cpu),
    refused with the reason when this machine or this PyTorch build cannot run on it."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, (str, torch.device)):
        raise UserTypeError(f"device must be a string such as 'cpu' or 'cuda', got {device!r}")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        resolved = None
    if resolved is None or resolved.type not in DEVICE_TYPES:
        raise UserError(f"unknown device {str(device)!r}; valid: cpu, cuda, cuda:N, mps")
    if resolved.type == "cuda":
        if torch.version.cuda is None and torch.version.hip is None:
            raise UserError(f"device {str(device)!r}: this PyTorch build has no CUDA support (CPU only); "
                            "use --device cpu, or install a CUDA build of PyTorch")
        count = torch.cuda.device_count()
        if count == 0 or (resolved.index or 0) >= count:
            raise UserError(f"device {str(device)!r}: {count} CUDA device(s) visible on this machine")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device {str(device)!r}: MPS (Apple GPUs) is not available here")
    return resolved


def finite_float(text: str) -> float:
    """An argparse `type` for float options: NaN and infinities are refused while parsing."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def available_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on `device` (Linux: MemAvailable, within a cgroup's limit); None when
    unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as file:
            free = next(int(line.split()[1]) * 1024 for line in file if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None
    try:
        with open("/sys/fs/cgroup/memory.max") as limit, open("/sys/fs/cgroup/memory.current") as used:
            free = min(free, int(limit.read()) - int(used.read()))
    except (OSError, ValueError):           # no cgroup v2, or "max": no limit
        pass
    return free


def check_fits(needed: int, device: torch.device, what: str, change: str) -> None:
    """A UserError when `needed` bytes exceed what `device` has free: it says both and what to `change`."""
    if os.environ.get("NANODIFFUSION_NO_MEMORY_CHECK"):
        return
    free = available_memory(device)
    if free is not None and needed > free:
        raise UserError(f"{what} needs about {needed / 2**30:.1f} GiB of memory, more than the "
                        f"{free / 2**30:.1f} GiB available on {device}: {change} "
                        "(NANODIFFUSION_NO_MEMORY_CHECK=1 skips this estimate)")
