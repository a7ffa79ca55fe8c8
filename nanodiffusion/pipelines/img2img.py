"""Image-to-image and inpainting inputs for the text-to-image pipeline (SDEdit, Meng et al. 2022).

img2img starts the sampler part-way down the sigma grid from the init image's latents plus noise at that
level: `strength` is the fraction of the steps that is run (1: the whole grid, the image is only a noise
seed; 0: no step, the image comes back through the VAE). Inpainting with a plain v1 model (4 latent
channels) keeps the original latents where the mask is black: at every step the original latents, re-noised
to the current sigma with the start noise, replace the sampler's x outside the mask, and the denoised
estimate there is the original itself.
"""

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from nanodiffusion.errors import UserError
from nanodiffusion.images import from_pil

ImageInput = Image.Image | Sequence[Image.Image] | torch.Tensor


def prepare_images(image: ImageInput) -> torch.Tensor:
    """Init images as a float (B, 3, H, W) tensor in [-1, 1]: PIL images, or such a tensor passed through."""
    if isinstance(image, torch.Tensor):
        if image.ndim != 4 or image.shape[1] != 3 or not image.is_floating_point():
            raise UserError(f"an init image tensor must be float (B, 3, H, W) in [-1, 1], got "
                            f"{image.dtype} {tuple(image.shape)}")
        return image.float()
    return from_pil(image, channels=3)


def prepare_mask(mask_image: ImageInput, height: int, width: int, factor: int) -> torch.Tensor:
    """Inpainting mask at latent resolution, (B, 1, H/factor, W/factor): 1 where to paint (white), else 0.

    As diffusers: the mask (PIL, or a (B, 1, H, W) tensor in [0, 1]) is binarised at 0.5, then shrunk with
    nearest-neighbour sampling.
    """
    if isinstance(mask_image, torch.Tensor):
        mask = mask_image.float()
        if mask.ndim != 4 or mask.shape[1] != 1:
            raise UserError(f"a mask tensor must be (B, 1, H, W) in [0, 1], got {tuple(mask.shape)}")
    else:
        mask = (from_pil(mask_image, channels=1) + 1) / 2                        # (B, 1, H, W) in [0, 1]
    if tuple(mask.shape[2:]) != (height, width):
        raise UserError(f"the mask is {mask.shape[3]}x{mask.shape[2]} but the image is {width}x{height}")
    mask = (mask >= 0.5).float()
    return F.interpolate(mask, size=(height // factor, width // factor), mode="nearest")


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
