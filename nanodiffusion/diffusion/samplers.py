"""The sampler registry: for each sampler its function, the sigma grid it walks, AUTOMATIC1111's label and
the other names it goes by. Adding a sampler is one entry in SAMPLERS.

Every sampler has the signature `sample_NAME(model, x, sigmas, *, generator=None, callback=None, **options)`,
works on x = x0 + sigma·eps (k-diffusion's parametrisation) and returns x at sigmas[-1]. One-step methods
live in samplers_onestep, multistep ones in samplers_multistep, the DPM-Solver++ family in samplers_dpmpp and
Restart in samplers_restart; `sampling_plan.make_sigmas` builds the grid on which each retraces its diffusers
scheduler (docs/samplers.md has the table); `sampler_options(name)` lists the options a sampler takes.
"""

from typing import Callable, NamedTuple

from nanodiffusion.diffusion.sampler_options import accepted_options
from nanodiffusion.diffusion.samplers_dpmpp import (
    sample_dpmpp_2m, sample_dpmpp_2m_sde, sample_dpmpp_2m_sde_heun, sample_dpmpp_2s_ancestral,
    sample_dpmpp_3m_sde, sample_dpmpp_sde,
)
from nanodiffusion.diffusion.samplers_multistep import sample_lms, sample_plms, sample_unipc
from nanodiffusion.diffusion.samplers_onestep import (
    sample_ddim, sample_ddpm, sample_dpm_2, sample_dpm_2_ancestral, sample_euler, sample_euler_ancestral,
    sample_heun, sample_lcm, sample_tcd,
)
from nanodiffusion.diffusion.samplers_restart import sample_restart
from nanodiffusion.errors import UserError


class Grid(NamedTuple):
    """The timestep rules of the diffusers scheduler class that a sampler retraces (sampling_plan)."""

    family: str              # "discrete", "k", "multistep" or "lcm": see below
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
DISCRETE = Grid("discrete", "leading", "zero")
DISCRETE_TO_SIGMA_MIN = Grid("discrete", "leading", "sigma_min")
K_DIFFUSION = Grid("k", "linspace", "zero")
MULTISTEP = Grid("multistep", "linspace", "zero")


class Sampler(NamedTuple):
    """One entry of the registry."""

    function: Callable              # sample_NAME(model, x, sigmas, *, generator=None, callback=None)
    grid: Grid
    a1111: str                      # A1111's label: PNG infotext, its API's sampler_name
    aliases: tuple[str, ...] = ()   # other names accepted: diffusers' scheduler class, k-diffusion's...


SAMPLERS = {
    "ddpm": Sampler(sample_ddpm, DISCRETE, "DDPM", ("DDPMScheduler",)),
    "ddim": Sampler(sample_ddim, DISCRETE_TO_SIGMA_MIN, "DDIM", ("DDIMScheduler",)),
    "plms": Sampler(sample_plms, DISCRETE_TO_SIGMA_MIN, "PLMS", ("pndm", "PNDMScheduler")),
    "lms": Sampler(sample_lms, K_DIFFUSION, "LMS", ("k_lms", "LMSDiscreteScheduler")),
    "euler": Sampler(sample_euler, K_DIFFUSION, "Euler", ("k_euler", "EulerDiscreteScheduler")),
    "euler_ancestral": Sampler(sample_euler_ancestral, K_DIFFUSION, "Euler a",
                               ("euler_a", "k_euler_ancestral", "EulerAncestralDiscreteScheduler")),
    "heun": Sampler(sample_heun, K_DIFFUSION, "Heun", ("k_heun", "HeunDiscreteScheduler")),
    "dpm_2": Sampler(sample_dpm_2, K_DIFFUSION, "DPM2", ("k_dpm_2", "KDPM2DiscreteScheduler")),
    "dpm_2_ancestral": Sampler(sample_dpm_2_ancestral, K_DIFFUSION, "DPM2 a",
                               ("k_dpm_2_ancestral", "KDPM2AncestralDiscreteScheduler")),
    "dpmpp_2m": Sampler(sample_dpmpp_2m, MULTISTEP, "DPM++ 2M",
                        ("dpm++_2m", "dpmsolver++", "DPMSolverMultistepScheduler")),
    "dpmpp_2m_sde": Sampler(sample_dpmpp_2m_sde, MULTISTEP, "DPM++ 2M SDE",
                            ("dpm++_2m_sde", "dpmpp_2m_sde_gpu")),
    "unipc": Sampler(sample_unipc, MULTISTEP, "UniPC", ("uni_pc", "UniPCMultistepScheduler")),
    "lcm": Sampler(sample_lcm, Grid("lcm", None, "zero"), "LCM", ("LCMScheduler",)),
    "dpmpp_2s_ancestral": Sampler(sample_dpmpp_2s_ancestral, K_DIFFUSION, "DPM++ 2S a",
                                  ("k_dpmpp_2s_a", "dpm++_2s_a")),
    "dpmpp_sde": Sampler(sample_dpmpp_sde, K_DIFFUSION, "DPM++ SDE",
                         ("k_dpmpp_sde", "dpm++_sde", "dpmpp_sde_gpu", "DPMSolverSDEScheduler")),
    # DPMSolverMultistepScheduler with solver_type "heun", and with solver_order 3
    "dpmpp_2m_sde_heun": Sampler(sample_dpmpp_2m_sde_heun, MULTISTEP, "DPM++ 2M SDE Heun",
                                 ("k_dpmpp_2m_sde_heun",)),
    "dpmpp_3m_sde": Sampler(sample_dpmpp_3m_sde, MULTISTEP, "DPM++ 3M SDE",
                            ("k_dpmpp_3m_sde", "dpm++_3m_sde", "dpmpp_3m_sde_gpu")),
    "restart": Sampler(sample_restart, K_DIFFUSION, "Restart"),
    "tcd": Sampler(sample_tcd, Grid("lcm", None, "sigma_min"), "TCD", ("TCDScheduler",)),     # ends at ᾱ_0
}
# every other name of a sampler -> its name in SAMPLERS
ALIASES = {alias: name for name, sampler in SAMPLERS.items() for alias in (*sampler.aliases, sampler.a1111)}


def resolve_sampler(name: str) -> str:
    """Our sampler name (a key of SAMPLERS) for `name` or an alias of it ("pndm", "euler_a", "Euler a")."""
    name = ALIASES.get(name, name)
    if name not in SAMPLERS:
        raise UserError(f"unknown sampler {name!r}; valid: {', '.join(SAMPLERS)} "
                        f"(aliases: {', '.join(ALIASES)})")
    return name


def get_sampler(name: str) -> Callable:
    """The sampler function called `name` or an alias of it; a UserError listing the valid names."""
    return SAMPLERS[resolve_sampler(name)].function


def sampler_options(name: str) -> dict[str, object]:
    """The options sampler `name` takes and their defaults, e.g. {"eta": 1.0, "s_noise": 1.0} for Euler a."""
    return accepted_options(get_sampler(name))
