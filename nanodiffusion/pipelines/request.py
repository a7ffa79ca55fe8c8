"""The settings of one text-to-image generation (`GenerationRequest`), what a pipeline call returns, and the
generation defaults a model folder may carry.
"""

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from nanodiffusion.config import JSONConfig
from nanodiffusion.diffusion.sampler_options import check_options
from nanodiffusion.diffusion.samplers import get_sampler, resolve_sampler
from nanodiffusion.diffusion.sampling_plan import check_sigma_schedule
from nanodiffusion.diffusion.schedules import check_num_steps
from nanodiffusion.errors import UserError
from nanodiffusion.nets.token_merging import check_ratio

DEFAULT_SAMPLER = "pndm"                # diffusers' default for SD v1.x (our plms)
OUTPUT_TYPES = ("pil", "np", "latent")


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
    # the sampler's own options (diffusion/sampler_options.py), e.g. {"eta": 0.5}; left out: its defaults
    sampler_options: dict = field(default_factory=dict)

    def __post_init__(self):
        prompts = self.prompts
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise UserError("prompt must be a string or a non-empty list of strings")
        negative = self.negative_prompt
        if isinstance(negative, (list, tuple)) and len(negative) != len(prompts):
            raise UserError(f"got {len(prompts)} prompts but {len(negative)} negative prompts: pass one "
                            "negative prompt for all, or one per prompt")
        check_num_steps(self.num_steps)
        if not self.guidance_scale >= 0:
            raise UserError(f"guidance scale must be >= 0, got {self.guidance_scale}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 8 or value % 8):
                raise UserError(f"{name} must be a positive multiple of 8, got {value!r}")
        if not isinstance(self.num_images_per_prompt, int) or self.num_images_per_prompt < 1:
            raise UserError(f"num_images_per_prompt must be >= 1, got {self.num_images_per_prompt!r}")
        options = self.sampler_options
        if not isinstance(options, dict) or not all(isinstance(name, str) for name in options):
            raise UserError(f"sampler_options must map option names to values, got {options!r}")
        check_options(resolve_sampler(self.sampler), get_sampler(self.sampler), options)
        check_sigma_schedule(self.sigma_schedule)
        if not 0 <= self.strength <= 1:
            raise UserError(f"strength must be between 0 and 1, got {self.strength}")
        if not isinstance(self.clip_skip, int) or self.clip_skip < 1:
            raise UserError(f"clip_skip must be an integer >= 1, got {self.clip_skip!r}")
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
    def from_settings(cls, prompt: str | list[str], negative_prompt: str | list[str] | None = None,
                      **settings) -> "GenerationRequest":
        """A request from keyword settings, as a pipeline call takes them; unknown names are a UserError."""
        unknown = set(settings) - {field.name for field in fields(cls)}
        if unknown:
            raise UserError(f"unknown generation settings: {', '.join(sorted(unknown))}")
        return cls(prompt, negative_prompt, **settings)


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
