"""The AUTOMATIC1111 web UI's API (`/sdapi/v1/...`) as far as we serve it: the txt2img request with bounds
on every field, its conversion to our GenerationRequest, and the shapes of the answers (info, progress,
samplers, models).

A1111 clients send many fields we do not implement (hires fix, face restoration, scripts...): the known ones
are accepted and listed in the answer's `info["ignored_fields"]`; a field A1111 does not know either is a
422, so that a typo ("step": 20) is never silently ignored.
"""

import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from nanodiffusion import __version__
from nanodiffusion.diffusion.samplers import SAMPLERS, resolve_sampler
from nanodiffusion.diffusion.sampling_plan import SIGMA_SCHEDULES
from nanodiffusion.pipelines.request import GenerationRequest

MAX_IMAGES_PER_BATCH = 4
MAX_BATCHES = 4
MAX_STEPS = 150
MAX_SIZE = 2048
MAX_PROMPT_CHARS = 10_000
DEFAULT_SAMPLER = "Euler"           # A1111's API default
# A1111's scheduler names (lowercase) -> our sigma schedules
SCHEDULERS = {schedule.a1111.lower(): name for name, schedule in SIGMA_SCHEDULES.items()}
# A1111 (1.10) txt2img fields that we accept and ignore: they are listed in info["ignored_fields"]
IGNORED_FIELDS = frozenset((
    "styles subseed subseed_strength seed_resize_from_h seed_resize_from_w restore_faces tiling "
    "do_not_save_samples do_not_save_grid eta denoising_strength s_min_uncond s_churn s_tmax s_tmin s_noise "
    "override_settings_restore_afterwards refiner_checkpoint refiner_switch_at disable_extra_networks "
    "firstpass_image comments enable_hr firstphase_width firstphase_height hr_scale hr_upscaler "
    "hr_second_pass_steps hr_resize_x hr_resize_y hr_checkpoint_name hr_sampler_name hr_scheduler hr_prompt "
    "hr_negative_prompt force_task_id script_name script_args send_images save_images alwayson_scripts "
    "infotext distilled_cfg_scale"
).split())
CLIP_SKIP_SETTING = "CLIP_stop_at_last_layers"      # the one `override_settings` key we read


class Txt2ImgRequest(BaseModel):
    """The body of `POST /sdapi/v1/txt2img` (and of our `POST /api/jobs`): A1111's field names and defaults,
    strict types (a number sent as a string is a 422). width/height default to the model's native size."""

    model_config = ConfigDict(strict=True, extra="allow")

    prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    steps: int = Field(50, ge=1, le=MAX_STEPS)
    cfg_scale: float = Field(7.0, ge=0, le=30)
    seed: int = Field(-1, ge=-1, lt=2**32, description="-1: a random seed")
    width: int | None = Field(None, ge=8, le=MAX_SIZE, multiple_of=8)
    height: int | None = Field(None, ge=8, le=MAX_SIZE, multiple_of=8)
    sampler_name: str | None = Field(None, description='"Euler a", "DPM++ 2M Karras", "euler", ...')
    sampler_index: str | None = Field(None, description="A1111's older name for sampler_name")
    scheduler: str | None = Field(None, description="Automatic, Karras or Exponential")
    batch_size: int = Field(1, ge=1, le=MAX_IMAGES_PER_BATCH)
    n_iter: int = Field(1, ge=1, le=MAX_BATCHES)
    override_settings: dict[str, Any] = Field(default_factory=dict,
                                              description=f"only {CLIP_SKIP_SETTING} is read")

    @field_validator("prompt", "negative_prompt")
    @classmethod
    def _no_nul(cls, text: str) -> str:
        if "\x00" in text:           # strict str already refuses unpaired surrogates
            raise ValueError("must not hold a NUL character")
        return text

    @field_validator("sampler_name", "sampler_index")
    @classmethod
    def _known_sampler(cls, name: str | None) -> str | None:
        if name is not None:
            resolve_sampler(split_schedule(name)[0])
        return name

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, name: str | None) -> str | None:
        if name is not None and name.lower() not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {name!r}; valid: Automatic, Karras, Exponential")
        return name

    @model_validator(mode="after")
    def _no_unknown_fields(self) -> "Txt2ImgRequest":
        unknown = sorted(set(self.model_extra) - IGNORED_FIELDS)
        if unknown:
            raise ValueError(f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}")
        clip_skip = self.override_settings.get(CLIP_SKIP_SETTING, 1)
        if type(clip_skip) is not int or not 1 <= clip_skip <= 12:
            raise ValueError(f"override_settings.{CLIP_SKIP_SETTING} must be an integer in 1..12, "
                             f"got {clip_skip!r}")
        self.sampler_and_schedule()                     # sampler_name vs scheduler conflicts
        return self

    @property
    def num_images(self) -> int:
        return self.batch_size * self.n_iter

    @property
    def ignored_fields(self) -> list[str]:
        """The A1111 fields sent that we do not implement, override_settings keys as override_settings.KEY."""
        settings = [f"override_settings.{key}" for key in self.override_settings if key != CLIP_SKIP_SETTING]
        return sorted(self.model_extra) + settings

    def sampler_and_schedule(self) -> tuple[str, str]:
        """Our sampler name and sigma schedule: "DPM++ 2M Karras" is DPM++ 2M on the Karras schedule."""
        sampler, schedule = split_schedule(self.sampler_name or self.sampler_index or DEFAULT_SAMPLER)
        asked = SCHEDULERS[self.scheduler.lower()] if self.scheduler else "default"
        if schedule != "default" and asked not in ("default", schedule):
            raise ValueError(f"sampler_name {self.sampler_name!r} and scheduler {self.scheduler!r} disagree")
        return resolve_sampler(sampler), schedule if schedule != "default" else asked

    def generation_request(self, seed: int) -> GenerationRequest:
        """The GenerationRequest of the first image (image k takes seed + k); a UserError if it is invalid."""
        sampler, schedule = self.sampler_and_schedule()
        return GenerationRequest(self.prompt, self.negative_prompt or None, num_steps=self.steps,
                                 guidance_scale=self.cfg_scale, seed=seed, height=self.height,
                                 width=self.width, sampler=sampler, sigma_schedule=schedule,
                                 clip_skip=self.override_settings.get(CLIP_SKIP_SETTING, 1))


def split_schedule(sampler_name: str) -> tuple[str, str]:
    """A1111's older combined names: "DPM++ 2M Karras" -> ("DPM++ 2M", "karras")."""
    for name, schedule in SIGMA_SCHEDULES.items():
        label = schedule.a1111
        if name != "default" and sampler_name.endswith(f" {label}"):
            return sampler_name[:-len(label) - 1], name
    return sampler_name, "default"


def txt2img_info(body: Txt2ImgRequest, images: list, model, interrupted: bool) -> dict:
    """A1111's `info` of a txt2img answer (sent as a JSON string): the settings as run and the seeds."""
    sampler, schedule = body.sampler_and_schedule()
    first = images[0].request if images else None
    return {
        "prompt": body.prompt, "all_prompts": [body.prompt] * len(images),
        "negative_prompt": body.negative_prompt, "all_negative_prompts": [body.negative_prompt] * len(images),
        "seed": first.seed if first else None, "all_seeds": [image.seed for image in images],
        "width": first.width if first else body.width, "height": first.height if first else body.height,
        "sampler_name": SAMPLERS[sampler].a1111,
        "scheduler": SIGMA_SCHEDULES[schedule].a1111,
        "cfg_scale": body.cfg_scale, "steps": body.steps,
        "batch_size": body.batch_size, "n_iter": body.n_iter,
        "clip_skip": body.override_settings.get(CLIP_SKIP_SETTING, 1),
        "sd_model_name": model.name, "sd_model_hash": model.hash, "index_of_first_image": 0,
        "infotexts": [image.infotext for image in images], "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "interrupted": interrupted, "ignored_fields": body.ignored_fields,
        "version": f"nanodiffusion {__version__}",
    }


def progress(job, jobs_waiting: int) -> dict:
    """`GET /sdapi/v1/progress` for the running job (None when idle): progress 0..1, eta_relative (s)."""
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
            "sampling_step": job.step if job else 0, "sampling_steps": job.request.num_steps if job else 0,
        },
        "current_image": None,
        "textinfo": None,
    }


def samplers() -> list[dict]:
    """`GET /sdapi/v1/samplers`: A1111's label for each of our samplers, our name and aliases."""
    return [{"name": sampler.a1111, "aliases": [name, *sampler.aliases], "options": {}}
            for name, sampler in SAMPLERS.items()]


def schedulers() -> list[dict]:
    """`GET /sdapi/v1/schedulers` (A1111 1.9+)."""
    return [{"name": name, "label": name.capitalize(), "aliases": None} for name in SCHEDULERS]


def sd_models(model) -> list[dict]:
    """`GET /sdapi/v1/sd-models`: the one model served."""
    return [{"title": f"{model.name} [{model.hash}]", "model_name": model.name, "hash": model.hash,
             "sha256": None, "filename": str(model.path), "config": None}]
