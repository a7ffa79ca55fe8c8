"""From (sampler, number of steps, schedule) to the sigma grid, start noise and final latent of a run; and a
diffusers scheduler config read into the few settings this needs.

Our samplers only see sigmas. Each diffusers scheduler picks its discrete timesteps by its own rules; this
module writes those rules down as pure functions so that `SAMPLERS[name].function(model, x, sigmas)` on
`make_sigmas(name, ...)` retraces the scheduler step for step (tests/test_sampler_parity.py checks it against
diffusers 0.42; docs/samplers.md lists where it cannot, e.g. the timesteps some schedulers round). Which rules
a sampler follows is its `Grid` in the registry (samplers.py).

A scheduler config is read the way diffusers' `SchedulerClass.from_config(pipe.scheduler.config)` reads one
when it swaps the scheduler: keys the file sets apply to every sampler, keys it leaves out take each sampler's
own default. Stable Diffusion v1.x's file (scaled_linear betas 0.00085 -> 0.012, steps_offset=1,
set_alpha_to_one=False) sets no `timestep_spacing`, so Euler walks "linspace" timesteps and PNDM "leading" ones.
"""

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from nanodiffusion.diffusion.samplers import SAMPLERS, Grid, resolve_sampler
from nanodiffusion.diffusion.schedules import (
    AYS_SD15_SIGMAS, ScheduleConfig, alphas_cumprod_to_sigmas, check_num_steps, get_alphas_cumprod,
    get_sigmas_align_your_steps, get_sigmas_beta, get_sigmas_ddim_uniform, get_sigmas_exponential,
    get_sigmas_karras, get_sigmas_normal, get_sigmas_simple, get_timesteps, t_to_sigma,
)
from nanodiffusion.errors import UserError



class SigmaSchedule(NamedTuple):
    """A way to space the sigmas of a grid, and its label in A1111 ("Schedule type")."""

    make: Callable | None       # n sigmas then 0, from the arguments `span` names; None: the scheduler's own
    a1111: str
    # "sampler": make(n, sigma_min, sigma_max) over the span of the sampler's own grid, as diffusers'
    # use_karras_sigmas; "table": make(n, table) from the (T,) increasing table, A1111's whatever the sampler
    span: str = "sampler"


def _sigmas_beta(n: int, table: torch.Tensor) -> torch.Tensor:
    """A1111's "Beta" spans the whole table."""
    return get_sigmas_beta(n, float(table[0]), float(table[-1]))


def _sigmas_sgm_uniform(n: int, table: torch.Tensor) -> torch.Tensor:
    return get_sigmas_normal(n, table, sgm=True)


def _sigmas_align_your_steps(n: int, table: torch.Tensor) -> torch.Tensor:
    """AYS's published sigmas are rounded to 3 decimals and only fit SD v1.x's schedule (0.0292 to 14.61)."""
    sigma_min, sigma_max = float(table[0]), float(table[-1])
    if abs(AYS_SD15_SIGMAS[0] - sigma_max) > 1e-3 or abs(AYS_SD15_SIGMAS[-1] - sigma_min) > 1e-3:
        raise UserError(f"align_your_steps has sigmas for SD v1.x's noise schedule ({AYS_SD15_SIGMAS[-1]} to "
                        f"{AYS_SD15_SIGMAS[0]}); this model's runs from {sigma_min:.4g} to {sigma_max:.4g}")
    return get_sigmas_align_your_steps(n)


SIGMA_SCHEDULES = {
    "default": SigmaSchedule(None, "Automatic"),                        # the scheduler's spaced timesteps
    "karras": SigmaSchedule(get_sigmas_karras, "Karras"),               # Karras et al. 2022, eq. 5
    "exponential": SigmaSchedule(get_sigmas_exponential, "Exponential"),
    # A1111's schedules (its modules/sd_schedulers.py); "SGM Uniform" before "Uniform", which it ends with
    "sgm_uniform": SigmaSchedule(_sigmas_sgm_uniform, "SGM Uniform", "table"),
    "uniform": SigmaSchedule(get_sigmas_normal, "Uniform", "table"),
    "normal": SigmaSchedule(get_sigmas_normal, "Normal", "table"),
    "simple": SigmaSchedule(get_sigmas_simple, "Simple", "table"),
    "ddim": SigmaSchedule(get_sigmas_ddim_uniform, "DDIM", "table"),
    "beta": SigmaSchedule(_sigmas_beta, "Beta", "table"),
    "align_your_steps": SigmaSchedule(_sigmas_align_your_steps, "Align Your Steps", "table"),
}
FINAL_SIGMAS = ("zero", "sigma_min")


def check_sigma_schedule(name: str) -> str:
    """`name` when it is a key of SIGMA_SCHEDULES, else a UserError listing them."""
    if name not in SIGMA_SCHEDULES:
        raise UserError(f"unknown sigma schedule {name!r}; valid: {', '.join(SIGMA_SCHEDULES)}")
    return name


def _grid(sampler: str) -> Grid:
    return SAMPLERS[resolve_sampler(sampler)].grid


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

    `sigma_schedule`: a key of SIGMA_SCHEDULES: "default" (the spaced timesteps), "karras" (Karras et al.
    2022, eq. 5) or "exponential" as diffusers' use_karras_sigmas / use_exponential_sigmas, or one of A1111's;
    `spacing`: timestep_spacing "leading", "trailing" or "linspace" (None: the scheduler's default; LCM and
    TCD take none); `final_sigma`: "zero" or "sigma_min".
    """
    family, default_spacing, default_final = _grid(sampler)
    schedule = SIGMA_SCHEDULES[check_sigma_schedule(sigma_schedule)]
    final_sigma = final_sigma or default_final
    if final_sigma not in FINAL_SIGMAS:
        raise UserError(f"unknown final sigma {final_sigma!r}; valid: {', '.join(FINAL_SIGMAS)}")
    if family == "lcm" and spacing is not None:
        raise UserError(f"{sampler} walks its own distillation timesteps: leave spacing unset")
    table = alphas_cumprod_to_sigmas(alphas_cumprod.double())                          # (T,) increasing
    T = len(table)
    check_num_steps(num_steps, T)
    if schedule.span == "table":
        sigmas = schedule.make(num_steps, table)[:-1]
    else:
        if family == "lcm":
            t = _lcm_timesteps(num_steps, T, original_steps)
        else:
            t = _spaced_timesteps(family, num_steps, T, spacing or default_spacing, steps_offset)
        sigmas = t_to_sigma(t, table, interpolation="linear")                         # (num_steps,)
    if schedule.span == "sampler" and schedule.make is not None:
        # diffusers' k-schedulers stretch the new grid over the spaced one, the multistep ones over the table
        low, high = (table[0], table[-1]) if family in ("multistep", "lcm") else (sigmas[-1], sigmas[0])
        sigmas = schedule.make(num_steps, float(low), float(high))[:-1]
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


def img2img_sigmas(sigmas: torch.Tensor, strength: float) -> torch.Tensor:
    """The tail of a sampler's sigma grid that img2img (SDEdit, Meng et al. 2022) runs: the last
    int(num_steps·strength) steps; diffusers' img2img pipelines start at timesteps[num_steps - that]."""
    num_steps = len(sigmas) - 1
    return sigmas[num_steps - min(int(num_steps * strength), num_steps):]


# diffusers' beta_schedule names -> ours (ScheduleConfig.kind)
BETA_SCHEDULES = {"scaled_linear": "scaled_linear", "linear": "linear", "squaredcos_cap_v2": "cosine"}


@dataclass(frozen=True)
class SchedulerSettings:
    """What our samplers take from a diffusers `scheduler_config.json`."""

    alphas_cumprod: torch.Tensor    # (T,) float64
    prediction: str                 # "epsilon" or "v_prediction"
    steps_offset: int = 0
    spacing: str | None = None      # None: each sampler's own default timestep spacing
    set_alpha_to_one: bool = True   # DDIM/PLMS end at ᾱ = 1 instead of ᾱ_0

    @classmethod
    def from_diffusers_config(cls, config: dict) -> "SchedulerSettings":
        """Read a scheduler config dict; unsupported schedules are a UserError."""
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

    @classmethod
    def from_schedule(cls, schedule: ScheduleConfig, prediction: str) -> "SchedulerSettings":
        """A schedule with diffusers' defaults for the rest, as a scheduler config naming only it would be."""
        return cls(get_alphas_cumprod(schedule), prediction)

    def sigmas(self, sampler: str, num_steps: int, sigma_schedule: str = "default") -> torch.Tensor:
        """The float64 sigma grid on which `sampler` retraces its diffusers scheduler under these settings."""
        sampler = resolve_sampler(sampler)
        final = "zero" if sampler in ("ddim", "plms") and self.set_alpha_to_one else None
        spacing = self.spacing if uses_spacing(sampler) else None     # LCM/TCD ignore the folder's spacing
        return make_sigmas(sampler, num_steps, self.alphas_cumprod, sigma_schedule=sigma_schedule,
                           spacing=spacing, steps_offset=self.steps_offset, final_sigma=final)
