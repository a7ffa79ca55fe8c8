"""Download a file from a list of mirrors with an MD5 check, a progress bar and an atomic write."""

import hashlib
import http.client
import os
from pathlib import Path
from urllib.request import urlopen

from tqdm import tqdm

from nanodiffusion.atomic import atomic_write

CHUNK_BYTES = 1 << 16
TIMEOUT_S = 30


class DownloadError(Exception):
    """Every mirror failed; the message lists each URL with its reason."""


class _ChecksumError(Exception):
    pass


def download_file(urls: list[str] | tuple[str, ...], path: str | os.PathLike, md5: str) -> Path:
    """Fetch the first of `urls` that answers with bytes whose MD5 is `md5`, and save them at `path`.

    Raises `DownloadError` when all mirrors fail; nothing is left at `path` (or beside it) then.
    """
    path = Path(path)
    failures = []
    for url in urls:
        try:
            _fetch(url, path, md5)
            return path
        except (OSError, http.client.HTTPException, _ChecksumError) as error:  # URLError is an OSError
            failures.append(f"{url}: {error}")
    raise DownloadError("; ".join(failures))


def _fetch(url: str, path: Path, md5: str) -> None:
    """Stream `url` into a temporary file that replaces `path` only if the MD5 matches."""
    digest = hashlib.md5()
    with urlopen(url, timeout=TIMEOUT_S) as response, atomic_write(path) as file:
        size = response.headers.get("Content-Length")
        with tqdm(total=int(size) if size else None, unit="B", unit_scale=True, unit_divisor=1024,
                  desc=path.name) as bar:
            while chunk := response.read(CHUNK_BYTES):
                digest.update(chunk)
                file.write(chunk)
                bar.update(len(chunk))
        if digest.hexdigest() != md5:              # raising inside atomic_write discards the temporary file
            raise _ChecksumError(f"MD5 mismatch (got {digest.hexdigest()}, expected {md5})")
