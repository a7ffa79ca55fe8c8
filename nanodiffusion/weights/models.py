"""Where a model comes from: a built-in name, a local file or folder, or a Hugging Face repo id ("owner/name",
fetched with huggingface_hub); and A1111's "Model hash" of its weight files, remembered in a cache.
"""

import hashlib
import json
import os
import re
from pathlib import Path

from nanodiffusion.atomic import atomic_write
from nanodiffusion.errors import UserError, UserTypeError

BUILTIN_DIR = Path(__file__).resolve().parent.parent / "builtin"
BUILTIN_DDPM = {"fashion-mnist": BUILTIN_DIR / "fashion_mnist_ddpm.safetensors"}    # for `sample`, `eval`
BUILTIN_TEXT_TO_IMAGE = {"builtin": BUILTIN_DIR / "text_to_image"}                  # for `generate`, `serve`
DEFAULT_TEXT_TO_IMAGE = "builtin"
WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".bin", ".pt", ".pth")
CACHE_ENV_VAR = "NANODIFFUSION_CACHE"        # folder of the model-hash cache (default ~/.cache/nanodiffusion)
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def model_path(model: str | Path, *, variant: str | None = None) -> Path:
    """The local file or folder of a model argument: a built-in name, an existing path, or a Hub repo id
    (downloaded to the Hugging Face cache; `variant` picks its *.VARIANT.safetensors files)."""
    if not isinstance(model, (str, os.PathLike)):
        raise UserTypeError(f"the model must be a path, a built-in name or a repo id, got {model!r}")
    name = str(model)
    for kind, builtin in (("DDPM", BUILTIN_DDPM), ("text-to-image", BUILTIN_TEXT_TO_IMAGE)):
        if name in builtin:
            if not builtin[name].exists():
                raise UserError(f"the built-in {kind} model ({name!r}) is not shipped yet (or was removed): "
                                "pass --model with a diffusers folder, a .safetensors/.ckpt file or a Hugging "
                                "Face repo id")
            return builtin[name]
    path = Path(model)
    if path.exists():
        return path
    if looks_like_repo_id(name):
        return download_repo(name, variant=variant)
    raise UserError(f"no such model file or folder: {model}")


def looks_like_repo_id(text: str) -> bool:
    """True for "owner/name" (one slash, no file suffix): what is not a local path is tried on the Hub."""
    return bool(_REPO_ID.match(text)) and not text.endswith(WEIGHT_SUFFIXES)


def _patterns(variant: str | None) -> list[str]:
    """Only what load_diffusers reads: configs, tokenizer files and one weight file per network, and the
    folder's generation defaults, which TextToImage.from_pretrained reads (pipelines/request.py)."""
    suffix = f".{variant}" if variant else ""
    return ["model_index.json", "*/config.json", "scheduler/scheduler_config.json", "tokenizer/*",
            "generation_defaults.json",
            f"unet/diffusion_pytorch_model{suffix}.safetensors",
            f"vae/diffusion_pytorch_model{suffix}.safetensors", f"text_encoder/model{suffix}.safetensors"]


def download_repo(repo_id: str, *, variant: str | None = None) -> Path:
    """Local folder of `repo_id` from the Hugging Face cache, downloading what is missing when online."""
    manual = (f"download it yourself, e.g. `huggingface-cli download {repo_id} --local-dir FOLDER` or "
              f"`git lfs install && git clone https://huggingface.co/{repo_id} FOLDER` on a machine with "
              "internet access, then pass FOLDER")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UserError(f"{repo_id!r} is neither a local file nor a folder, and huggingface_hub is not "
                        f"installed to fetch it from the Hub (pip install huggingface_hub); or "
                        f"{manual}") from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=_patterns(variant)))
    except Exception as error:     # offline, unknown or gated repo, HTTP errors: all end the same way for us
        raise UserError(f"could not get {repo_id!r} from the Hugging Face Hub ({type(error).__name__}: "
                        f"{str(error).splitlines()[0] if str(error) else ''}); {manual}") from None


def weight_files(path: str | Path) -> list[Path]:
    """The weight files of a model: the file itself, or a folder's weight files in sorted path order."""
    path = Path(path)
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if not files:
        raise UserError(f"no weight files ({', '.join(WEIGHT_SUFFIXES)}) in {path}")
    return files


def model_hash(path: str | Path, *, cache: Path | None = None) -> str:
    """A1111's "Model hash": the first 10 hex digits of the sha256 of the weights file.

    For a diffusers folder, of the bytes of all its weight files, one after the other in sorted path order.
    The digest is remembered in `cache` (default: hash_cache_path()) under the files' paths, sizes and
    modification times, as A1111 does, so a 4 GB checkpoint is read once rather than on every run; a cache
    that cannot be read or written is skipped.
    """
    files = weight_files(path)
    cache = hash_cache_path() if cache is None else cache
    stats = [(file.resolve(), file.stat()) for file in files]
    key = "|".join(f"{path}:{stat.st_size}:{stat.st_mtime_ns}" for path, stat in stats)
    known = _read_hash_cache(cache)
    if key in known:
        return known[key]
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as stream:
            while block := stream.read(1 << 20):
                digest.update(block)
    known[key] = digest.hexdigest()[:10]
    try:
        with atomic_write(cache) as stream:
            stream.write(json.dumps(known, indent=0).encode("utf-8"))
    except OSError:
        pass                                            # a read-only home: hash again next time
    return known[key]


def hash_cache_path() -> Path:
    """Where model hashes are remembered: $NANODIFFUSION_CACHE/model_hashes.json, else
    ~/.cache/nanodiffusion/model_hashes.json."""
    root = os.environ.get(CACHE_ENV_VAR) or Path.home() / ".cache" / "nanodiffusion"
    return Path(root) / "model_hashes.json"


def _read_hash_cache(cache: Path) -> dict[str, str]:
    try:
        known = json.loads(cache.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}
