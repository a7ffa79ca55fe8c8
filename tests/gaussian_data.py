"""Gaussian data N(MU, S²), whose exact denoiser and consistency function are known (STYLE §8.1)."""

import torch

MU, S = 0.3, 0.5


def _per_sample(sigma, x):
    """sigma as a float, a () or a (B,) tensor, shaped to broadcast against x (B, ...)."""
    return torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


def gaussian_denoiser(x, sigma):
    """The optimal denoiser E[x0 | x] for x0 ~ N(MU, S²) and x = x0 + sigma·eps."""
    return MU + (x - MU) * S**2 / (S**2 + _per_sample(sigma, x) ** 2)


def gaussian_consistency(x, sigma):
    """The exact consistency function of N(MU, S²) data: the probability-flow ODE solution at sigma = 0."""
    return MU + (x - MU) * S / (S**2 + _per_sample(sigma, x) ** 2) ** 0.5


def start(n, sigma_max, seed=0):
    """(noise, x_T): n standard normals and the matching start MU + noise·sqrt(S² + sigma_max²)."""
    noise = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return noise, MU + noise * (S**2 + sigma_max**2) ** 0.5
