"""DPM-Solver++ samplers (Lu et al. 2022b): 2M, 2S ancestral, SDE, 2M SDE (midpoint, Heun) and 3M SDE.

The DPM++ samplers of A1111 and ComfyUI; ours retrace k-diffusion's updates (tests/test_kdiffusion_parity.py)
and, where diffusers has the sampler, its scheduler. Same conventions as samplers_onestep: x = x0 + sigma·eps,
`model(x, sigma)` returns the clean estimate, `callback(i, x, denoised)` runs after step i, and h is a step
in lambda = -log sigma (Lu et al. 2022b). `noise_sampler(sigma, sigma_next)` replaces the draws from
`generator` (sampler_noise). DPM++ SDE draws Brownian noise: its two draws per step overlap; the others' do
not, so their independent draws have the law of k-diffusion's Brownian tree.
"""

import math
from functools import partial

import torch

from nanodiffusion.diffusion.sampler_noise import add_noise, ancestral_step, brownian_noise, noise_source
from nanodiffusion.diffusion.samplers_onestep import report_step, sigma_steps
from nanodiffusion.errors import UserError


def dpmpp_first_order(x: torch.Tensor, denoised: torch.Tensor, sigma: float, sigma_to: float) -> torch.Tensor:
    """DPM-Solver++(1) from sigma to sigma_to, exact for a constant D (Lu et al. 2022b, eq. 8): that is DDIM,
    x0 + (sigma_to / sigma)·(x - x0) with x0 = D."""
    return denoised + (x - denoised) * (sigma_to / sigma)


def _ancestral_first_order(x, denoised, noise, sigma, sigma_to, eta, s_noise):
    """DPM-Solver++(1) down to the ancestral sigma_down of sigma -> sigma_to, then noise up to sigma_to."""
    sigma_down, sigma_up = ancestral_step(sigma, sigma_to, eta)
    x = dpmpp_first_order(x, denoised, sigma, sigma_down)
    return add_noise(x, noise, sigma, sigma_to, sigma_up * s_noise)


@torch.no_grad()
def sample_dpmpp_2s_ancestral(model, x, sigmas, *, eta=1.0, s_noise=1.0, noise_sampler=None, generator=None,
                              callback=None):
    """DPM-Solver++(2S) down to sigma_down, then fresh noise up to sigma_next (k-diffusion's
    `sample_dpmpp_2s_ancestral`; Lu et al. 2022b, Algorithm 1 with r = 1/2)."""
    noise = noise_source(x, generator, noise_sampler)
    for i, sigma, sigma_next in sigma_steps(sigmas):
        denoised = model(x, sigma)
        sigma_down, _ = ancestral_step(sigma, sigma_next, eta)
        estimate = denoised
        if sigma_down > 0:                # the 2nd-order D: at the midpoint in lambda of sigma -> sigma_down
            sigma_mid = math.sqrt(sigma * sigma_down)
            estimate = model(dpmpp_first_order(x, denoised, sigma, sigma_mid), sigma_mid)
        x = _ancestral_first_order(x, estimate, noise, sigma, sigma_next, eta, s_noise)
        report_step(callback, i, x, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_sde(model, x, sigmas, *, eta=1.0, s_noise=1.0, r=0.5, noise_sampler=None, generator=None,
                     callback=None):
    """Stochastic singlestep DPM-Solver++ (k-diffusion's `sample_dpmpp_sde`; 2nd order for eta = 0).

    An ancestral DPM-Solver++(1) substep to sigma_s = sigma^(1-r)·sigma'^r (a fraction r of the step in
    lambda), a second model call there, then an ancestral step to sigma' with the two estimates mixed as in
    DPM-Solver-2 (Lu et al. 2022a, Algorithm 1). Noise: one Brownian path (`brownian_noise`).
    """
    noise = brownian_noise(x, generator) if noise_sampler is None else noise_sampler
    for i, sigma, sigma_next in sigma_steps(sigmas):
        denoised = model(x, sigma)
        if sigma_next == 0:
            x = denoised
        else:
            sigma_s = sigma ** (1 - r) * sigma_next**r
            x_s = _ancestral_first_order(x, denoised, noise, sigma, sigma_s, eta, s_noise)
            denoised_s = model(x_s, sigma_s)
            mixed = (1 - 1 / (2 * r)) * denoised + 1 / (2 * r) * denoised_s
            x = _ancestral_first_order(x, mixed, noise, sigma, sigma_next, eta, s_noise)
        report_step(callback, i, x, denoised)
    return x


def _second_order_correction(denoised, history, h, h_eta, solver_type="midpoint"):
    """The 2nd-order term of DPM-Solver++(2M) SDE from the last (D, h): the divided difference of D in lambda
    times 1/2·(1 - e^{-H}) ("midpoint") or phi_2(H) = (e^{-H} - 1 + H)/H ("heun"), H = (1 + eta)·h."""
    (denoised_1, h_1), *_ = history
    weight = -0.5 * math.expm1(-h_eta) if solver_type == "midpoint" else math.expm1(-h_eta) / h_eta + 1
    return weight * (denoised - denoised_1) / (h_1 / h)


def _third_order_correction(denoised, history, h, h_eta):
    """The phi_2/phi_3 terms of DPM-Solver++(3M) from the last two (D, h) (Lu et al. 2022b, Algorithm 3):
    divided differences of D in lambda extrapolated to the step; with one (D, h), the "heun" 2nd-order one."""
    if len(history) == 1:
        return _second_order_correction(denoised, history, h, h_eta, "heun")
    (denoised_1, h_1), (denoised_2, h_2) = history
    r0, r1 = h_1 / h, h_2 / h
    d1_0, d1_1 = (denoised - denoised_1) / r0, (denoised_1 - denoised_2) / r1
    d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)                       # 1st derivative, 2nd-order accurate
    d2 = (d1_0 - d1_1) / (r0 + r1)                                     # 2nd derivative
    phi_2 = math.expm1(-h_eta) / h_eta + 1
    return phi_2 * d1 - (phi_2 / h_eta - 0.5) * d2


def _sde_multistep(model, x, sigmas, correction, eta, s_noise, noise, callback):
    """The loop of multistep (SDE-)DPM-Solver++ (Lu et al. 2022b, §5): per step h in lambda, x contracts by
    e^{-(1 + eta)·h} towards D, `correction(D, history, h, h_eta)` adds the higher-order terms from earlier
    (D, h) (newest first), then fresh noise of std sigma'·sqrt(1 - e^{-2·eta·h})·s_noise (none at eta = 0)."""
    history = []
    for i, sigma, sigma_next in sigma_steps(sigmas):
        denoised = model(x, sigma)
        if sigma_next == 0:                                        # the exact solution at sigma = 0
            x = denoised
        else:
            h = math.log(sigma / sigma_next)
            h_eta = h * (1 + eta)
            x = math.exp(-h_eta) * x - math.expm1(-h_eta) * denoised
            if history:
                x = x + correction(denoised, history, h, h_eta)
            std = sigma_next * math.sqrt(-math.expm1(-2 * eta * h))
            x = add_noise(x, noise, sigma, sigma_next, std * s_noise)
            history = [(denoised, h), *history][:2]
        report_step(callback, i, x, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, *, generator=None, callback=None):
    """DPM-Solver++(2M): multistep 2nd-order solver in lambda = -log sigma (Lu et al. 2022b, Algorithm 2), the
    SDE loop without noise (eta = 0)."""
    correction = partial(_second_order_correction, solver_type="midpoint")
    return _sde_multistep(model, x, sigmas, correction, 0.0, 1.0, None, callback)


@torch.no_grad()
def sample_dpmpp_2m_sde(model, x, sigmas, *, eta=1.0, s_noise=1.0, solver_type="midpoint",
                        noise_sampler=None, generator=None, callback=None):
    """DPM-Solver++(2M) on the reverse SDE (Lu et al. 2022b, "SDE-DPM-Solver++"; k-diffusion's form).

    eta = 0 is DPM-Solver++(2M); `solver_type` "midpoint" or "heun" weighs the 2nd-order term, as diffusers'
    and k-diffusion's option. Noise is drawn in float32, as diffusers does.
    """
    if solver_type not in ("midpoint", "heun"):
        raise UserError(f"unknown DPM++ 2M SDE solver_type {solver_type!r}; valid: midpoint, heun")
    noise = noise_source(x, generator, noise_sampler, dtype=torch.float32)
    correction = partial(_second_order_correction, solver_type=solver_type)
    return _sde_multistep(model, x, sigmas, correction, eta, s_noise, noise, callback)


@torch.no_grad()
def sample_dpmpp_2m_sde_heun(model, x, sigmas, *, eta=1.0, s_noise=1.0, noise_sampler=None, generator=None,
                             callback=None):
    """DPM-Solver++(2M) SDE with the Heun-type 2nd-order term (A1111's "DPM++ 2M SDE Heun")."""
    return sample_dpmpp_2m_sde(model, x, sigmas, eta=eta, s_noise=s_noise, solver_type="heun",
                               noise_sampler=noise_sampler, generator=generator, callback=callback)


@torch.no_grad()
def sample_dpmpp_3m_sde(model, x, sigmas, *, eta=1.0, s_noise=1.0, noise_sampler=None, generator=None,
                        callback=None):
    """DPM-Solver++(3M) on the reverse SDE (k-diffusion's `sample_dpmpp_3m_sde`); eta = 0 is the ODE solver.

    As DPM++ 2M SDE with the last two steps' D; its order warms up from 1. Measured 2nd order (tests): its D2
    term is half what a D quadratic in lambda needs, as in the DPM-Solver++ reference code and k-diffusion.
    """
    noise = noise_source(x, generator, noise_sampler, dtype=torch.float32)
    return _sde_multistep(model, x, sigmas, _third_order_correction, eta, s_noise, noise, callback)
