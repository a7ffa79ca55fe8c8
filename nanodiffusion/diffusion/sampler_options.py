"""Which options a sampler takes, read from its signature, so that callers can pass, check or list them.

A sampler's keyword-only parameters are its options (`eta`, `s_noise`, `order`, ...), except the run inputs
a caller supplies rather than a user chooses. The standard noise options, A1111's and k-diffusion's names,
mean the same wherever a sampler takes them (sampler_noise); a sampler without the concept does not take one.
"""

import inspect
import math
from typing import Callable

import torch

from nanodiffusion.errors import UserError

NOISE_OPTIONS = ("eta", "s_noise", "s_churn", "s_tmin", "s_tmax")
RUN_INPUTS = ("generator", "callback", "noise_sampler", "alphas_cumprod", "prediction")
# What a number option may be besides finite (s_tmax's default, inf = no bound, has no JSON form: a request
# leaves it out): noise amounts are >= 0; DPM++ SDE's r is a fraction of the step in lambda (it divides by
# 2r); TCD's eta is the paper's gamma in [0, 1] (Zheng et al. 2024, §4.3).
LIMITS = {name: (lambda v: v >= 0, ">= 0") for name in NOISE_OPTIONS}
LIMITS["r"] = (lambda v: 0 < v <= 1, "in (0, 1]")
SAMPLER_LIMITS = {("tcd", "eta"): (lambda v: 0 <= v <= 1, "in [0, 1]")}


def accepted_options(sampler: Callable) -> dict[str, object]:
    """The options `sampler` takes from a user and their defaults, e.g. {"eta": 1.0, "s_noise": 1.0}."""
    return {p.name: p.default for p in inspect.signature(sampler).parameters.values()
            if p.kind is p.KEYWORD_ONLY and p.name not in RUN_INPUTS}


def check_options(name: str, sampler: Callable, options: dict) -> None:
    """Raise a UserError naming the options `sampler` (called `name`) does not take, and the ones it does,
    or an option whose value is not of its default's type, not finite, or out of its LIMITS."""
    takes = accepted_options(sampler)
    unknown = sorted(set(options) - set(takes))
    if unknown:
        valid = ", ".join(takes) or "none"
        raise UserError(f"sampler {name!r} takes no option {', '.join(unknown)}; its options: {valid}")
    for option, value in options.items():
        _check_value(name, option, value, takes[option])


def _check_value(name: str, option: str, value, default) -> None:
    """A number option takes a finite int or float (an int option an int); a text option a string."""
    if isinstance(default, str):
        kind, valid = "a string", isinstance(value, str)
    elif isinstance(default, int):
        kind, valid = "an integer", type(value) is int
    else:
        kind, valid = "a finite number", type(value) in (int, float) and math.isfinite(value)
    if not valid:
        raise UserError(f"sampler option {option} must be {kind}, got {value!r} (leave it out for its "
                        f"default, {default})")
    within, limits = SAMPLER_LIMITS.get((name, option)) or LIMITS.get(option, (lambda v: True, ""))
    if not within(value):
        raise UserError(f"sampler option {option} must be {limits} for {name!r}, got {value!r}")


def schedule_inputs(sampler: Callable, alphas_cumprod: torch.Tensor, prediction: str = "epsilon") -> dict:
    """The keyword arguments `sampler` needs from the model's noise schedule and prediction type: {} but for
    TCD's timesteps (`alphas_cumprod`) and PLMS's `prediction` (it extrapolates the network's raw output)."""
    takes = inspect.signature(sampler).parameters
    inputs = {"alphas_cumprod": alphas_cumprod, "prediction": prediction}
    return {name: value for name, value in inputs.items() if name in takes}
