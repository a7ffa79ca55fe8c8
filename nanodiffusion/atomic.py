"""Atomic file writes: a reader never sees a half-written file, even if the writer is killed; and the checks
that an output can be written at all, made before any work starts.
"""

import contextlib
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from nanodiffusion.errors import UserError

_TEMPORARY = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp$")        # atomic_write's temporary names


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Yield a binary file beside `path`; on success it is renamed over `path`, on error it is removed.

    The parent folder is created if needed. The rename (`os.replace`) is atomic on POSIX and Windows. The file
    gets the permissions of a plain open() under the user's umask. A write that fails (full disk, no
    permission) is a UserError naming the file.
    """
    path = Path(path)
    _refuse_non_file(path, "the output")
    # A random name in the same folder (same file system, so the rename is atomic); "xb" never clobbers.
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(temp, "xb") as file:
            mode = os.fstat(file.fileno()).st_mode & 0o777          # what the umask allows
            yield file
            file.flush()
            os.fsync(file.fileno())
        # writers that reopen the file by name (safetensors' save_file) leave it 0600: back to the umask's
        os.chmod(temp, mode)
        os.replace(temp, path)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        if isinstance(error, OSError):
            raise UserError(f"could not write {path}: {error.strerror or error}") from error
        raise


def check_output_file(path: str | os.PathLike, what: str, *, size: int = 0,
                      suffix: str | None = None) -> Path:
    """`path` when a file can be written there (its folder created if missing), with `size` bytes free and
    the file type's `suffix` (".png": what is written is a PNG): else a UserError saying why. `what` names
    the output in the message (e.g. "--out")."""
    path = _nonempty(path, what)
    if path.name in ("", ".", "..") or path.is_dir():
        raise UserError(f"{what} {path} is a folder: give a file name")
    if suffix is not None and path.suffix.lower() != suffix:
        raise UserError(f"{what} must name a {suffix} file (that is what is written), got {path}")
    _refuse_non_file(path, what)
    _check_folder(path.parent, what, size)
    return path


def check_output_folder(path: str | os.PathLike, what: str, *, size: int = 0) -> Path:
    """`path` when files can be written in that folder (created if missing), with `size` bytes free."""
    path = _nonempty(path, what)
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path} is a file, not a folder")
    _check_folder(path, what, size)
    return path


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that writers killed inside atomic_write left under `folder`; return them."""
    folder = Path(folder)
    stale = [path for path in folder.rglob(".*.tmp") if _TEMPORARY.match(path.name) and path.is_file()] \
        if folder.is_dir() else []
    for path in stale:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    return stale


def _nonempty(path: str | os.PathLike, what: str) -> Path:
    if str(path) == "":                 # Path("") is the current folder: an empty flag is a mistake
        raise UserError(f"{what} is empty: give a path")
    return Path(path)


def _refuse_non_file(path: Path, what: str) -> None:
    # os.replace would put a regular file in place of a device (/dev/full), a pipe or a socket
    if path.exists() and not path.is_file():
        kind = "a folder" if path.is_dir() else "not a regular file (a device, pipe or socket)"
        raise UserError(f"{what} {path} exists and is {kind}: give the path of a file to write")


def _check_folder(folder: Path, what: str, size: int) -> None:
    """The nearest existing folder of `folder` (atomic_write makes the rest) accepts a new file and has
    `size` bytes free."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"cannot write {what} in {folder}: {existing} is a file, not a folder")
    try:        # os.access says yes to root on a read-only mount: create a file to know
        handle, probe = tempfile.mkstemp(dir=existing, prefix=".nanodiffusion-write-test-")
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise UserError(f"cannot write {what} in {folder}: {existing} does not accept new files "
                        f"({error.strerror or error})") from None
    free = shutil.disk_usage(existing).free
    if free < size:
        raise UserError(f"not enough room for {what} in {folder}: it needs about {size / 2**20:,.1f} MiB, "
                        f"{free / 2**20:,.1f} MiB are free on that disk")
