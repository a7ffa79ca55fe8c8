"""Image-to-image and inpainting inputs for the text-to-image pipeline: init images and masks, checked and
brought to tensors. The diffusion side is `sampling_plan.img2img_sigmas` (where img2img starts) and
`denoisers.inpainting_denoiser`.
"""

from collections.abc import Sequence

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
