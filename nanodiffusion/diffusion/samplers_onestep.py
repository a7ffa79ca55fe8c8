"""One-step samplers: each step uses the current point only (Euler, Heun, DPM2, DDIM, DDPM, LCM, TCD and kin).

Every sampler works on x = x0 + sigma·eps (k-diffusion's parametrisation) and returns x at sigmas[-1].
Stochastic samplers draw one noise tensor shaped like x per step that adds noise, in the order diffusers'
schedulers draw theirs, so the same generator gives the same sample. `callback(i, x, denoised)` runs after
step i.
"""

import math
from typing import Callable

import torch

from nanodiffusion.diffusion.sampler_noise import add_noise, ancestral_step, churn, noise_like, noise_source
from nanodiffusion.diffusion.schedules import alphas_cumprod_to_sigmas, sigma_to_t
from nanodiffusion.errors import UserError


def sigma_steps(sigmas: torch.Tensor):
    """(i, sigma_i, sigma_{i+1}) as Python floats for each step i of a grid."""
    values = sigmas.tolist()
    return ((i, values[i], values[i + 1]) for i in range(len(values) - 1))


def report_step(callback: Callable | None, i: int, x: torch.Tensor, denoised: torch.Tensor) -> None:
    if callback is not None:
        callback(i, x, denoised)


def _midpoint_step(model, x, slope, sigma, sigma_next):
    """k-diffusion's DPM2 step, after DPM-Solver-2 (Lu et al. 2022, Algorithm 1, r1 = 1/2) written in sigma as
    Karras et al. 2022, Algorithm 2: take the slope at the geometric midpoint sqrt(sigma·sigma_next)."""
    sigma_mid = math.sqrt(sigma * sigma_next)
    x_mid = x + slope * (sigma_mid - sigma)
    slope_mid = (x_mid - model(x_mid, sigma_mid)) / sigma_mid
    return x + slope_mid * (sigma_next - sigma)


def heun_step(model, x: torch.Tensor, sigma: float, sigma_next: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of Heun's method on the probability-flow ODE; returns (x at sigma_next, D(x, sigma))."""
    denoised = model(x, sigma)
    slope = (x - denoised) / sigma
    x_next = x + slope * (sigma_next - sigma)                      # Euler predictor
    if sigma_next > 0:                                       # the last step stays Euler: D(x, 0) is undefined
        slope_next = (x_next - model(x_next, sigma_next)) / sigma_next
        x_next = x + (slope + slope_next) / 2 * (sigma_next - sigma)
    return x_next, denoised


@torch.no_grad()
def sample_euler(model, x, sigmas, *, s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0,
                 noise_sampler=None, generator=None, callback=None):
    """Euler's method on the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma (Karras eq. 4); with
    s_churn > 0, Karras et al.'s stochastic Algorithm 2 with Euler steps (k-diffusion's `sample_euler`)."""
    noise = noise_source(x, generator, noise_sampler)
    for i, sigma, sigma_next in sigma_steps(sigmas):
        x, sigma = churn(x, sigma, noise, len(sigmas) - 1, s_churn, s_tmin, s_tmax, s_noise)
        denoised = model(x, sigma)
        x = x + (x - denoised) / sigma * (sigma_next - sigma)
        report_step(callback, i, x, denoised)
    return x


@torch.no_grad()
def sample_euler_ancestral(model, x, sigmas, *, eta=1.0, s_noise=1.0, noise_sampler=None, generator=None,
                           callback=None):
    """Euler step down to sigma_down, then fresh noise up to sigma_next (k-diffusion's
    `sample_euler_ancestral`)."""
    noise = noise_source(x, generator, noise_sampler)
    for i, sigma, sigma_next in sigma_steps(sigmas):
        denoised = model(x, sigma)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = x + (x - denoised) / sigma * (sigma_down - sigma)
        x = add_noise(x, noise, sigma, sigma_next, sigma_up * s_noise)
        report_step(callback, i, x, denoised)
    return x


@torch.no_grad()
def sample_heun(model, x, sigmas, *, s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0,
                noise_sampler=None, generator=None, callback=None):
    """Heun's 2nd-order method on the probability-flow ODE (Karras et al. 2022, Algorithm 1; with s_churn > 0,
    Algorithm 2)."""
    noise = noise_source(x, generator, noise_sampler)
    for i, sigma, sigma_next in sigma_steps(sigmas):
        x, sigma = churn(x, sigma, noise, len(sigmas) - 1, s_churn, s_tmin, s_tmax, s_noise)
        x, denoised = heun_step(model, x, sigma, sigma_next)
        report_step(callback, i, x, denoised)
    return x


@torch.no_grad()
def sample_dpm_2(model, x, sigmas, *, s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0,
                 noise_sampler=None, generator=None, callback=None):
    """DPM2: the midpoint method in log-sigma (k-diffusion's `sample_dpm_2`); a step to sigma = 0 is Euler."""
    noise = noise_source(x, generator, noise_sampler)
    for i, sigma, sigma_next in sigma_steps(sigmas):
        x, sigma = churn(x, sigma, noise, len(sigmas) - 1, s_churn, s_tmin, s_tmax, s_noise)
        denoised = model(x, sigma)
        slope = (x - denoised) / sigma
        if sigma_next == 0:
            x = x + slope * (sigma_next - sigma)
        else:
            x = _midpoint_step(model, x, slope, sigma, sigma_next)
        report_step(callback, i, x, denoised)
    return x


@torch.no_grad()
def sample_dpm_2_ancestral(model, x, sigmas, *, eta=1.0, s_noise=1.0, noise_sampler=None, generator=None,
                           callback=None):
    """DPM2 down to sigma_down, then fresh noise up to sigma_next (k-diffusion's `sample_dpm_2_ancestral`)."""
    noise = noise_source(x, generator, noise_sampler)
    for i, sigma, sigma_next in sigma_steps(sigmas):
        denoised = model(x, sigma)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        slope = (x - denoised) / sigma
        if sigma_down == 0:
            x = x + slope * (sigma_down - sigma)
        else:
            x = _midpoint_step(model, x, slope, sigma, sigma_down)
        x = add_noise(x, noise, sigma, sigma_next, sigma_up * s_noise)
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
def sample_lcm(model, x, sigmas, *, noise_sampler=None, generator=None, callback=None):
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1), as Luo et al. 2023 sample LCMs.

    Jump to the clean estimate, then re-noise it to the next sigma: x' = D(x, sigma) + sigma'·z. `model`
    should be a consistency function: wrap an LCM's denoiser with `denoisers.lcm_boundary_condition` to
    match diffusers.
    """
    noise = noise_source(x, generator, noise_sampler)
    for i, sigma, sigma_next in sigma_steps(sigmas):
        denoised = model(x, sigma)
        x = add_noise(denoised, noise, sigma, sigma_next, sigma_next)
        report_step(callback, i, x, denoised)
    return x


@torch.no_grad()
def sample_tcd(model, x, sigmas, *, alphas_cumprod, eta=0.3, noise_sampler=None, generator=None,
               callback=None):
    """Strategic stochastic sampling of TCD (Zheng et al. 2024, §4.3; diffusers' TCDScheduler).

    Each step jumps along the ODE to x_s = D + sigma_s·eps, sigma_s the noise level of training timestep
    s = floor((1 - eta)·t(sigma')) in `alphas_cumprod`, then adds noise back up to sigma'. eta (the paper's
    gamma) = 0 is deterministic (DDIM), eta = 1 is LCM's multistep sampling.
    """
    if not 0 <= eta <= 1:
        raise UserError(f"TCD's eta (gamma) must be in [0, 1], got {eta!r}")
    table = alphas_cumprod_to_sigmas(alphas_cumprod.double())                      # (T,) increasing
    noise = noise_source(x, generator, noise_sampler)
    for i, sigma, sigma_next in sigma_steps(sigmas):
        denoised = model(x, sigma)
        sigma_s = 0.0
        if sigma_next > 0:
            # sigma_to_t is exact at the table's own sigmas, where TCD's timesteps lie (floor needs that)
            t_next = float(sigma_to_t(torch.tensor(sigma_next, dtype=torch.float64), table))
            s = math.floor((1 - eta) * t_next)
            sigma_s = min(float(table[s]), sigma_next)
        x = denoised + (x - denoised) * (sigma_s / sigma)
        x = add_noise(x, noise, sigma, sigma_next, math.sqrt(sigma_next**2 - sigma_s**2))
        report_step(callback, i, x, denoised)
    return x

