"""IDX files, the format of MNIST and Fashion-MNIST (http://yann.lecun.com/exdb/mnist/), plain or gzipped.

Layout: two zero bytes, a dtype code, the number of dimensions n, then n big-endian uint32 sizes and the
values in C order, big-endian.
"""

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from nanodiffusion.atomic import atomic_write
from nanodiffusion.errors import UserError

IDX_DTYPES = {                      # dtype code -> big-endian numpy dtype
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
GZIP_MAGIC = b"\x1f\x8b"


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (gzipped or not, told apart by content) into a native-endian numpy array.

    A missing, truncated or corrupt file raises `UserError` naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"IDX file not found: {path}")
    with open(path, "rb") as raw:
        is_gzip = raw.read(2) == GZIP_MAGIC
    try:
        with (gzip.open(path, "rb") if is_gzip else open(path, "rb")) as file:
            data = file.read()
    except (OSError, EOFError, zlib.error) as error:    # gzip.BadGzipFile is an OSError
        raise UserError(f"{path} is not a valid gzip file ({error}); delete it and fetch it again") from error
    try:
        return parse_idx(data)
    except UserError as error:
        raise UserError(f"{path} is not a valid IDX file: {error}") from None


def parse_idx(data: bytes) -> np.ndarray:
    """Decode the bytes of an (uncompressed) IDX file into a native-endian numpy array."""
    if len(data) < 4 or data[:2] != b"\x00\x00":
        raise UserError("wrong magic number (an IDX file starts with two zero bytes)")
    code, ndim = data[2], data[3]
    if code not in IDX_DTYPES:
        known = ", ".join(f"0x{c:02x}" for c in IDX_DTYPES)
        raise UserError(f"unknown dtype code 0x{code:02x} (known: {known})")
    if ndim == 0:
        raise UserError("zero dimensions")
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise UserError(f"truncated header ({len(data)} bytes, {ndim} dimensions need {header_size})")
    shape = struct.unpack(f">{ndim}I", data[4:header_size])
    dtype = IDX_DTYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    found = len(data) - header_size
    if found != expected:
        what = "truncated" if found < expected else "trailing bytes"
        raise UserError(f"{what}: shape {shape} needs {expected} data bytes, found {found}")
    array = np.frombuffer(data, dtype=dtype, offset=header_size).reshape(shape)
    return array.astype(dtype.newbyteorder("="))         # a writable, native-endian copy


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write `array` as an IDX file, gzipped when `path` ends with ".gz"; the write is atomic."""
    array = np.asarray(array)
    codes = {dtype.newbyteorder("="): code for code, dtype in IDX_DTYPES.items()}
    native = array.dtype.newbyteorder("=")
    if native not in codes:
        raise ValueError(f"IDX cannot store {array.dtype} (only uint8, int8, int16, int32, float32, float64)")
    if array.ndim == 0:
        raise ValueError("IDX needs at least one dimension")
    header = struct.pack(f">BBBB{array.ndim}I", 0, 0, codes[native], array.ndim, *array.shape)
    data = header + array.astype(IDX_DTYPES[codes[native]]).tobytes()
    with atomic_write(path) as file:
        if str(path).endswith(".gz"):
            # The header gets the final name, not the temporary one; mtime=0 makes the output reproducible.
            with gzip.GzipFile(Path(path).name, mode="wb", fileobj=file, mtime=0) as gz:
                gz.write(data)
        else:
            file.write(data)
