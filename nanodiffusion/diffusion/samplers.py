"""Samplers: functions of a denoiser `model(x, sigma) -> x0_hat`, a start `x` and decreasing `sigmas`.

Every sampler has the signature `sample_NAME(model, x, sigmas, *, generator=None, callback=None, **options)`,
works on x = x0 + sigma·eps (k-diffusion's parametrisation) and returns x at sigmas[-1]. One-step methods
live in samplers_onestep, multistep ones in samplers_multistep; `sampling_plan.make_sigmas` builds the grid
on which each retraces its diffusers scheduler (docs/samplers.md has the table).
"""

from typing import Callable

from nanodiffusion.diffusion.samplers_multistep import (
    sample_dpmpp_2m, sample_dpmpp_2m_sde, sample_lms, sample_plms, sample_unipc,
)
from nanodiffusion.diffusion.samplers_onestep import (
    ancestral_step, lcm_boundary_condition, sample_ddim, sample_ddpm, sample_dpm_2, sample_dpm_2_ancestral,
    sample_euler, sample_euler_ancestral, sample_heun, sample_lcm,
)
from nanodiffusion.errors import UserError

SAMPLERS = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "plms": sample_plms,
    "lms": sample_lms,
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "heun": sample_heun,
    "dpm_2": sample_dpm_2,
    "dpm_2_ancestral": sample_dpm_2_ancestral,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "unipc": sample_unipc,
    "lcm": sample_lcm,
}

__all__ = [
    "SAMPLERS", "get_sampler", "ancestral_step", "lcm_boundary_condition", "sample_ddpm", "sample_ddim",
    "sample_plms", "sample_lms", "sample_euler", "sample_euler_ancestral", "sample_heun", "sample_dpm_2",
    "sample_dpm_2_ancestral", "sample_dpmpp_2m", "sample_dpmpp_2m_sde", "sample_unipc", "sample_lcm",
]


def get_sampler(name: str) -> Callable:
    """Return the sampler called `name`, or raise a UserError listing the valid names."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise UserError(f"unknown sampler {name!r}; valid: {', '.join(SAMPLERS)}") from None
