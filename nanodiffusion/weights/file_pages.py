"""Give back the memory-mapped file pages of weights that were converted, so a conversion costs one copy.

Loading maps the weight file (see `safe_load`). A tensor used as it is stays those pages; a tensor converted to
another dtype or memory layout is read once, and its pages would then stay resident in the process (counted
in its RSS) until the whole mapping goes, although nothing reads them again. `convert` converts tensor by
tensor and drops the source's pages from the process right after each copy (`madvise(MADV_DONTNEED)`), so
loading an fp32 file as bf16, or re-laying conv weights out channels-last, peaks at the converted weights
plus one tensor instead of both copies (figures in benchmarks/README.md).

Only pages that still hold the file's own bytes are dropped: never anonymous memory, and never a page of
the mapping that was written to (such a page has become a private copy; /proc/self/pagemap tells). Dropped
pages read back from the file if anything touches them again, so sharing or aliasing tensors stay correct.
Elsewhere than Linux this does nothing.
"""

import ctypes
import mmap
import sys
from collections.abc import Callable

import numpy as np
import torch

_MADV_DONTNEED = 4                      # linux/mman-common.h
_PAGE = mmap.PAGESIZE


def file_mappings() -> list[tuple[int, int]]:
    """(start, end) address ranges of this process's mappings of regular files (Linux; [] elsewhere)."""
    if sys.platform != "linux":
        return []
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            # address perms offset dev inode path: a file mapping has an inode and an absolute path
            if len(fields) == 6 and fields[4] != "0" and fields[5].startswith("/") \
                    and not fields[5].startswith("/dev/"):
                start, end = (int(part, 16) for part in fields[0].split("-"))
                ranges.append((start, end))
    return ranges


def release(tensor: torch.Tensor, mappings: list[tuple[int, int]]) -> int:
    """Drop the whole pages inside `tensor`'s bytes from this process when they lie in one of `mappings`
    (file mappings, see `file_mappings`); returns the bytes dropped. The tensor stays valid (re-read on use)."""
    if tensor.device.type != "cpu" or not tensor.is_contiguous() and not _dense(tensor):
        return 0
    begin = tensor.data_ptr()
    end = begin + tensor.numel() * tensor.element_size()
    first, last = -(-begin // _PAGE) * _PAGE, end // _PAGE * _PAGE       # whole pages only: neighbours keep theirs
    if last <= first or not any(start <= first and last <= stop for start, stop in mappings):
        return 0
    if not _unwritten(first, last):
        return 0
    if _libc().madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED) != 0:
        return 0
    return last - first


def convert(tensors: dict[str, torch.Tensor], change: Callable[[torch.Tensor], torch.Tensor]
            ) -> dict[str, torch.Tensor]:
    """{key: change(tensor)}, one tensor at a time, releasing each source's file pages once it is copied."""
    changed = _releasing(change)
    return {key: changed(tensor) for key, tensor in tensors.items()}


def convert_module(module: torch.nn.Module, change: Callable[[torch.Tensor], torch.Tensor]) -> torch.nn.Module:
    """Replace every parameter's data and every buffer of `module` by change(it), as `module.to` does (one
    tensor at a time; Parameter objects stay the same), releasing each source's file pages once it is copied;
    returns the module."""
    changed = _releasing(change)
    with torch.no_grad():
        for submodule in module.modules():
            for parameter in submodule.parameters(recurse=False):
                parameter.data = changed(parameter.data)
            for name, buffer in submodule.named_buffers(recurse=False):
                setattr(submodule, name, changed(buffer))
    return module


def _releasing(change: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    mappings = file_mappings()

    def changed(tensor: torch.Tensor) -> torch.Tensor:
        result = change(tensor)
        if mappings and result.data_ptr() != tensor.data_ptr():
            release(tensor, mappings)
        return result
    return changed


def _unwritten(first: int, last: int) -> bool:
    """True when no page in [first, last) was written since it was mapped (so dropping it loses nothing).

    A write to a private file mapping turns the page into an anonymous copy; /proc/self/pagemap tells them
    apart (bit 63 present, 62 swapped, 61 file page: kernel Documentation/admin-guide/mm/pagemap.rst). When it
    cannot be read, nothing counts as unwritten.
    """
    try:
        with open("/proc/self/pagemap", "rb", buffering=0) as pagemap:
            pagemap.seek(first // _PAGE * 8)
            data = pagemap.read((last - first) // _PAGE * 8)
    except OSError:
        return False
    if len(data) != (last - first) // _PAGE * 8:
        return False
    entries = np.frombuffer(data, dtype=np.uint64)
    in_memory = (entries >> np.uint64(63)) | (entries >> np.uint64(62)) & np.uint64(1)
    file_page = (entries >> np.uint64(61)) & np.uint64(1)
    return not bool((in_memory & ~file_page & np.uint64(1)).any())


def _dense(tensor: torch.Tensor) -> bool:
    """True when the tensor's elements fill one gap-free block (e.g. channels_last), whatever their order."""
    return tensor.is_contiguous(memory_format=torch.channels_last) if tensor.ndim == 4 else False


_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
        _LIBC.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return _LIBC
