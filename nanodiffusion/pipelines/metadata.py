"""What a generated PNG says about itself: AUTOMATIC1111's `parameters` text and our exact settings as JSON.

The `parameters` chunk is what A1111, ComfyUI, Civitai and most image viewers read:

    a photo of a cat
    Negative prompt: blurry
    Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 42, Size: 512x512, Model hash: 6ce0161689, Model: v1-5

The `nanodiffusion` chunk holds the GenerationRequest, the model and the dtype as JSON: enough for
`nanodiffusion generate --from IMAGE.png` to make the same image again, bit for bit on the same device.
"""

import hashlib
import json
import os
from pathlib import Path

from nanodiffusion import __version__
from nanodiffusion.atomic import atomic_write
from nanodiffusion.errors import UserError

PARAMETERS_KEY = "parameters"
SETTINGS_KEY = "nanodiffusion"
SETTINGS_FORMAT = 1
WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".bin", ".pt", ".pth")
CACHE_ENV_VAR = "NANODIFFUSION_CACHE"        # folder of the model-hash cache (default ~/.cache/nanodiffusion)

A1111_SAMPLER_NAMES = {             # our sampler name -> A1111's label
    "ddpm": "DDPM", "ddim": "DDIM", "plms": "PLMS", "lms": "LMS", "euler": "Euler",
    "euler_ancestral": "Euler a", "heun": "Heun", "dpm_2": "DPM2", "dpm_2_ancestral": "DPM2 a",
    "dpmpp_2m": "DPM++ 2M", "dpmpp_2m_sde": "DPM++ 2M SDE", "unipc": "UniPC", "lcm": "LCM",
    "dpmpp_2s_ancestral": "DPM++ 2S a", "dpmpp_sde": "DPM++ SDE", "dpmpp_2m_sde_heun": "DPM++ 2M SDE Heun",
    "dpmpp_3m_sde": "DPM++ 3M SDE", "restart": "Restart", "tcd": "TCD",
}
A1111_SCHEDULE_NAMES = {"karras": "Karras", "exponential": "Exponential", "sgm_uniform": "SGM Uniform",
                        "uniform": "Uniform", "simple": "Simple", "normal": "Normal", "ddim": "DDIM",
                        "beta": "Beta", "align_your_steps": "Align Your Steps"}


def a1111_parameters(request, sampler: str, model_name: str | None, model_hash: str | None) -> str:
    """A1111's infotext for one image of `request` (a GenerationRequest with one prompt and seed filled in).

    `sampler` is our canonical sampler name. As A1111: no negative line when there is no negative prompt,
    and values holding a comma, colon or newline are written as JSON strings.
    """
    lines = [request.prompts[0]]
    negative = request.negative_prompts[0]
    if negative:
        lines.append(f"Negative prompt: {negative}")
    settings = {
        "Steps": request.num_steps,
        "Sampler": A1111_SAMPLER_NAMES.get(sampler, sampler),
        "Schedule type": A1111_SCHEDULE_NAMES.get(request.sigma_schedule),
        "CFG scale": f"{request.guidance_scale:g}",
        "Seed": request.seed,
        "Size": f"{request.width}x{request.height}",
        "Model hash": model_hash,
        "Model": model_name,
        "Clip skip": request.clip_skip if request.clip_skip != 1 else None,
        "Version": f"nanodiffusion {__version__}",
    }
    lines.append(", ".join(f"{key}: {_quote(str(value))}" for key, value in settings.items()
                           if value is not None))
    return "\n".join(lines)


def _quote(value: str) -> str:
    return json.dumps(value, ensure_ascii=False) if any(c in value for c in ",:\n") else value


def settings_json(request, *, model: str, model_hash: str | None, dtype: str, device: str,
                  vae_tile: int | None = None) -> str:
    """Our own text chunk: the request and what else decides the pixels (model, dtype, device, and the VAE
    tile size when the image was decoded in tiles)."""
    run = {"model": model, "model_hash": model_hash, "dtype": dtype, "device": device}
    if vae_tile is not None:
        run["vae_tile"] = vae_tile
    return json.dumps({"format": SETTINGS_FORMAT, "version": __version__, "request": request.to_dict(), **run},
                      ensure_ascii=False)


def read_settings(text: dict[str, str], source: str) -> dict:
    """The `nanodiffusion` settings from a PNG's text chunks; a UserError when there are none."""
    if SETTINGS_KEY not in text:
        raise UserError(f"{source} holds no nanodiffusion settings: it was not written by "
                        "`nanodiffusion generate`")
    try:
        settings = json.loads(text[SETTINGS_KEY])
    except json.JSONDecodeError as error:
        raise UserError(f"{source}: the nanodiffusion settings are not valid JSON ({error})") from None
    if settings.get("format") != SETTINGS_FORMAT:
        raise UserError(f"{source}: unknown settings format {settings.get('format')!r}; "
                        f"this version reads format {SETTINGS_FORMAT}")
    return settings


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
