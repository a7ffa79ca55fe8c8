"""Samplers: functions of a denoiser `model(x, sigma) -> x0_hat`, a start `x` and decreasing `sigmas`.

Every sampler has the signature `sample_NAME(model, x, sigmas, *, generator=None, callback=None, **options)`,
works on x = x0 + sigma·eps (k-diffusion's parametrisation) and returns x at sigmas[-1]. One-step methods
live in samplers_onestep, multistep ones in samplers_multistep, the DPM-Solver++ family in samplers_dpmpp and
Restart in samplers_restart; `sampling_plan.make_sigmas` builds the grid on which each retraces its diffusers
scheduler (docs/samplers.md has the table); `sampler_options(name)` lists the options a sampler takes.
"""

from typing import Callable

from nanodiffusion.diffusion.sampler_noise import ancestral_step
from nanodiffusion.diffusion.sampler_options import accepted_options
from nanodiffusion.diffusion.samplers_dpmpp import (
    sample_dpmpp_2m, sample_dpmpp_2m_sde, sample_dpmpp_2m_sde_heun, sample_dpmpp_2s_ancestral,
    sample_dpmpp_3m_sde, sample_dpmpp_sde,
)
from nanodiffusion.diffusion.samplers_multistep import sample_lms, sample_plms, sample_unipc
from nanodiffusion.diffusion.samplers_onestep import (
    lcm_boundary_condition, sample_ddim, sample_ddpm, sample_dpm_2, sample_dpm_2_ancestral, sample_euler,
    sample_euler_ancestral, sample_heun, sample_lcm, sample_tcd,
)
from nanodiffusion.diffusion.samplers_restart import sample_restart
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
    "dpmpp_2s_ancestral": sample_dpmpp_2s_ancestral,
    "dpmpp_sde": sample_dpmpp_sde,
    "dpmpp_2m_sde_heun": sample_dpmpp_2m_sde_heun,
    "dpmpp_3m_sde": sample_dpmpp_3m_sde,
    "restart": sample_restart,
    "tcd": sample_tcd,
}

__all__ = [
    "SAMPLERS", "get_sampler", "ancestral_step", "lcm_boundary_condition", "sample_ddpm", "sample_ddim",
    "sample_plms", "sample_lms", "sample_euler", "sample_euler_ancestral", "sample_heun", "sample_dpm_2",
    "sample_dpm_2_ancestral", "sample_dpmpp_2m", "sample_dpmpp_2m_sde", "sample_unipc", "sample_lcm",
    "sample_dpmpp_2s_ancestral", "sample_dpmpp_sde", "sample_dpmpp_2m_sde_heun", "sample_dpmpp_3m_sde",
    "sample_restart", "sample_tcd", "sampler_options",
]


def get_sampler(name: str) -> Callable:
    """Return the sampler called `name`, or raise a UserError listing the valid names."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise UserError(f"unknown sampler {name!r}; valid: {', '.join(SAMPLERS)}") from None


def sampler_options(name: str) -> dict[str, object]:
    """The options sampler `name` takes and their defaults, e.g. {"eta": 1.0, "s_noise": 1.0} for Euler a."""
    return accepted_options(get_sampler(name))
