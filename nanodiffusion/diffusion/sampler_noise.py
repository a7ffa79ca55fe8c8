"""Where samplers' fresh noise comes from, and the standard noise options that shape it.

Every draw comes from the run's one `generator`, in the order the sampler asks for it. A sampler asks
through a noise source `noise(sigma, sigma_next)` -> N(0, I) shaped like x: k-diffusion's `noise_sampler`
interface, so that a test can inject the same noise into ours and k-diffusion's. The standard options
(A1111's and k-diffusion's names): `eta` scales ancestral/SDE noise (`ancestral_step`), `s_noise`
multiplies each fresh draw, and `s_churn`, `s_tmin`, `s_tmax` set Karras et al.'s churn (`churn`).
"""

import math
from typing import Callable

import torch

NoiseSource = Callable[[float, float], torch.Tensor]


def noise_like(x: torch.Tensor, generator: torch.Generator | None,
               dtype: torch.dtype | None = None) -> torch.Tensor:
    """Standard normal noise shaped like x, drawn on the generator's device then moved to x's.

    The dtype defaults to x's, as diffusers' `randn_tensor(model_output.shape, dtype=model_output.dtype)`.
    """
    device = generator.device if generator is not None else x.device
    noise = torch.randn(x.shape, generator=generator, dtype=dtype or x.dtype, device=device)
    return noise.to(x.device, x.dtype)


def noise_source(x: torch.Tensor, generator: torch.Generator | None,
                 noise_sampler: NoiseSource | None = None, dtype: torch.dtype | None = None) -> NoiseSource:
    """`noise_sampler` when given, else independent N(0, I) draws from `generator`, one per call."""
    if noise_sampler is not None:
        return noise_sampler
    return lambda sigma, sigma_next: noise_like(x, generator, dtype)


def add_noise(x: torch.Tensor, noise: NoiseSource, sigma: float, sigma_next: float,
              std: float) -> torch.Tensor:
    """x plus fresh noise of standard deviation `std` drawn for the step sigma -> sigma_next; no draw at 0."""
    return x + noise(sigma, sigma_next) * std if std > 0 else x


def brownian_noise(x: torch.Tensor, generator: torch.Generator | None) -> NoiseSource:
    """Return noise(sigma, sigma_next) = (W(sigma_next) - W(sigma)) / sqrt|sigma_next - sigma| of one Brownian
    path W (one per element of x), its values drawn from `generator` as the sampler first asks for them.

    Overlapping queries are consistent, as with k-diffusion's Brownian tree (the same law, other numbers):
    a point beyond the known ones extends the path by an independent increment, a point between two known
    ones is drawn from the Brownian bridge (Lévy's construction). DPM++ SDE needs this: its two draws per
    step, over [sigma, sigma_mid] and [sigma, sigma_next], share the first part of the path. Samplers walk
    down, so the path above each query is forgotten: memory stays a few tensors however many the steps.
    """
    path: dict[float, torch.Tensor] = {}

    def value_at(s: float) -> torch.Tensor:
        if s not in path:
            below = max((k for k in path if k < s), default=None)
            above = min((k for k in path if k > s), default=None)
            if below is None and above is None:
                path[s] = torch.zeros_like(x)                           # W is pinned to 0 where first asked
            elif below is None or above is None:
                end = above if below is None else below
                path[s] = path[end] + math.sqrt(abs(s - end)) * noise_like(x, generator)
            else:                   # bridge: mean interpolates linearly, variance (s - a)(b - s) / (b - a)
                w = (s - below) / (above - below)
                mean = (1 - w) * path[below] + w * path[above]
                path[s] = mean + math.sqrt(w * (above - s)) * noise_like(x, generator)
        return path[s]

    def noise(sigma: float, sigma_next: float) -> torch.Tensor:
        sigma, sigma_next = float(sigma), float(sigma_next)
        increment = (value_at(sigma_next) - value_at(sigma)) / math.sqrt(abs(sigma_next - sigma))
        for s in [s for s in path if s > max(sigma, sigma_next)]:
            del path[s]
        return increment

    return noise


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """Split a step sigma -> sigma_next into a deterministic part to sigma_down and fresh noise sigma_up.

    sigma_down² + sigma_up² = sigma_next² (k-diffusion's `get_ancestral_step`; eta=1 is DDPM-like).
    """
    if sigma_next == 0:
        return 0.0, 0.0
    sigma_up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(sigma_next**2 - sigma_up**2), sigma_up


def churn(x: torch.Tensor, sigma: float, noise: NoiseSource, num_steps: int, s_churn: float, s_tmin: float,
          s_tmax: float, s_noise: float) -> tuple[torch.Tensor, float]:
    """Raise the noise level to sigma_hat = sigma·(1 + gamma) with fresh noise (Karras et al. 2022, Alg. 2).

    gamma = min(s_churn / num_steps, sqrt(2) - 1) where s_tmin <= sigma <= s_tmax, else 0 (no draw);
    returns (x_hat, sigma_hat).
    """
    gamma = min(s_churn / num_steps, math.sqrt(2) - 1) if s_tmin <= sigma <= s_tmax else 0.0
    if gamma <= 0:
        return x, sigma
    sigma_hat = sigma * (1 + gamma)
    return x + noise(sigma, sigma_hat) * s_noise * math.sqrt(sigma_hat**2 - sigma**2), sigma_hat
