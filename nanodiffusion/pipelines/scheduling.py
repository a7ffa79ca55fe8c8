"""Which sampler, on which sigma grid: sampler names and aliases, and a diffusers scheduler config read into
the few settings our samplers need (the schedule, prediction type, timestep spacing and offset).

Read the way diffusers' `SchedulerClass.from_config(pipe.scheduler.config)` reads a config when it swaps the
scheduler: keys the file sets apply to every sampler, keys it leaves out take each sampler's own default
(SD v1.5's file sets no `timestep_spacing`, so Euler walks "linspace" timesteps and PNDM "leading" ones).
"""

from dataclasses import dataclass

import torch

from nanodiffusion.diffusion.samplers import SAMPLERS
from nanodiffusion.diffusion.sampling_plan import make_sigmas, uses_spacing
from nanodiffusion.diffusion.schedules import ScheduleConfig, get_alphas_cumprod
from nanodiffusion.errors import UserError
from nanodiffusion.pipelines.metadata import A1111_SAMPLER_NAMES

DEFAULT_SAMPLER = "pndm"
# Other names for our samplers: diffusers' scheduler classes, k-diffusion's and A1111's labels.
SAMPLER_ALIASES = {
    "pndm": "plms", "euler_a": "euler_ancestral", "k_euler": "euler", "k_euler_ancestral": "euler_ancestral",
    "k_lms": "lms", "k_heun": "heun", "k_dpm_2": "dpm_2", "k_dpm_2_ancestral": "dpm_2_ancestral",
    "dpm++_2m": "dpmpp_2m", "dpmsolver++": "dpmpp_2m", "dpm++_2m_sde": "dpmpp_2m_sde", "uni_pc": "unipc",
    "DDPMScheduler": "ddpm", "DDIMScheduler": "ddim", "PNDMScheduler": "plms", "LMSDiscreteScheduler": "lms",
    "EulerDiscreteScheduler": "euler", "EulerAncestralDiscreteScheduler": "euler_ancestral",
    "HeunDiscreteScheduler": "heun", "KDPM2DiscreteScheduler": "dpm_2",
    "KDPM2AncestralDiscreteScheduler": "dpm_2_ancestral", "DPMSolverMultistepScheduler": "dpmpp_2m",
    "UniPCMultistepScheduler": "unipc", "LCMScheduler": "lcm",
    "k_dpmpp_2s_a": "dpmpp_2s_ancestral", "k_dpmpp_sde": "dpmpp_sde", "k_dpmpp_3m_sde": "dpmpp_3m_sde",
    "k_dpmpp_2m_sde_heun": "dpmpp_2m_sde_heun", "dpm++_2s_a": "dpmpp_2s_ancestral", "dpm++_sde": "dpmpp_sde",
    "dpm++_3m_sde": "dpmpp_3m_sde", "dpmpp_sde_gpu": "dpmpp_sde", "dpmpp_2m_sde_gpu": "dpmpp_2m_sde",
    "dpmpp_3m_sde_gpu": "dpmpp_3m_sde", "DPMSolverSDEScheduler": "dpmpp_sde", "TCDScheduler": "tcd",
    **{label: name for name, label in A1111_SAMPLER_NAMES.items()},
}
BETA_SCHEDULES = {"scaled_linear": "scaled_linear", "linear": "linear", "squaredcos_cap_v2": "cosine"}


def resolve_sampler(name: str) -> str:
    """Our sampler name (a key of SAMPLERS) for `name` or an alias of it ("pndm", "euler_a", "Euler a")."""
    name = SAMPLER_ALIASES.get(name, name)
    if name not in SAMPLERS:
        raise UserError(f"unknown sampler {name!r}; valid: {', '.join(SAMPLERS)} "
                        f"(aliases: {', '.join(SAMPLER_ALIASES)})")
    return name


@dataclass(frozen=True)
class SchedulerSettings:
    """What our samplers take from a diffusers `scheduler_config.json`."""

    alphas_cumprod: torch.Tensor    # (T,) float64
    prediction: str                 # "epsilon" or "v_prediction"
    steps_offset: int
    spacing: str | None             # None: each sampler's own default timestep spacing
    set_alpha_to_one: bool          # DDIM/PLMS end at ᾱ = 1 instead of ᾱ_0

    @classmethod
    def from_diffusers_config(cls, config: dict) -> "SchedulerSettings":
        # keys that diffusers filled in with its defaults do not carry over to another scheduler class
        config = {k: v for k, v in config.items() if k not in config.get("_use_default_values", ())}
        if config.get("trained_betas") is not None:
            raise UserError("schedules given as trained_betas are not supported")
        beta_schedule = config.get("beta_schedule", "linear")
        if beta_schedule not in BETA_SCHEDULES:
            raise UserError(f"unsupported beta_schedule {beta_schedule!r}; "
                            f"valid: {', '.join(BETA_SCHEDULES)}")
        kind = BETA_SCHEDULES[beta_schedule]
        betas = {} if kind == "cosine" else {"beta_start": config.get("beta_start", 0.0001),
                                             "beta_end": config.get("beta_end", 0.02)}
        schedule = ScheduleConfig(kind, config.get("num_train_timesteps", 1000), **betas)
        return cls(get_alphas_cumprod(schedule), config.get("prediction_type", "epsilon"),
                   config.get("steps_offset", 0), config.get("timestep_spacing"),
                   bool(config.get("set_alpha_to_one", True)))

    def sigmas(self, sampler: str, num_steps: int, sigma_schedule: str = "default") -> torch.Tensor:
        """The float64 sigma grid on which `sampler` retraces its diffusers scheduler under these settings."""
        sampler = resolve_sampler(sampler)
        final = "zero" if sampler in ("ddim", "plms") and self.set_alpha_to_one else None
        spacing = self.spacing if uses_spacing(sampler) else None     # LCM/TCD ignore the folder's spacing
        return make_sigmas(sampler, num_steps, self.alphas_cumprod, sigma_schedule=sigma_schedule,
                           spacing=spacing, steps_offset=self.steps_offset, final_sigma=final)
