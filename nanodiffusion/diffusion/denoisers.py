"""Denoisers D(x, sigma), the clean-image estimate samplers call: a network trained on a discrete VP schedule
turned into one (Karras et al. 2022, §B.6), and the wrappers that change one into another: classifier-free
guidance, the inpainting denoiser, LCM's boundary condition. A new wrapper goes here too.

Samplers see x = x0 + sigma·eps; the network saw x_vp = sqrt(ᾱ)·x0 + sqrt(1-ᾱ)·eps = x / sqrt(1 + sigma²)
at timestep t(sigma), and predicts eps, v or x0.
"""

from typing import Callable

import torch

from nanodiffusion.diffusion.forward import PREDICTION_TYPES
from nanodiffusion.diffusion.schedules import alphas_cumprod_to_sigmas, sigma_to_t
from nanodiffusion.errors import UserError


class Denoiser:
    """`Denoiser(net, alphas_cumprod, prediction)(x, sigma, **cond)` returns the clean-image estimate.

    `net(x_vp, t, **cond)` is any callable; `sigma` is a float or a tensor of shape () or (B,).
    """

    def __init__(self, net: Callable, alphas_cumprod: torch.Tensor, prediction: str = "epsilon"):
        if prediction not in PREDICTION_TYPES:
            raise UserError(f"unknown prediction type {prediction!r}; valid: {', '.join(PREDICTION_TYPES)}")
        self.net = net
        self.prediction = prediction
        self.sigmas = alphas_cumprod_to_sigmas(alphas_cumprod.double())   # (T,) increasing
        self.sigma_min = float(self.sigmas[0])
        self.sigma_max = float(self.sigmas[-1])

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma_to_t(sigma, self.sigmas)

    def __call__(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
        t = self.timestep(sigma).to(x.device).expand(x.shape[0])            # (B,)
        s = sigma.reshape(-1, *([1] * (x.ndim - 1)))                          # (B or 1, 1, 1, 1)
        c_in = (s**2 + 1).rsqrt()                                             # = sqrt(ᾱ)
        out = self.net((x * c_in).to(x.dtype), t, **cond).to(x.dtype)
        if self.prediction == "epsilon":
            return x - s * out
        if self.prediction == "v_prediction":                                # x0 = sqrt(ᾱ)·x_vp - sqrt(1-ᾱ)·v
            return x * c_in**2 - s * c_in * out
        return out


def cfg_denoiser(denoiser: Callable, cond: dict, uncond: dict, guidance_scale: float) -> Callable:
    """Return D(x, sigma) = D_u + w·(D_c - D_u), evaluating both branches in one batched call.

    `cond` / `uncond` map the denoiser's keyword names to tensors of batch size B; w = 1 skips the
    unconditional branch (it cancels out exactly).
    """
    if guidance_scale == 1.0:
        return lambda x, sigma: denoiser(x, sigma, **cond)
    both = {k: torch.cat([uncond[k], cond[k]]) for k in cond}

    def guided(x: torch.Tensor, sigma) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, device=x.device)
        sigma2 = torch.cat([sigma.reshape(-1).expand(x.shape[0])] * 2)       # (2B,)
        d_uncond, d_cond = denoiser(torch.cat([x, x]), sigma2, **both).chunk(2)
        return d_uncond + guidance_scale * (d_cond - d_uncond)

    return guided


def inpainting_denoiser(model: Callable, original: torch.Tensor, noise: torch.Tensor,
                        mask: torch.Tensor) -> Callable:
    """D(x, sigma) that paints only where `mask` is 1 and keeps `original` (clean latents) elsewhere: inpainting
    with a plain v1 model (4 latent channels).

    Outside the mask x is replaced by original + sigma·noise (the original re-noised to the current level,
    with the start noise) before the network sees it, and the estimate there is `original`; so every
    sampler ends on the original latents outside the mask (A1111's and diffusers' latent blending).
    """
    keep = 1 - mask

    def denoise(x: torch.Tensor, sigma) -> torch.Tensor:
        s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1)  # (B or 1, 1, 1, 1)
        x = mask * x + keep * (original + s * noise)
        return mask * model(x, sigma) + keep * original

    return denoise


def lcm_boundary_condition(model: Callable, alphas_cumprod: torch.Tensor, timestep_scaling: float = 10.0,
                           sigma_data: float = 0.5) -> Callable:
    """Return f(x, sigma) = c_skip(t)·x_vp + c_out(t)·D(x, sigma), LCM's consistency parametrisation.

    c_skip = σ_d²/((k·t)² + σ_d²) and c_out = k·t/sqrt((k·t)² + σ_d²) with k = timestep_scaling and x_vp =
    x/sqrt(1 + sigma²) (Song et al. 2023, §3; diffusers' LCMScheduler). At SD's LCM timesteps (t >= 19)
    c_skip < 7e-6 and 1 - c_out < 4e-6: the wrapper matters only for exact parity.
    """
    table = alphas_cumprod_to_sigmas(alphas_cumprod.double())

    def consistency(x: torch.Tensor, sigma) -> torch.Tensor:
        s = torch.as_tensor(sigma, dtype=torch.float64)
        s = s.reshape(-1, *([1] * (x.ndim - 1)))                                  # (B or 1, 1, 1, 1)
        scaled_t = sigma_to_t(s, table).double() * timestep_scaling
        c_skip = sigma_data**2 / (scaled_t**2 + sigma_data**2)
        c_out = scaled_t / (scaled_t**2 + sigma_data**2).sqrt()
        x_vp = x / (1 + s**2).sqrt()
        return (c_skip * x_vp + c_out * model(x, sigma)).to(x.dtype)

    return consistency
