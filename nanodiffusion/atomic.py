"""Atomic file writes: a reader never sees a half-written file, even if the writer is killed."""

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Yield a binary file beside `path`; on success it is renamed over `path`, on error it is removed.

    The parent folder is created if needed. The rename (`os.replace`) is atomic on POSIX and Windows.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A random name in the same folder (same file system, so the rename is atomic); "xb" never clobbers
    # and, unlike tempfile.mkstemp's 0600, honours the umask like a plain open() would.
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(temp, "xb") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
