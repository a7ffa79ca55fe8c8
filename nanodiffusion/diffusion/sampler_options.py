"""Which options a sampler takes, read from its signature, so that callers can pass, check or list them.

A sampler's keyword-only parameters are its options (`eta`, `s_noise`, `order`, ...), except the run inputs
a caller supplies rather than a user chooses. The standard noise options, A1111's and k-diffusion's names,
mean the same wherever a sampler takes them (sampler_noise); a sampler without the concept does not take one.
"""

import inspect
from typing import Callable

import torch

from nanodiffusion.errors import UserError

NOISE_OPTIONS = ("eta", "s_noise", "s_churn", "s_tmin", "s_tmax")
RUN_INPUTS = ("generator", "callback", "noise_sampler", "alphas_cumprod", "prediction")


def accepted_options(sampler: Callable) -> dict[str, object]:
    """The options `sampler` takes from a user and their defaults, e.g. {"eta": 1.0, "s_noise": 1.0}."""
    return {p.name: p.default for p in inspect.signature(sampler).parameters.values()
            if p.kind is p.KEYWORD_ONLY and p.name not in RUN_INPUTS}


def check_options(name: str, sampler: Callable, options: dict) -> None:
    """Raise a UserError naming the options `sampler` (called `name`) does not take, and the ones it does."""
    unknown = sorted(set(options) - set(accepted_options(sampler)))
    if unknown:
        valid = ", ".join(accepted_options(sampler)) or "none"
        raise UserError(f"sampler {name!r} takes no option {', '.join(unknown)}; its options: {valid}")


def schedule_inputs(sampler: Callable, alphas_cumprod: torch.Tensor, prediction: str = "epsilon") -> dict:
    """The keyword arguments `sampler` needs from the model's noise schedule and prediction type: {} but for
    TCD's timesteps (`alphas_cumprod`) and PLMS's `prediction` (it extrapolates the network's raw output)."""
    takes = inspect.signature(sampler).parameters
    inputs = {"alphas_cumprod": alphas_cumprod, "prediction": prediction}
    return {name: value for name, value in inputs.items() if name in takes}
