"""Turn a network trained on a discrete VP schedule into a denoiser D(x, sigma) (Karras et al. 2022, §B.6).

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
