"""Samplers: functions of a denoiser `model(x, sigma) -> x0_hat`, a start `x` and decreasing `sigmas`.

Every sampler works on x = x0 + sigma·eps (k-diffusion's parametrisation) and returns x at sigmas[-1].
Stochastic samplers draw noise from `generator`; `callback(i, x, denoised)` is called after step i.
"""

import math
from typing import Callable

import torch

from nanodiffusion.errors import UserError


def _noise_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise shaped like x, drawn on the generator's device then moved to x's."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, dtype=torch.float32, device=device).to(x.device, x.dtype)


def _report(callback: Callable | None, i: int, x: torch.Tensor, denoised: torch.Tensor) -> None:
    if callback is not None:
        callback(i, x, denoised)


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """Split a step sigma -> sigma_next into a deterministic part to sigma_down and fresh noise sigma_up.

    sigma_down² + sigma_up² = sigma_next² (k-diffusion's `get_ancestral_step`; eta=1 is DDPM-like).
    """
    if sigma_next == 0:
        return 0.0, 0.0
    sigma_up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(sigma_next**2 - sigma_up**2), sigma_up


@torch.no_grad()
def sample_euler(model, x, sigmas, *, callback=None):
    """Euler's method on the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma (Karras eq. 4)."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = model(x, sigma)
        x = x + (x - denoised) / sigma * (sigma_next - sigma)
        _report(callback, i, x, denoised)
    return x


@torch.no_grad()
def sample_euler_ancestral(model, x, sigmas, *, eta=1.0, generator=None, callback=None):
    """Euler step down to sigma_down, then fresh noise up to sigma_next (k-diffusion's `sample_euler_ancestral`)."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = model(x, sigma)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = x + (x - denoised) / sigma * (sigma_down - sigma)
        if sigma_up > 0:
            x = x + _noise_like(x, generator) * sigma_up
        _report(callback, i, x, denoised)
    return x


@torch.no_grad()
def sample_heun(model, x, sigmas, *, callback=None):
    """Heun's 2nd-order method on the probability-flow ODE (Karras et al. 2022, Algorithm 1)."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = model(x, sigma)
        slope = (x - denoised) / sigma
        x_next = x + slope * (sigma_next - sigma)                  # Euler predictor
        if sigma_next > 0:                                         # last step stays Euler: D(x, 0) is undefined
            slope_next = (x_next - model(x_next, sigma_next)) / sigma_next
            x_next = x + (slope + slope_next) / 2 * (sigma_next - sigma)
        x = x_next
        _report(callback, i, x, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, *, callback=None):
    """DPM-Solver++(2M): multistep 2nd-order solver in lambda = -log sigma (Lu et al. 2022, Algorithm 2)."""
    old_denoised, h_last = None, None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = model(x, sigma)
        if sigma_next == 0:                                        # the exact solution at sigma = 0
            x = denoised
        else:
            h = math.log(sigma / sigma_next)
            d = denoised
            if old_denoised is not None:                           # 2nd-order correction from the last step
                r = h_last / h
                d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigma_next / sigma) * x - math.expm1(-h) * d
            h_last = h
        old_denoised = denoised
        _report(callback, i, x, denoised)
    return x


@torch.no_grad()
def sample_ddim(model, x, sigmas, *, eta=0.0, generator=None, callback=None):
    """DDIM (Song et al. 2021, eq. 12) written for x = x0 + sigma·eps; eta=0 is deterministic, eta=1 is DDPM.

    With ᾱ = 1/(1 + sigma²): x_prev = x0 + sqrt(1 - ᾱ' - s²)/sqrt(ᾱ')·eps + s/sqrt(ᾱ')·z, where
    s = eta·sqrt((1-ᾱ')/(1-ᾱ))·sqrt(1 - ᾱ/ᾱ') is the DDIM noise scale of eq. 16.
    """
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = model(x, sigma)
        eps = (x - denoised) / sigma
        a, a_next = 1 / (1 + sigma**2), 1 / (1 + sigma_next**2)
        s = eta * math.sqrt(max((1 - a_next) / (1 - a) * (1 - a / a_next), 0.0))
        x = denoised + math.sqrt(max(1 - a_next - s**2, 0.0) / a_next) * eps
        if s > 0:
            x = x + (s / math.sqrt(a_next)) * _noise_like(x, generator)
        _report(callback, i, x, denoised)
    return x


@torch.no_grad()
def sample_ddpm(model, x, sigmas, *, variance="beta_tilde", generator=None, callback=None):
    """DDPM ancestral sampling from the posterior q(x_prev | x_t, x0_hat) (Ho et al. 2020, eqs. 6-7).

    For a step t -> prev, beta = 1 - ᾱ_t/ᾱ_prev; the noise variance is beta_tilde = (1-ᾱ_prev)/(1-ᾱ_t)·beta
    (the posterior's) or beta (the upper bound); Ho et al. §3.2 found both work.
    """
    if variance not in ("beta_tilde", "beta"):
        raise UserError(f"unknown DDPM variance {variance!r}; valid: beta_tilde, beta")
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = model(x, sigma)
        a, a_prev = 1 / (1 + sigma**2), 1 / (1 + sigma_next**2)
        beta = 1 - a / a_prev
        x_vp = x * math.sqrt(a)
        mean = (math.sqrt(a_prev) * beta / (1 - a)) * denoised + (math.sqrt(1 - beta) * (1 - a_prev) / (1 - a)) * x_vp
        if sigma_next > 0:
            var = beta if variance == "beta" else (1 - a_prev) / (1 - a) * beta
            mean = mean + math.sqrt(var) * _noise_like(x, generator)
        x = mean / math.sqrt(a_prev)                               # back to x = x0 + sigma·eps
        _report(callback, i, x, denoised)
    return x


SAMPLERS = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
}


def get_sampler(name: str) -> Callable:
    """Return the sampler called `name`, or raise a UserError listing the valid names."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise UserError(f"unknown sampler {name!r}; valid: {', '.join(SAMPLERS)}") from None
