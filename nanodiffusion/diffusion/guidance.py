"""Classifier-free guidance (Ho & Salimans 2022, eq. 6) as a wrapper around a denoiser."""

from typing import Callable

import torch


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
