"""The models a server may serve, one loaded at a time: the built-in model, `--model`, and what `--models-dir`
folders hold (diffusers folders and `.safetensors` files, searched recursively).

Clients name a model by what `GET /sdapi/v1/sd-models` lists (its title, name or file name relative to its
folder); a name is looked up among the models found, never opened as a path, so no client can reach a file
outside the configured folders. Paths answered to clients are relative to their folder.
"""

import gc
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from nanodiffusion.errors import UserError
from nanodiffusion.pipelines.metadata import ModelRecord
from nanodiffusion.weights.models import BUILTIN_TEXT_TO_IMAGE, model_hash

log = logging.getLogger("nanodiffusion.server")
MAX_MODELS = 1000               # a folder scan stops there (a models dir pointed at / must not take forever)


@dataclass(frozen=True)
class ModelEntry:
    """A model that can be loaded: `filename` is what clients see (relative to its folder), `path` where
    it is."""

    filename: str
    path: Path

    @property
    def name(self) -> str:
        """A1111's model_name: the file's stem or the folder's name."""
        return Path(self.filename).stem if self.path.is_file() else Path(self.filename).name


def scan(dirs: list[Path], extra: dict[str, Path]) -> dict[str, ModelEntry]:
    """The models found, by filename: `extra` (name -> path), then the folders' diffusers folders (with a
    model_index.json) and .safetensors files."""
    found = {name: ModelEntry(name, path) for name, path in extra.items()}
    for root in dirs:
        for path in sorted(root.rglob("*")):
            if len(found) >= MAX_MODELS:
                log.warning("more than %d models under %s: the rest are not listed", MAX_MODELS, root)
                return found
            inside_model = any((parent / "model_index.json").is_file() for parent in path.parents
                                if parent != root and root in parent.parents)
            is_file = path.suffix == ".safetensors" and path.is_file()
            is_model = is_file or (path / "model_index.json").is_file()
            known = any(entry.path == path for entry in found.values())
            if is_model and not inside_model and not known:
                filename = path.relative_to(root).as_posix()
                found.setdefault(filename, ModelEntry(filename, path))
    return found


class ModelRegistry:
    """The models found and the one loaded (`pipe`, `served`): `switch(name)` loads another in its place
    with `load(path)`. Without `load` the registry holds the served model alone."""

    def __init__(self, pipe, served: ModelRecord, *, dirs: list[Path] = (),
                 load: Callable[[Path], object] | None = None):
        self.pipe, self.served, self.dirs, self.load = pipe, served, list(dirs), load
        self._extra = {name: path for name, path in BUILTIN_TEXT_TO_IMAGE.items() if path.exists() and load}
        if served.path not in self._extra.values():
            self._extra[Path(served.argument).name] = served.path
        self.hashes: dict[Path, str] = {served.path: served.hash} if served.hash else {}
        self.entries = scan(self.dirs, self._extra)
        self.current = next(entry for entry in self.entries.values() if entry.path == served.path)

    def refresh(self) -> None:
        """Scan the folders again (`POST /sdapi/v1/refresh-checkpoints`)."""
        self.entries = scan(self.dirs, self._extra)

    def title(self, entry: ModelEntry) -> str:
        """A1111's title: "filename [hash]", the hash once known (it is computed when the model loads)."""
        digest = self.hashes.get(entry.path)
        return f"{entry.filename} [{digest}]" if digest else entry.filename

    def find(self, name: str) -> ModelEntry:
        """The model a client names by title, filename or model name; a UserError listing them if none."""
        for entry in self.entries.values():
            if name in (self.title(entry), entry.filename, entry.name):
                return entry
        names = ", ".join(self.title(entry) for entry in self.entries.values())
        raise UserError(f"sd_model_checkpoint: no model {name!r} here; available: {names}")

    def switch(self, name: str) -> None:
        """Load the model called `name` in place of the current one (the worker calls this between jobs);
        when it fails to load, the previous model is loaded again and the error raised."""
        entry = self.find(name)
        if entry.path == self.current.path:
            return
        if self.load is None:
            raise UserError("sd_model_checkpoint: this server serves one model (start it with --models-dir "
                            "to switch)")
        previous = self.current
        self.pipe = None                                # one model in memory at a time
        gc.collect()
        try:
            self._activate(entry)
        except Exception as error:
            try:
                self._activate(previous)
            except Exception:                               # then every request answers 503, and says so
                log.exception("could not load %s again after %s failed", previous.filename, entry.filename)
            if isinstance(error, UserError):                # its message names the file: not its folder
                raise UserError(str(error).replace(str(entry.path), entry.filename)) from None
            raise

    def _activate(self, entry: ModelEntry) -> None:
        pipe = self.load(entry.path)
        if entry.path not in self.hashes:
            self.hashes[entry.path] = model_hash(entry.path)
        self.pipe, self.current = pipe, entry
        # the same dtype, device and adapter folders
        self.served = replace(self.served, argument=entry.filename, path=entry.path,
                              hash=self.hashes[entry.path], vae_tile=None)
