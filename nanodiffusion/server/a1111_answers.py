"""The shapes of the A1111 API's answers: a generation's `info`, progress, the listings clients read at
start-up (samplers, models, options, and the empty lists of what this server has none of), memory, and
`png-info`'s reading of an infotext.
"""

import json
import os
import re
import time

import torch

from nanodiffusion import __version__
from nanodiffusion.diffusion.samplers import SAMPLERS, resolve_sampler
from nanodiffusion.diffusion.sampling_plan import SIGMA_SCHEDULES
from nanodiffusion.pipelines.metadata import PARAMETERS_KEY
from nanodiffusion.server.a1111 import CLIP_SKIP_SETTING, SCHEDULE_NAMES

# What this server has none of (no VAE files apart from the models', no upscaler, no scripts...): clients
# read these lists at start-up, so each answers, truthfully empty.
EMPTY_LISTINGS = {
    "sd-vae": [], "upscalers": [], "latent-upscale-modes": [], "prompt-styles": [],
    "face-restorers": [], "hypernetworks": [], "realesrgan-models": [], "script-info": [], "extensions": [],
    "scripts": {"txt2img": [], "img2img": []},
}
# A1111's infotext settings line: "Key: value, Key: "quoted, value", ..."
_SETTING = re.compile(r'\s*([\w][\w .+/()-]*?):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def generation_info(body, request, images: list, model, interrupted: bool) -> dict:
    """A1111's `info` of a txt2img/img2img answer (sent as a JSON string): the settings as run, the seeds."""
    return {
        "prompt": body.prompt, "all_prompts": [body.prompt] * len(images),
        "negative_prompt": body.negative_prompt, "all_negative_prompts": [body.negative_prompt] * len(images),
        "seed": request.seed, "all_seeds": [image.seed for image in images],
        "width": request.width, "height": request.height,
        "sampler_name": SAMPLERS[resolve_sampler(request.sampler)].a1111,
        "scheduler": SIGMA_SCHEDULES[request.sigma_schedule].a1111,
        "cfg_scale": request.guidance_scale, "steps": request.num_steps,
        "batch_size": body.batch_size, "n_iter": body.n_iter, "clip_skip": request.clip_skip,
        "denoising_strength": request.strength if hasattr(body, "init_images") else None,
        "sd_model_name": model.name, "sd_model_hash": model.hash, "index_of_first_image": 0,
        "infotexts": [image.infotext for image in images], "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "interrupted": interrupted, "partial_images": [k for k, image in enumerate(images) if image.partial],
        "ignored_fields": body.ignored_fields(request.sampler), "version": f"nanodiffusion {__version__}",
    }


def progress(job, jobs_waiting: int, current_image: str | None) -> dict:
    """`GET /sdapi/v1/progress` for the running job (None when idle): progress 0..1, eta_relative (s), and
    the latest preview (base64 PNG) as `current_image`."""
    done = job.progress if job else 0.0
    elapsed = time.time() - job.started if job and job.started else 0.0
    return {
        "progress": done,
        "eta_relative": elapsed / done - elapsed if done > 0 else 0.0,
        "state": {
            "skipped": False, "interrupted": bool(job and job.cancel_requested),
            "job": job.id if job else "", "job_count": jobs_waiting + (job is not None),
            "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.created)) if job else "0",
            "job_no": job.image_index if job else 0,
            "sampling_step": job.step if job else 0, "sampling_steps": job.num_steps if job else 0,
        },
        "current_image": current_image,
        "textinfo": None,
    }


def samplers() -> list[dict]:
    """`GET /sdapi/v1/samplers`: A1111's label for each of our samplers, our name and aliases."""
    return [{"name": sampler.a1111, "aliases": [name, *sampler.aliases], "options": {}}
            for name, sampler in SAMPLERS.items()]


def schedulers() -> list[dict]:
    """`GET /sdapi/v1/schedulers` (A1111 1.9+): each name is accepted as `scheduler`."""
    return [{"name": SCHEDULE_NAMES[name], "label": schedule.a1111, "aliases": None}
            for name, schedule in SIGMA_SCHEDULES.items()]


def sd_models(registry) -> list[dict]:
    """`GET /sdapi/v1/sd-models`: every model the server can load; `filename` relative to its folder."""
    return [{"title": registry.title(entry), "model_name": entry.name,
             "hash": registry.hashes.get(entry.path), "sha256": None, "filename": entry.filename, "config": None}
            for entry in registry.entries.values()]


def loras(pipe) -> list[dict]:
    """`GET /sdapi/v1/loras`: the files of --lora-dir (name, alias, path relative to it, header metadata)."""
    prompt_loras = getattr(pipe, "prompt_loras", None)
    return prompt_loras.folder.listing() if prompt_loras and prompt_loras.folder else []


def embeddings(pipe) -> dict:
    """`GET /sdapi/v1/embeddings`: the embeddings of --embeddings-dir loaded into the model, and those
    skipped (made for another model) with the reason."""
    loaded, skipped = getattr(pipe, "embeddings", ({}, {}))
    return {"loaded": loaded, "skipped": skipped}


def options(registry, clip_skip: int) -> dict:
    """`GET /sdapi/v1/options`: the settings this server has (the others A1111 has do not apply here)."""
    return {"sd_model_checkpoint": registry.title(registry.current),
            "sd_checkpoint_hash": registry.hashes.get(registry.current.path),
            CLIP_SKIP_SETTING: clip_skip, "samples_format": "png", "live_previews_enable": True}


def memory() -> dict:
    """`GET /sdapi/v1/memory`: RAM of this machine (bytes), CUDA memory when there is a CUDA device."""
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        total, free = page * os.sysconf("SC_PHYS_PAGES"), page * os.sysconf("SC_AVPHYS_PAGES")
        ram = {"free": free, "used": total - free, "total": total}
    except (ValueError, OSError, AttributeError):       # sysconf names differ outside Linux
        ram = {"error": "not known on this system"}
    if not torch.cuda.is_available():
        return {"ram": ram, "cuda": {"error": "no CUDA device"}}
    free, total = torch.cuda.mem_get_info()
    return {"ram": ram, "cuda": {"system": {"free": free, "used": total - free, "total": total},
                                 "active": {"current": torch.cuda.memory_allocated(),
                                            "peak": torch.cuda.max_memory_allocated()}}}


def png_info(image) -> dict:
    """`POST /sdapi/v1/png-info`: the image's A1111 `parameters` text as `info`, its other text chunks as
    `items`, and the infotext read into `parameters` (A1111's keys: "Prompt", "Steps", "Size-1"...)."""
    text = {key: str(value) for key, value in getattr(image, "text", {}).items()}
    info = text.pop(PARAMETERS_KEY, "")
    return {"info": info, "items": text, "parameters": parse_infotext(info) if info else {}}


def parse_infotext(text: str) -> dict[str, str]:
    """A1111's infotext read into its parts: prompt lines, the "Negative prompt:" lines, and the last line's
    "Key: value" settings (JSON-quoted values unquoted); Size WxH also as Size-1 and Size-2."""
    lines = text.strip("\n").split("\n")
    settings = {}
    if len(_SETTING.findall(lines[-1])) >= 3:           # A1111 too takes a last line of 3+ pairs as settings
        for key, value in _SETTING.findall(lines.pop()):
            settings[key.strip()] = _unquote(value.strip())
    prompt, negative = [], []
    for line in lines:
        if line.startswith("Negative prompt:") or negative:
            negative.append(line.removeprefix("Negative prompt:").lstrip() if not negative else line)
        else:
            prompt.append(line)
    parsed = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative), **settings}
    width, cross, height = settings.get("Size", "").partition("x")
    if cross:
        parsed["Size-1"], parsed["Size-2"] = width, height
    return parsed


def _unquote(value: str) -> str:
    if value.startswith('"'):
        try:
            return json.loads(value)
        except ValueError:
            pass
    return value
