"""The settings of one text-to-image generation (`GenerationRequest`), what a pipeline call returns, and the
generation defaults a model folder may carry.
"""

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from nanodiffusion.config import JSONConfig
from nanodiffusion.control_images.resize import RESIZE_MODES
from nanodiffusion.diffusion.denoisers import CONTROL_MODES
from nanodiffusion.diffusion.sampler_options import check_options
from nanodiffusion.diffusion.samplers import get_sampler, resolve_sampler
from nanodiffusion.diffusion.sampling_plan import check_sigma_schedule
from nanodiffusion.diffusion.schedules import check_num_steps
from nanodiffusion.errors import UserError, UserTypeError
from nanodiffusion.nets.token_merging import check_ratio
from nanodiffusion.validation import check_float, check_int, check_seed, check_text

DEFAULT_SAMPLER = "pndm"                # diffusers' default for SD v1.x (our plms)
OUTPUT_TYPES = ("pil", "np", "latent")
PREPROCESSORS = ("none", "canny", "openpose")   # what makes the control map from the control image


@dataclass(frozen=True)
class ControlSettings(JSONConfig):
    """How one ControlNet steers a generation (pipelines/control.py); a request holds one per ControlNet.

    The control image is recorded by its path (when it came from a file) and a hash of its pixels, so that
    `generate --from` can read it again and tell whether it changed.
    """

    model: str                          # the ControlNet: its name among the pipeline's (`pipe.controlnets`)
    model_hash: str | None = None       # A1111's hash of its weights, when loaded from files
    image: str | None = None            # the control image's file as given; None when given in memory
    image_hash: str | None = None       # sha256 of its RGB pixels (16 hex digits), filled in when run
    preprocess: str = "none"            # "none": the image is the map; "canny"; "openpose": a keypoint JSON
    low_threshold: float = 100.0        # Canny's hysteresis thresholds (A1111's threshold_a, threshold_b)
    high_threshold: float = 200.0
    processor_res: int | None = None    # Canny on the image scaled to this short side, then fitted; None:
    #                                     fitted to the generated size first (A1111's pixel perfect)
    resize_mode: str = "just_resize"    # control_images.resize.RESIZE_MODES
    scale: float = 1.0                  # diffusers' controlnet_conditioning_scale, A1111's weight
    start: float = 0.0                  # fraction of the steps before which it is off
    end: float = 1.0                    # fraction of the steps after which it is off
    guess_mode: bool = False            # diffusers' guess mode
    control_mode: str = "balanced"      # A1111's: "balanced", "prompt" or "controlnet" (is more important)

    def __post_init__(self):
        choices = {"preprocess": PREPROCESSORS, "resize_mode": RESIZE_MODES, "control_mode": CONTROL_MODES}
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                raise UserError(f"unknown control {name} {getattr(self, name)!r}; valid: {', '.join(valid)}")
        if not isinstance(self.model, str) or not self.model:
            raise UserError(f"a control's model must name a ControlNet, got {self.model!r}")
        check_float("controlnet conditioning scale", self.scale, 0)
        for name in ("start", "end", "low_threshold", "high_threshold"):
            check_float(f"control {name}", getattr(self, name))
        if not isinstance(self.guess_mode, bool):
            raise UserTypeError(f"guess_mode must be True or False, got {self.guess_mode!r}")
        if not 0.0 <= self.start < self.end <= 1.0:
            raise UserError(f"control guidance start and end must satisfy 0 <= start < end <= 1, "
                            f"got start={self.start} and end={self.end}")
        if not 0 <= self.low_threshold <= self.high_threshold:
            raise UserError(f"canny thresholds must satisfy 0 <= low <= high, got low={self.low_threshold} "
                            f"and high={self.high_threshold}")
        if self.processor_res is not None and (self.preprocess != "canny" or not isinstance(
                self.processor_res, int) or self.processor_res < 8):
            raise UserError(f"processor_res (an integer >= 8) applies to the canny preprocessor only, got "
                            f"{self.processor_res!r} with {self.preprocess!r}")
        if self.guess_mode and self.control_mode != "balanced":
            raise UserError("guess mode (diffusers') and an A1111 control mode other than balanced exclude "
                            "each other: choose one")


@dataclass(frozen=True)
class GenerationRequest(JSONConfig):
    """The settings of one generation: with the model and the dtype they decide the images exactly.

    `nanodiffusion generate` stores it as JSON in each PNG, so that `--from` can replay it.
    """

    prompt: str | list[str]
    negative_prompt: str | list[str] | None = None
    num_steps: int = 50
    guidance_scale: float = 7.5          # classifier-free guidance w; <= 1: none (as diffusers)
    seed: int | None = None              # None: a random seed, recorded in the output
    height: int | None = None            # None: the init image's size, else the model's (512 for SD v1.x)
    width: int | None = None
    num_images_per_prompt: int = 1
    sampler: str = DEFAULT_SAMPLER       # a key of SAMPLERS or an alias of one (diffusion/samplers.py)
    sigma_schedule: str = "default"      # "default" (the scheduler's timesteps), "karras" or "exponential"
    strength: float = 0.8                # img2img and inpainting only: the fraction of the steps run
    clip_skip: int = 1                   # 2: the penultimate CLIP layer (A1111's "Clip skip")
    emphasis: bool = True                # read A1111's (word:1.3) / [word] syntax in prompts
    tome_ratio: float = 0.0              # token merging (nets/token_merging.py): the fraction merged; 0 = off
    controls: tuple[ControlSettings, ...] = ()     # the ControlNets that steer it, one each
    # the sampler's own options (diffusion/sampler_options.py), e.g. {"eta": 0.5}; left out: its defaults
    sampler_options: dict = field(default_factory=dict)

    def __post_init__(self):
        """The checks of every field, for a pipeline call, a PNG's stored settings and the server alike."""
        prompts = _texts("prompt", self.prompt)
        if self.negative_prompt is not None:
            negatives = _texts("negative_prompt", self.negative_prompt)
            if not isinstance(self.negative_prompt, str) and len(negatives) != len(prompts):
                raise UserError(f"got {len(prompts)} prompts but {len(negatives)} negative prompts: pass one "
                                "negative prompt for all, or one per prompt")
        check_num_steps(self.num_steps)
        check_float("guidance_scale", self.guidance_scale, minimum=0)
        if self.seed is not None:
            check_seed(self.seed)
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and (check_int(name, value) < 8 or value % 8):
                raise UserError(f"{name} must be a positive multiple of 8, got {value!r}")
        check_int("num_images_per_prompt", self.num_images_per_prompt, minimum=1)
        sampler = resolve_sampler(check_text("sampler", self.sampler))
        options = self.sampler_options
        if not isinstance(options, dict) or not all(isinstance(name, str) for name in options):
            raise UserTypeError(f"sampler_options must map option names to values, got {options!r}")
        check_options(sampler, get_sampler(self.sampler), options)
        check_sigma_schedule(check_text("sigma_schedule", self.sigma_schedule))
        check_float("strength", self.strength, 0, 1)
        check_int("clip_skip", self.clip_skip, minimum=1)
        if not isinstance(self.emphasis, bool):
            raise UserTypeError(f"emphasis must be True or False, got {self.emphasis!r}")
        if not isinstance(self.controls, tuple) or \
                not all(isinstance(control, ControlSettings) for control in self.controls):
            raise UserTypeError("controls must be a tuple of ControlSettings")
        check_ratio(self.tome_ratio)

    @property
    def prompts(self) -> list[str]:
        """The prompt(s) as a list."""
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    @property
    def negative_prompts(self) -> list[str]:
        """One negative prompt per prompt ("" when there is none)."""
        negative = self.negative_prompt
        if negative is None or isinstance(negative, str):
            return [negative or ""] * len(self.prompts)
        return list(negative)

    @classmethod
    def from_dict(cls, data) -> "GenerationRequest":
        """Inverse of `to_dict` (the controls as dicts); unknown keys are a UserError."""
        data = dict(data)
        if "controls" in data:
            data["controls"] = tuple(ControlSettings.from_dict(control) for control in data["controls"])
        return super().from_dict(data)

    @classmethod
    def from_settings(cls, prompt: str | list[str], negative_prompt: str | list[str] | None = None,
                      **settings) -> "GenerationRequest":
        """A request from keyword settings, as a pipeline call takes them; unknown names are a UserError."""
        unknown = set(settings) - {field.name for field in fields(cls)}
        if unknown:
            raise UserError(f"unknown generation settings: {', '.join(sorted(unknown))}")
        return cls(prompt, negative_prompt, **settings)


def _texts(name: str, value) -> list[str]:
    """A prompt argument as a list: a string, or a non-empty list or tuple of strings."""
    if isinstance(value, str):
        return [check_text(name, value)]
    if not isinstance(value, (list, tuple)):
        raise UserTypeError(f"{name} must be a string or a non-empty list of strings, got {value!r} "
                            f"({type(value).__name__})")
    if not value:
        raise UserError(f"{name} must be a string or a non-empty list of strings, got an empty list")
    return [check_text(f"{name}[{i}]", text) for i, text in enumerate(value)]


@dataclass
class TextToImageOutput:
    """What a pipeline call returns: the images and the request as it ran."""

    images: list | np.ndarray | torch.Tensor    # PIL images, (N, H, W, 3) floats in [0, 1], or latents
    request: GenerationRequest                  # as run: seed, height and width filled in


# A model folder may hold the generation settings its makers measured best for it (the built-in model's
# guidance, sampler and steps); they replace GenerationRequest's SD defaults where a call gives none.
# diffusers ignores the file.
GENERATION_DEFAULTS_FILE = "generation_defaults.json"
DEFAULTABLE_SETTINGS = ("num_steps", "guidance_scale", "sampler", "sigma_schedule")


def read_generation_defaults(folder: str | Path) -> dict:
    """The settings in `folder/generation_defaults.json` ({} when there is none); a UserError if malformed."""
    path = Path(folder) / GENERATION_DEFAULTS_FILE
    if not path.is_file():
        return {}
    try:
        defaults = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read {path}: {error}") from error
    return check_generation_defaults(defaults, str(path))


def check_generation_defaults(defaults: dict, where: str = "generation defaults") -> dict:
    """`defaults` (a dict of DEFAULTABLE_SETTINGS) when a request accepts them, else a UserError."""
    if not isinstance(defaults, dict) or set(defaults) - set(DEFAULTABLE_SETTINGS):
        raise UserError(f"{where}: expected a JSON object with keys among {', '.join(DEFAULTABLE_SETTINGS)}")
    GenerationRequest("", **defaults)                   # the same checks as a request's
    return dict(defaults)
