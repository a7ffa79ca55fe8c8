"""One-step samplers: each step uses the current point only (Euler, Heun, DPM2, DDIM, DDPM, LCM and kin).

Every sampler works on x = x0 + sigma·eps (k-diffusion's parametrisation) and returns x at sigmas[-1].
Stochastic samplers draw one noise tensor shaped like x per step that adds noise, in the order diffusers'
schedulers draw theirs, so the same generator gives the same sample. `callback(i, x, denoised)` runs after
step i.
"""

import math
from typing import Callable

import torch

from nanodiffusion.errors import UserError


def noise_like(x: torch.Tensor, generator: torch.Generator | None,
               dtype: torch.dtype | None = None) -> torch.Tensor:
    """Standard normal noise shaped like x, drawn on the generator's device then moved to x's.

    The dtype defaults to x's, as diffusers' `randn_tensor(model_output.shape, dtype=model_output.dtype)`.
    """
    device = generator.device if generator is not None else x.device
    noise = torch.randn(x.shape, generator=generator, dtype=dtype or x.dtype, device=device)
    return noise.to(x.device, x.dtype)


def sigma_steps(sigmas: torch.Tensor):
    """(i, sigma_i, sigma_{i+1}) as Python floats for each step i of a grid."""
    values = sigmas.tolist()
    return ((i, values[i], values[i + 1]) for i in range(len(values) - 1))


def report_step(callback: Callable | None, i: int, x: torch.Tensor, denoised: torch.Tensor) -> None:
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


def _midpoint_step(model, x, slope, sigma, sigma_next):
    """k-diffusion's DPM2 step, after DPM-Solver-2 (Lu et al. 2022, Algorithm 1, r1 = 1/2) written in sigma as
    Karras et al. 2022, Algorithm 2: take the slope at the geometric midpoint sqrt(sigma·sigma_next)."""
    sigma_mid = math.sqrt(sigma * sigma_next)
    x_mid = x + slope * (sigma_mid - sigma)
    slope_mid = (x_mid - model(x_mid, sigma_mid)) / sigma_mid
    return x + slope_mid * (sigma_next - sigma)


@torch.no_grad()
def sample_euler(model, x, sigmas, *, generator=None, callback=None):
    """Euler's method on the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma (Karras eq. 4)."""
    for i, sigma, sigma_next in sigma_steps(sigmas):
        denoised = model(x, sigma)
        x = x + (x - denoised) / sigma * (sigma_next - sigma)
        report_step(callback, i, x, denoised)
    return x


@torch.no_grad()
def sample_euler_ancestral(model, x, sigmas, *, eta=1.0, generator=None, callback=None):
    """Euler step down to sigma_down, then fresh noise up to sigma_next (k-diffusion's
    `sample_euler_ancestral`)."""
    for i, sigma, sigma_next in sigma_steps(sigmas):
        denoised = model(x, sigma)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = x + (x - denoised) / sigma * (sigma_down - sigma)
        if sigma_up > 0:
            x = x + noise_like(x, generator) * sigma_up
        report_step(callback, i, x, denoised)
    return x


@torch.no_grad()
def sample_heun(model, x, sigmas, *, generator=None, callback=None):
    """Heun's 2nd-order method on the probability-flow ODE (Karras et al. 2022, Algorithm 1)."""
    for i, sigma, sigma_next in sigma_steps(sigmas):
        denoised = model(x, sigma)
        slope = (x - denoised) / sigma
        x_next = x + slope * (sigma_next - sigma)                  # Euler predictor
        if sigma_next > 0:                                   # the last step stays Euler: D(x, 0) is undefined
            slope_next = (x_next - model(x_next, sigma_next)) / sigma_next
            x_next = x + (slope + slope_next) / 2 * (sigma_next - sigma)
        x = x_next
        report_step(callback, i, x, denoised)
    return x


@torch.no_grad()
def sample_dpm_2(model, x, sigmas, *, generator=None, callback=None):
    """DPM2: the midpoint method in log-sigma (k-diffusion's `sample_dpm_2`); a step to sigma = 0 is Euler."""
    for i, sigma, sigma_next in sigma_steps(sigmas):
        denoised = model(x, sigma)
        slope = (x - denoised) / sigma
        if sigma_next == 0:
            x = x + slope * (sigma_next - sigma)
        else:
            x = _midpoint_step(model, x, slope, sigma, sigma_next)
        report_step(callback, i, x, denoised)
    return x


@torch.no_grad()
def sample_dpm_2_ancestral(model, x, sigmas, *, eta=1.0, generator=None, callback=None):
    """DPM2 down to sigma_down, then fresh noise up to sigma_next (k-diffusion's `sample_dpm_2_ancestral`)."""
    for i, sigma, sigma_next in sigma_steps(sigmas):
        denoised = model(x, sigma)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        slope = (x - denoised) / sigma
        if sigma_down == 0:
            x = x + slope * (sigma_down - sigma)
        else:
            x = _midpoint_step(model, x, slope, sigma, sigma_down)
        if sigma_up > 0:
            x = x + noise_like(x, generator) * sigma_up
        report_step(callback, i, x, denoised)
    return x


@torch.no_grad()
def sample_ddim(model, x, sigmas, *, eta=0.0, generator=None, callback=None):
    """DDIM (Song et al. 2021, eq. 12) written for x = x0 + sigma·eps; eta=0 is deterministic, eta=1 is DDPM.

    With ᾱ = 1/(1 + sigma²): x_prev = x0 + sqrt(1 - ᾱ' - s²)/sqrt(ᾱ')·eps + s/sqrt(ᾱ')·z, where
    s = eta·sqrt((1-ᾱ')/(1-ᾱ))·sqrt(1 - ᾱ/ᾱ') is the DDIM noise scale of eq. 16.
    """
    for i, sigma, sigma_next in sigma_steps(sigmas):
        denoised = model(x, sigma)
        eps = (x - denoised) / sigma
        a, a_next = 1 / (1 + sigma**2), 1 / (1 + sigma_next**2)
        s = eta * math.sqrt(max((1 - a_next) / (1 - a) * (1 - a / a_next), 0.0))
        x = denoised + math.sqrt(max(1 - a_next - s**2, 0.0) / a_next) * eps
        if s > 0:
            x = x + (s / math.sqrt(a_next)) * noise_like(x, generator)
        report_step(callback, i, x, denoised)
    return x


@torch.no_grad()
def sample_ddpm(model, x, sigmas, *, variance="beta_tilde", generator=None, callback=None):
    """DDPM ancestral sampling from the posterior q(x_prev | x_t, x0_hat) (Ho et al. 2020, eqs. 6-7).

    For a step t -> prev, beta = 1 - ᾱ_t/ᾱ_prev; the noise variance is beta_tilde = (1-ᾱ_prev)/(1-ᾱ_t)·beta
    (the posterior's) or beta (the upper bound); Ho et al. §3.2 found both work.
    """
    if variance not in ("beta_tilde", "beta"):
        raise UserError(f"unknown DDPM variance {variance!r}; valid: beta_tilde, beta")
    for i, sigma, sigma_next in sigma_steps(sigmas):
        denoised = model(x, sigma)
        a, a_prev = 1 / (1 + sigma**2), 1 / (1 + sigma_next**2)
        beta = 1 - a / a_prev
        x_vp = x * math.sqrt(a)
        mean = ((math.sqrt(a_prev) * beta / (1 - a)) * denoised
                + (math.sqrt(1 - beta) * (1 - a_prev) / (1 - a)) * x_vp)
        if sigma_next > 0:
            var = beta if variance == "beta" else (1 - a_prev) / (1 - a) * beta
            mean = mean + math.sqrt(var) * noise_like(x, generator)
        x = mean / math.sqrt(a_prev)                               # back to x = x0 + sigma·eps
        report_step(callback, i, x, denoised)
    return x


@torch.no_grad()
def sample_lcm(model, x, sigmas, *, generator=None, callback=None):
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1), as Luo et al. 2023 sample LCMs.

    Jump to the clean estimate, then re-noise it to the next sigma: x' = D(x, sigma) + sigma'·z. `model`
    should be a consistency function: wrap an LCM's denoiser with `denoisers.lcm_boundary_condition` to
    match diffusers.
    """
    for i, sigma, sigma_next in sigma_steps(sigmas):
        denoised = model(x, sigma)
        x = denoised
        if sigma_next > 0:
            x = x + noise_like(x, generator) * sigma_next
        report_step(callback, i, x, denoised)
    return x
