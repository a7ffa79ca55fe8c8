"""AUTOMATIC1111's way of naming LoRAs: a folder of `.safetensors` files (`--lora-dir`), and
`<lora:NAME:WEIGHT>` in a prompt, which applies NAME.safetensors from that folder with that weight for this
generation. The tags come out of the text before it is tokenized.

    "a fox in a forest <lora:papercut:0.8>"  ->  "a fox in a forest ", {"papercut": 0.8}

A1111 records the LoRAs an image used as `Lora hashes: "papercut: 3f2a9b1c04de"`: the first 12 hex digits of
the sha256 of the file's tensor bytes (all after the safetensors header, as sd-webui-additional-networks and
kohya's sd-scripts hash them, so that editing the metadata keeps the hash).
"""

import functools
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

from nanodiffusion.adapters.lora import LoRAAdapters
from nanodiffusion.adapters.lora_files import read_lora_file
from nanodiffusion.adapters.lora_targets import resolve_targets
from nanodiffusion.errors import UserError
from nanodiffusion.weights.safe_load import check_safetensors

# A1111's extra-network syntax <KIND:ARGS>; "lyco" is an alias of "lora" there since A1111 1.5.
_TAG = re.compile(r"<(\w+):([^>]+)>")
_LORA_KINDS = ("lora", "lyco")
MAX_LORA_FILES = 10_000                 # a folder scan stops there (a --lora-dir pointed at / must end)


def split_lora_tags(prompt: str) -> tuple[str, dict[str, float]]:
    """The prompt without its `<lora:NAME>` / `<lora:NAME:WEIGHT>` tags, and {NAME: WEIGHT} (weight 1 by
    default; a name given twice adds up). Other extra networks (<hypernet:...>) are a UserError."""
    loras: dict[str, float] = {}

    def take(match: re.Match) -> str:
        kind, args = match.group(1).lower(), match.group(2).split(":")
        if kind not in _LORA_KINDS:
            raise UserError(f"{match.group(0)} in the prompt: extra networks of kind {kind!r} are not "
                            "supported (only <lora:NAME:WEIGHT>)")
        name = args[0].strip()
        if len(args) > 2:
            raise UserError(f"{match.group(0)}: separate text-encoder and UNet weights are not supported; "
                            "write <lora:NAME:WEIGHT>")
        try:
            weight = float(args[1]) if len(args) == 2 and args[1].strip() else 1.0
        except ValueError:
            raise UserError(f"{match.group(0)}: the weight must be a number, got {args[1]!r}") from None
        if not name:
            raise UserError(f"{match.group(0)}: the LoRA has no name")
        loras[name] = loras.get(name, 0.0) + weight
        return ""

    return _TAG.sub(take, prompt), loras


@functools.lru_cache(maxsize=256)
def _hash(path: Path, size: int, mtime_ns: int) -> str:
    with open(path, "rb") as file:
        header_length = int.from_bytes(file.read(8), "little")
        file.seek(8 + header_length)
        digest = hashlib.sha256()
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def lora_hash(path: str | Path) -> str:
    """A1111's short hash of a LoRA `.safetensors` file (see the module docstring); remembered per file
    version (path, size, modification time)."""
    path = Path(path).resolve()
    stat = path.stat()
    return _hash(path, stat.st_size, stat.st_mtime_ns)


class LoRAFolder:
    """The `.safetensors` files under `folder` (searched recursively), each named by its stem as
    `<lora:NAME>` names it; paths relative to the folder are what clients see."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise UserError(f"--lora-dir {folder} is not a folder")

    def files(self) -> dict[str, list[Path]]:
        """{name: [paths]}: more than one path when files in different subfolders share a stem."""
        found: dict[str, list[Path]] = {}
        for k, path in enumerate(sorted(self.folder.rglob("*.safetensors"))):
            if k == MAX_LORA_FILES:
                break
            if path.is_file():
                found.setdefault(path.stem, []).append(path)
        return found

    def path(self, name: str) -> Path:
        """The file of `<lora:name>`; a UserError naming the folder's LoRAs when there is none, or two."""
        files = self.files()
        if name not in files:
            known = ", ".join(sorted(files)[:20]) or "none"
            raise UserError(f"<lora:{name}>: no LoRA {name!r} in the LoRA folder (no {name}.safetensors); "
                            f"available: {known}")
        if len(files[name]) > 1:
            where = ", ".join(path.relative_to(self.folder).as_posix() for path in files[name])
            raise UserError(f"<lora:{name}>: two LoRA files have that name ({where}): rename one")
        return files[name][0]

    def listing(self) -> list[dict]:
        """A1111's `GET /sdapi/v1/loras`: name, alias, path (relative to the folder) and header metadata."""
        return [{"name": name, "alias": name, "path": path.relative_to(self.folder).as_posix(),
                 "metadata": _metadata(path)}
                for name, paths in self.files().items() for path in paths]


def _metadata(path: Path) -> dict:
    """The header's `__metadata__` ({} for a file that cannot be read: the listing still names it)."""
    try:
        return check_safetensors(path).get("__metadata__") or {}
    except UserError:
        return {}


@dataclass
class PromptLoRAs:
    """Applies the `<lora:...>` tags of a generation's prompts to `adapters`, from `folder`: the LoRAs the
    caller made active stay so, the tags' join them for this generation (and leave at the next)."""

    adapters: LoRAAdapters
    folder: LoRAFolder | None = None
    from_tags: set[str] = field(default_factory=set)    # adapters loaded for tags, not by the caller

    def apply(self, prompts: list[str]) -> list[str]:
        """Activate the LoRAs the prompts name (all prompts of a batch must name the same ones) and return
        the prompts without their tags."""
        texts, tags = self._parse(prompts)
        if not tags and not self.from_tags:
            return texts
        wanted = {name: weight for name, weight in self.adapters.active.items() if name not in self.from_tags}
        for name, weight in tags.items():
            if name not in self.adapters.adapters:
                self.adapters.load_lora_weights(self.folder.path(name), adapter_name=name)
                self.from_tags.add(name)
            wanted[name] = wanted.get(name, 0.0) + weight
        if wanted != self.adapters.active:
            self.adapters.set_adapters(list(wanted), list(wanted.values()))
        unused = [name for name in self.from_tags if name not in wanted]
        if unused:                                      # a server meets many LoRAs: keep only those in use
            self.adapters.delete_adapters(unused)
            self.from_tags -= set(unused)
        return texts

    def check(self, prompts: list[str]) -> None:
        """Raise the UserError that `apply` would for these prompts' tags (unknown names, files that are no
        LoRA for this model), without changing the model."""
        _, tags = self._parse(prompts)
        for name in tags:
            if name not in self.adapters.adapters:
                resolve_targets(read_lora_file(self.folder.path(name)), self.adapters.networks)

    def hashes(self) -> dict[str, str]:
        """{name: A1111 short hash} of the active LoRAs (weight != 0): the image's "Lora hashes"."""
        return {name: lora_hash(self.adapters.adapters[name].file.path)
                for name, weight in self.adapters.active.items() if weight}

    def _parse(self, prompts: list[str]) -> tuple[list[str], dict[str, float]]:
        texts, tag_sets = zip(*(split_lora_tags(prompt) for prompt in prompts))
        if any(tags != tag_sets[0] for tags in tag_sets):
            raise UserError("the prompts of one batch name different LoRAs (<lora:...>): generate them "
                            "separately")
        if tag_sets[0] and self.folder is None:
            name = next(iter(tag_sets[0]))
            raise UserError(f"the prompt names <lora:{name}> but no LoRA folder is set (--lora-dir, or "
                            "pipe.set_lora_dir(folder))")
        return list(texts), tag_sets[0]
