"""The AUTOMATIC1111 web UI's requests (`/sdapi/v1/txt2img`, `/sdapi/v1/img2img`) as far as we serve them:
their fields with strict types, the server's limits and per-job cost bound, and their conversion to our
GenerationRequest.

A1111 clients send many fields we do not implement (hires fix, face restoration, scripts...): the known ones
are accepted and listed in the answer's `info["ignored_fields"]`, as are the sampler options (`eta`,
`s_churn`...) the chosen sampler does not take; a field A1111 does not know either is a 422, so that a typo
("step": 20) is never silently ignored. A setting that the pipeline cannot honour
(latent-noise inpainting fill, a latent upscale) is a 422 that says so. Fields left out take the model's
defaults (its generation_defaults.json), else GenerationRequest's.
"""

import math
from dataclasses import replace
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from nanodiffusion.diffusion.sampler_options import NOISE_OPTIONS
from nanodiffusion.diffusion.samplers import resolve_sampler, sampler_options
from nanodiffusion.diffusion.sampling_plan import SIGMA_SCHEDULES
from nanodiffusion.errors import UserError
from nanodiffusion.pipelines.request import GenerationRequest
from nanodiffusion.server.a1111_images import INPAINTING_FILLS, RESIZE_MODES
from nanodiffusion.server.controlnets import ControlNetUnitBody, controlnet_units

MAX_PROMPT_CHARS = 10_000
# A1111's scheduler names ("sgm_uniform", ours but "automatic") and labels ("SGM Uniform"), lowercase: A1111
# takes either -> our sigma schedules
SCHEDULE_NAMES = {name: "automatic" if name == "default" else name for name in SIGMA_SCHEDULES}
SCHEDULERS = {**{schedule.a1111.lower(): name for name, schedule in SIGMA_SCHEDULES.items()},
              **{a1111: name for name, a1111 in SCHEDULE_NAMES.items()}}
# A1111 (1.10) fields that we accept and ignore: they are listed in info["ignored_fields"]
IGNORED_COMMON = frozenset((
    "styles subseed subseed_strength seed_resize_from_h seed_resize_from_w restore_faces tiling "
    "do_not_save_samples do_not_save_grid s_min_uncond "
    "override_settings_restore_afterwards refiner_checkpoint refiner_switch_at disable_extra_networks "
    "comments force_task_id script_name script_args send_images save_images infotext "
    "distilled_cfg_scale"
).split())
IGNORED_TXT2IMG = IGNORED_COMMON | frozenset((
    "denoising_strength firstpass_image enable_hr firstphase_width firstphase_height hr_scale hr_upscaler "
    "hr_second_pass_steps hr_resize_x hr_resize_y hr_checkpoint_name hr_sampler_name hr_scheduler hr_prompt "
    "hr_negative_prompt hr_additional_modules hr_distilled_cfg"
).split())
IGNORED_IMG2IMG = IGNORED_COMMON | {"image_cfg_scale"}           # instruct-pix2pix models only
CLIP_SKIP_SETTING = "CLIP_stop_at_last_layers"      # the one `override_settings` key we read


class Txt2ImgRequest(BaseModel):
    """The body of `POST /sdapi/v1/txt2img` (and of our `POST /api/jobs`): A1111's field names, strict
    types (a number sent as a string is a 422). Fields left out take the model's defaults."""

    model_config = ConfigDict(strict=True, extra="allow")
    IGNORED: ClassVar[frozenset[str]] = IGNORED_TXT2IMG

    prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    steps: int | None = Field(None, ge=1, description="default: the model's")
    cfg_scale: float | None = Field(None, ge=0, le=30, description="default: the model's")
    seed: int = Field(-1, ge=-1, lt=2**32, description="-1: a random seed")
    width: int | None = Field(None, ge=8, multiple_of=8, description="default: the model's native size")
    height: int | None = Field(None, ge=8, multiple_of=8, description="default: the model's native size")
    sampler_name: str | None = Field(None, description='"Euler a", "DPM++ 2M Karras", "euler"...; '
                                                       "default: the model's")
    sampler_index: str | None = Field(None, description="A1111's older name for sampler_name")
    scheduler: str | None = Field(None, description="Automatic, Karras... (GET /sdapi/v1/schedulers)")
    batch_size: int = Field(1, ge=1)
    n_iter: int = Field(1, ge=1)
    override_settings: dict[str, Any] = Field(default_factory=dict,
                                              description=f"only {CLIP_SKIP_SETTING} is read")
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict,
                                             description='only "controlnet" is read (its extension\'s units)')
    _controlnet_units: list[ControlNetUnitBody] = PrivateAttr(default_factory=list)
    # the standard sampler options, for the samplers that take them (others list them as ignored)
    eta: float | None = Field(None, ge=0, description="noise amount of ancestral/SDE samplers, DDIM's eta, "
                                                      "TCD's gamma; default: the sampler's (1, 0, 0.3)")
    s_churn: float | None = Field(None, ge=0, description="Euler, Heun, DPM2: churn (default 0)")
    s_tmin: float | None = Field(None, ge=0, description="churn where sigma >= s_tmin (default 0)")
    s_tmax: float | None = Field(None, ge=0, description="churn where sigma <= s_tmax (default 0: no bound)")
    s_noise: float | None = Field(None, ge=0, description="multiplies each fresh noise draw (default 1)")

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
            labels = ", ".join(schedule.a1111 for schedule in SIGMA_SCHEDULES.values())
            raise ValueError(f"unknown scheduler {name!r}; valid: {labels}")
        return name

    @model_validator(mode="after")
    def _no_unknown_fields(self):
        unknown = sorted(set(self.model_extra) - self.IGNORED)
        if unknown:
            raise ValueError(f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}")
        clip_skip = self.override_settings.get(CLIP_SKIP_SETTING, 1)
        if type(clip_skip) is not int or not 1 <= clip_skip <= 12:
            raise ValueError(f"override_settings.{CLIP_SKIP_SETTING} must be an integer in 1..12, "
                             f"got {clip_skip!r}")
        self.sampler_and_schedule({})                   # sampler_name vs scheduler conflicts
        try:
            self._controlnet_units = controlnet_units(self.alwayson_scripts)
        except UserError as error:
            raise ValueError(str(error)) from None
        return self

    @property
    def controlnet_units(self) -> list[ControlNetUnitBody]:
        """The enabled units of the ControlNet extension's script (`alwayson_scripts.controlnet.args`)."""
        return self._controlnet_units

    @property
    def num_images(self) -> int:
        return self.batch_size * self.n_iter

    def ignored_fields(self, sampler: str) -> list[str]:
        """The A1111 fields sent that we do not implement, or that `sampler` does not take (eta for Euler),
        override_settings keys as override_settings.KEY."""
        settings = [f"override_settings.{key}" for key in self.override_settings if key != CLIP_SKIP_SETTING]
        scripts = [f"alwayson_scripts.{key}" for key in self.alwayson_scripts if key.lower() != "controlnet"]
        unused = [name for name in NOISE_OPTIONS
                  if getattr(self, name) is not None and name not in sampler_options(sampler)]
        return sorted([*self.model_extra, *unused]) + settings + scripts

    def options_for(self, sampler: str) -> dict[str, float]:
        """The sampler options sent that `sampler` takes, where they differ from its defaults (A1111's
        semantics: s_tmax 0 means no bound; an option left out takes the sampler's default)."""
        takes = sampler_options(sampler)
        sent = {name: getattr(self, name) for name in NOISE_OPTIONS if getattr(self, name) is not None}
        if sent.get("s_tmax") == 0:
            sent["s_tmax"] = math.inf
        return {name: value for name, value in sent.items() if name in takes and value != takes[name]}

    def sampler_and_schedule(self, defaults: dict) -> tuple[str, str]:
        """Our sampler name and sigma schedule: "DPM++ 2M Karras" is DPM++ 2M on the Karras schedule; what
        is left out comes from `defaults` (the model's), else GenerationRequest's."""
        given = self.sampler_name or self.sampler_index
        sampler, schedule = split_schedule(given) if given else (defaults.get("sampler", _DEFAULT.sampler),
                                                                 "default")
        asked = SCHEDULERS[self.scheduler.lower()] if self.scheduler else "default"
        if schedule != "default" and asked not in ("default", schedule):
            raise ValueError(f"sampler_name {self.sampler_name!r} and scheduler {self.scheduler!r} disagree")
        if schedule == "default" and asked == "default":
            asked = defaults.get("sigma_schedule", "default") if not given else "default"
        return resolve_sampler(sampler), schedule if schedule != "default" else asked

    def generation_request(self, seed: int, defaults: dict, native_size: int) -> GenerationRequest:
        """The GenerationRequest of the first image (image k takes seed + k), every setting filled in from
        the body, else `defaults` (the model's), else GenerationRequest's; a UserError if it is invalid."""
        sampler, schedule = self.sampler_and_schedule(defaults)
        pick = defaults.get
        return GenerationRequest(
            self.prompt, self.negative_prompt or None, seed=seed,
            num_steps=self.steps if self.steps is not None else pick("num_steps", _DEFAULT.num_steps),
            guidance_scale=self.cfg_scale if self.cfg_scale is not None
            else pick("guidance_scale", _DEFAULT.guidance_scale),
            height=self.height or native_size, width=self.width or native_size, sampler=sampler,
            sigma_schedule=schedule, sampler_options=self.options_for(sampler),
            clip_skip=self.override_settings.get(CLIP_SKIP_SETTING, pick("clip_skip", 1)))

    def echo(self, request: GenerationRequest) -> dict:
        """A1111's `parameters` of the answer: the body with the settings as run filled in."""
        return {**self.model_dump(), "steps": request.num_steps, "cfg_scale": request.guidance_scale,
                "width": request.width, "height": request.height, "seed": request.seed}


_DEFAULT = GenerationRequest("")


def split_schedule(sampler_name: str) -> tuple[str, str]:
    """A1111's older combined names: "DPM++ 2M Karras" -> ("DPM++ 2M", "karras")."""
    for name, schedule in SIGMA_SCHEDULES.items():
        label = schedule.a1111
        if name != "default" and sampler_name.endswith(f" {label}"):
            return sampler_name[:-len(label) - 1], name
    return sampler_name, "default"


def _zero_or_one(value: bool | int, name: str) -> bool:
    if type(value) is int and value not in (0, 1):
        raise ValueError(f"{name} must be true/false or 0/1, got {value}")
    return bool(value)


class Img2ImgRequest(Txt2ImgRequest):
    """The body of `POST /sdapi/v1/img2img`: txt2img's fields plus A1111's init images and inpainting mask.
    Settings the pipeline cannot honour are refused by name."""

    IGNORED: ClassVar[frozenset[str]] = IGNORED_IMG2IMG

    init_images: list[str] = Field(min_length=1, description="base64 PNG/JPEG/WebP, data URLs too")
    denoising_strength: float | None = Field(None, ge=0, le=1, description="default: GenerationRequest's")
    resize_mode: int = Field(0, ge=0, le=3, description="0 just resize, 1 crop and resize, 2 resize and fill")
    mask: str | None = Field(None, description="base64 image: white (or opaque) where to paint")
    mask_blur: int = Field(4, ge=0, le=64)
    mask_blur_x: int | None = Field(None, ge=0, le=64, description="must equal mask_blur")
    mask_blur_y: int | None = Field(None, ge=0, le=64, description="must equal mask_blur")
    mask_round: bool = True
    inpainting_mask_invert: bool | int = 0
    inpainting_fill: int = Field(0, ge=0, le=3, description="0 fill, 1 original (2, 3: refused)")
    inpaint_full_res: bool | int = Field(True, description="true: paint the masked region alone, full size")
    inpaint_full_res_padding: int = Field(0, ge=0, le=1024)
    initial_noise_multiplier: float = Field(1.0, description="only 1 is supported")
    latent_mask: str | None = Field(None, description="not supported")
    include_init_images: bool = Field(False, description="echo init_images and mask in `parameters`")

    @field_validator("inpainting_mask_invert", "inpaint_full_res")
    @classmethod
    def _flag(cls, value: bool | int, info) -> bool:
        return _zero_or_one(value, info.field_name)

    @model_validator(mode="after")
    def _supported(self):
        refusals = {
            "resize_mode": (self.resize_mode == 3, "3 (latent upscale) is not supported; valid: "
                            + ", ".join(f"{k} ({v})" for k, v in RESIZE_MODES.items())),
            "inpainting_fill": (self.inpainting_fill not in INPAINTING_FILLS,
                                f"{self.inpainting_fill} (latent noise/nothing) is not supported; valid: "
                                + ", ".join(f"{k} ({v})" for k, v in INPAINTING_FILLS.items())),
            "mask_blur_x": (self.mask_blur_x not in (None, self.mask_blur), "must equal mask_blur"),
            "mask_blur_y": (self.mask_blur_y not in (None, self.mask_blur), "must equal mask_blur"),
            "mask_round": (not self.mask_round, "false is not supported: masks are rounded"),
            "initial_noise_multiplier": (self.initial_noise_multiplier != 1, "only 1 is supported"),
            "latent_mask": (self.latent_mask is not None, "is not supported"),
        }
        refused = [f"{name}: {why}" for name, (bad, why) in refusals.items() if bad]
        if refused:
            raise ValueError("; ".join(refused))
        if len(self.init_images) not in (1, self.batch_size):
            raise ValueError(f"init_images: give one image or batch_size ({self.batch_size}), "
                             f"got {len(self.init_images)}")
        return self

    def generation_request(self, seed: int, defaults: dict, native_size: int) -> GenerationRequest:
        request = super().generation_request(seed, defaults, native_size)
        strength = self.denoising_strength
        return replace(request, strength=request.strength if strength is None else strength)

    def echo(self, request: GenerationRequest) -> dict:
        echoed = {**super().echo(request), "denoising_strength": request.strength}
        if not self.include_init_images:
            echoed.update(init_images=None, mask=None)
        return echoed
