"""Editing an existing image with a text-to-image model: img2img (SDEdit, Meng et al. 2022) and inpainting.

img2img starts the sampler part-way down the sigma grid from the init image's latents plus noise at that
level: `strength` is the fraction of the steps that is run (1: the whole grid, the image is only a noise
seed; 0: no step, the image comes back through the VAE). Inpainting with a plain v1 model (4 latent
channels) keeps the original latents where the mask is black: at every step the original latents, re-noised
to the current sigma with the start noise, replace the sampler's x outside the mask, and the denoised
estimate there is the original itself.
"""

from collections.abc import Callable

import torch


def img2img_sigmas(sigmas: torch.Tensor, strength: float) -> torch.Tensor:
    """The tail of a sampler's sigma grid that img2img runs: the last int(num_steps·strength) steps.

    diffusers' img2img pipelines start at timesteps[num_steps - int(num_steps·strength):], the same steps.
    """
    num_steps = len(sigmas) - 1
    return sigmas[num_steps - min(int(num_steps * strength), num_steps):]


def inpainting_denoiser(model: Callable, original: torch.Tensor, noise: torch.Tensor,
                        mask: torch.Tensor) -> Callable:
    """D(x, sigma) that paints only where `mask` is 1 and keeps `original` (clean latents) elsewhere.

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
