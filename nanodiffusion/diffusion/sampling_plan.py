"""From (sampler, number of steps, schedule) to the sigma grid, start noise and final latent of a run.

Our samplers only see sigmas. Each diffusers scheduler picks its discrete timesteps by its own rules; this
module writes those rules down as pure functions so that `SAMPLERS[name](model, x, sigmas)` on
`make_sigmas(name, ...)` retraces the scheduler step for step (tests/test_sampler_parity.py checks it against
diffusers 0.42; docs/samplers.md lists where it cannot, e.g. the timesteps some schedulers round).

Defaults are Stable Diffusion v1.x's scheduler/scheduler_config.json: scaled_linear betas 0.00085 -> 0.012,
steps_offset=1, set_alpha_to_one=False, skip_prk_steps=True and no `timestep_spacing`, so each scheduler
class falls back on its own default spacing (GRIDS below).
"""

import math
from typing import NamedTuple

import torch

from nanodiffusion.diffusion.schedules import (
    AYS_SD15_SIGMAS, alphas_cumprod_to_sigmas, check_num_steps, get_sigmas_align_your_steps, get_sigmas_beta,
    get_sigmas_ddim_uniform, get_sigmas_exponential, get_sigmas_karras, get_sigmas_normal, get_sigmas_simple,
    get_timesteps, t_to_sigma,
)
from nanodiffusion.errors import UserError


class Grid(NamedTuple):
    family: str              # which diffusers rules pick the timesteps, see below
    spacing: str | None      # the scheduler class's default timestep_spacing
    final_sigma: str         # "zero", or "sigma_min" = sigma of ᾱ_0


# Families, after the diffusers classes that run the samplers:
#   "discrete":  DDPM/DDIM/PNDMScheduler: integer timesteps, sigma read from the table. DDIM and PNDM end at
#                ᾱ_0 because SD sets set_alpha_to_one=False; DDPMScheduler always ends at ᾱ = 1.
#   "k":         Euler(Ancestral)/Heun/KDPM2(Ancestral)/LMSDiscreteScheduler: fractional timesteps, sigma
#                interpolated linearly in sigma; Karras/exponential grids span the spaced grid's ends.
#   "multistep": DPMSolverMultistep/UniPCMultistepScheduler: n+1 spaced integer timesteps less the last
#                (t = 0 for linspace); Karras/exponential grids span the whole table.
#   "lcm":       LCM/TCDScheduler: n of the `original_steps` timesteps it was distilled on; no spacing option.
# Samplers diffusers lacks take the family of the scheduler class closest to theirs.
GRIDS = {
    "ddpm": Grid("discrete", "leading", "zero"),
    "ddim": Grid("discrete", "leading", "sigma_min"),
    "plms": Grid("discrete", "leading", "sigma_min"),
    "lms": Grid("k", "linspace", "zero"),
    "euler": Grid("k", "linspace", "zero"),
    "euler_ancestral": Grid("k", "linspace", "zero"),
    "heun": Grid("k", "linspace", "zero"),
    "dpm_2": Grid("k", "linspace", "zero"),
    "dpm_2_ancestral": Grid("k", "linspace", "zero"),
    "dpmpp_2m": Grid("multistep", "linspace", "zero"),
    "dpmpp_2m_sde": Grid("multistep", "linspace", "zero"),
    "unipc": Grid("multistep", "linspace", "zero"),
    "lcm": Grid("lcm", None, "zero"),
    "dpmpp_2s_ancestral": Grid("k", "linspace", "zero"),
    "dpmpp_sde": Grid("k", "linspace", "zero"),                  # DPMSolverSDEScheduler
    "dpmpp_2m_sde_heun": Grid("multistep", "linspace", "zero"),    # DPMSolverMultistep, solver_type heun
    "dpmpp_3m_sde": Grid("multistep", "linspace", "zero"),         # DPMSolverMultistep, solver_order 3
    "restart": Grid("k", "linspace", "zero"),
    "tcd": Grid("lcm", None, "sigma_min"),                          # TCDScheduler ends at ᾱ_0
}


def _beta(n: int, table: torch.Tensor) -> torch.Tensor:
    return get_sigmas_beta(n, float(table[0]), float(table[-1]))


def _align_your_steps(n: int, table: torch.Tensor) -> torch.Tensor:
    """AYS's published sigmas are rounded to 3 decimals and only fit SD v1.x's schedule (0.0292 to 14.61)."""
    sigma_min, sigma_max = float(table[0]), float(table[-1])
    if abs(AYS_SD15_SIGMAS[0] - sigma_max) > 1e-3 or abs(AYS_SD15_SIGMAS[-1] - sigma_min) > 1e-3:
        raise UserError(f"align_your_steps has sigmas for SD v1.x's noise schedule ({AYS_SD15_SIGMAS[-1]} to "
                        f"{AYS_SD15_SIGMAS[0]}); this model's runs from {sigma_min:.4g} to {sigma_max:.4g}")
    return get_sigmas_align_your_steps(n)


# A1111's schedules (in schedules.py): sigmas over the whole table whatever the sampler, num_steps + 1 with 0
TABLE_SCHEDULES = {
    "uniform": get_sigmas_normal, "normal": get_sigmas_normal,
    "sgm_uniform": lambda n, table: get_sigmas_normal(n, table, sgm=True),
    "simple": get_sigmas_simple, "ddim": get_sigmas_ddim_uniform, "beta": _beta,
    "align_your_steps": _align_your_steps,
}
SIGMA_SCHEDULES = ("default", "karras", "exponential", *TABLE_SCHEDULES)
FINAL_SIGMAS = ("zero", "sigma_min")


def _grid(sampler: str) -> Grid:
    if sampler not in GRIDS:
        raise UserError(f"unknown sampler {sampler!r}; valid: {', '.join(GRIDS)}")
    return GRIDS[sampler]


def _spaced_timesteps(family: str, num_steps: int, T: int, spacing: str, steps_offset: int) -> torch.Tensor:
    """Return the decreasing float64 timesteps a diffusers scheduler of `family` visits."""
    if family == "multistep" and spacing in ("linspace", "leading"):
        if num_steps >= T:
            raise UserError(f"{spacing} spacing for multistep samplers takes at most {T - 1} steps")
        t = get_timesteps(num_steps + 1, T, spacing, steps_offset)[:-1]
    else:
        t = get_timesteps(num_steps, T, spacing, steps_offset)
    if family != "k":
        t = t.round()                                   # these schedulers keep integer timesteps
    if t.max() > T - 1 or t.min() < 0:
        raise UserError(f"{num_steps} steps with steps_offset={steps_offset} leave the schedule's timesteps "
                        f"0..{T - 1}; use fewer steps or steps_offset=0")
    return t


def _lcm_timesteps(num_steps: int, T: int, original_steps: int) -> torch.Tensor:
    """Return LCMScheduler's timesteps: `num_steps` evenly picked from the distillation grid k·j - 1.

    Luo et al. 2023 distil on `original_steps` timesteps (50 for SD v1.5), k = T // original_steps apart.
    """
    if not 1 <= num_steps <= original_steps <= T:
        raise UserError(f"LCM needs 1 <= num_steps <= original_steps <= {T}, "
                        f"got {num_steps} and {original_steps}")
    k = T // original_steps
    origin = torch.arange(original_steps, 0, -1, dtype=torch.float64) * k - 1      # (original_steps,) falling
    index = torch.floor(torch.arange(num_steps, dtype=torch.float64) * (original_steps / num_steps)).long()
    return origin[index]


def make_sigmas(sampler: str, num_steps: int, alphas_cumprod: torch.Tensor, *,
                sigma_schedule: str = "default", spacing: str | None = None, steps_offset: int = 1,
                final_sigma: str | None = None, original_steps: int = 50) -> torch.Tensor:
    """Return the float64 sigma grid (num_steps + 1 values, decreasing) on which `sampler` retraces diffusers.

    `sigma_schedule`: "default" (the spaced timesteps), "karras" (Karras et al. 2022, eq. 5) or "exponential",
    as diffusers' use_karras_sigmas / use_exponential_sigmas, or one of A1111's TABLE_SCHEDULES; `spacing`:
    timestep_spacing "leading", "trailing" or "linspace" (None: the scheduler's default; LCM and TCD take
    none); `final_sigma`: "zero" or "sigma_min".
    """
    family, default_spacing, default_final = _grid(sampler)
    if sigma_schedule not in SIGMA_SCHEDULES:
        raise UserError(f"unknown sigma schedule {sigma_schedule!r}; valid: {', '.join(SIGMA_SCHEDULES)}")
    final_sigma = final_sigma or default_final
    if final_sigma not in FINAL_SIGMAS:
        raise UserError(f"unknown final sigma {final_sigma!r}; valid: {', '.join(FINAL_SIGMAS)}")
    if family == "lcm" and spacing is not None:
        raise UserError(f"{sampler} walks its own distillation timesteps: leave spacing unset")
    table = alphas_cumprod_to_sigmas(alphas_cumprod.double())                          # (T,) increasing
    T = len(table)
    check_num_steps(num_steps, T)
    if sigma_schedule in TABLE_SCHEDULES:
        sigmas = TABLE_SCHEDULES[sigma_schedule](num_steps, table)[:-1]
    else:
        if family == "lcm":
            t = _lcm_timesteps(num_steps, T, original_steps)
        else:
            t = _spaced_timesteps(family, num_steps, T, spacing or default_spacing, steps_offset)
        sigmas = t_to_sigma(t, table, interpolation="linear")                         # (num_steps,)
    if sigma_schedule in ("karras", "exponential"):
        # diffusers' k-schedulers stretch the new grid over the spaced one, the multistep ones over the table
        low, high = (table[0], table[-1]) if family in ("multistep", "lcm") else (sigmas[-1], sigmas[0])
        grid = get_sigmas_karras if sigma_schedule == "karras" else get_sigmas_exponential
        sigmas = grid(num_steps, float(low), float(high))[:-1]
    last = table[:1] if final_sigma == "sigma_min" else table.new_zeros(1)
    return torch.cat([sigmas, last])


def uses_spacing(sampler: str) -> bool:
    """False for samplers that walk their own timesteps (LCM, TCD): a model's spacing is not theirs."""
    return _grid(sampler).family != "lcm"


def _holds_vp(sampler: str) -> bool:
    """True where the diffusers loop holds x_vp (init_noise_sigma = 1), False for k-style ones holding x."""
    return _grid(sampler).family != "k"


def initial_noise_scale(sampler: str, sigmas: torch.Tensor, *, spacing: str | None = None) -> float:
    """Return c such that x_T = c · N(0, I) starts `sampler` on `sigmas` as the diffusers pipeline does.

    Our x is VE-scaled, x = x_vp · sqrt(1 + sigma²): VP-style schedulers start from x_vp = noise, i.e.
    c = sqrt(1 + sigma_max²); k-style ones use c = sigma_max for linspace/trailing spacing (as k-diffusion)
    and sqrt(1 + sigma_max²) for "leading" (their `init_noise_sigma`). Pass make_sigmas' `spacing` here.
    """
    sigma_max = float(sigmas[0])
    if not _holds_vp(sampler) and (spacing or _grid(sampler).spacing) in ("linspace", "trailing"):
        return sigma_max
    return math.sqrt(1 + sigma_max**2)


def final_latent(sampler: str, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Return the latent the diffusers pipeline decodes once `sampler` has run to sigmas[-1].

    That is the VP latent x / sqrt(1 + sigma_last²) for VP-style schedulers (DDIM and PLMS end at ᾱ_0 in SD)
    and x itself for k-style ones; both are x when the grid ends at 0.
    """
    if not _holds_vp(sampler):
        return x
    return x / math.sqrt(1 + float(sigmas[-1]) ** 2)
