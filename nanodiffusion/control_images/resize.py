"""Fit a control image to the generated image's size, by the three rules of the A1111 ControlNet extension,
and turn it into the ControlNet's input tensor.

    just_resize       stretch to the target size (diffusers' default for control images)
    crop_and_resize   scale to cover the target, keeping the aspect ratio, and cut the overhang evenly
    resize_and_fill   scale to fit inside the target and fill the rest with the median colour of the
                      image's border (black for edge and pose maps)

Images are resampled with an area filter when they shrink and Lanczos when they grow, as the extension.
"""

import numpy as np
import torch
from PIL import Image

from nanodiffusion.errors import UserError

RESIZE_MODES = ("just_resize", "crop_and_resize", "resize_and_fill")
# The extension's names and numbers for them (its API takes either).
A1111_RESIZE_MODES = {"Just Resize": "just_resize", "Crop and Resize": "crop_and_resize",
                      "Resize and Fill": "resize_and_fill", 0: "just_resize", 1: "crop_and_resize",
                      2: "resize_and_fill"}


def to_rgb(image: Image.Image) -> Image.Image:
    """An RGB copy of `image`; transparent parts become white (a sketch on a transparent layer stays
    a sketch on paper), grey levels become grey RGB."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _resize(image: Image.Image, width: int, height: int) -> Image.Image:
    shrinking = width + height < image.width + image.height
    return image.resize((width, height), Image.Resampling.BOX if shrinking else Image.Resampling.LANCZOS)


def fit_control_image(image: Image.Image, width: int, height: int, mode: str = "just_resize") -> Image.Image:
    """`image` as an RGB image of exactly width x height, by resize `mode` (see the module)."""
    mode = A1111_RESIZE_MODES.get(mode, mode)
    if mode not in RESIZE_MODES:
        names = ", ".join(name for name in A1111_RESIZE_MODES if isinstance(name, str))
        raise UserError(f"unknown resize mode {mode!r}; valid: {', '.join(RESIZE_MODES)} "
                        f"(or A1111's {names})")
    if width < 1 or height < 1:
        raise UserError(f"the control image size must be positive, got {width} x {height}")
    image = to_rgb(image)
    if mode == "just_resize" or image.size == (width, height):
        return image if image.size == (width, height) else _resize(image, width, height)
    scales = (width / image.width, height / image.height)
    scale = max(scales) if mode == "crop_and_resize" else min(scales)
    new_width, new_height = round(image.width * scale), round(image.height * scale)
    resized = _resize(image, new_width, new_height)
    if mode == "crop_and_resize":
        left, top = (new_width - width) // 2, (new_height - height) // 2
        return resized.crop((left, top, left + width, top + height))
    pixels = np.asarray(image)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])      # (2W + 2H, 3)
    background = Image.new("RGB", (width, height), tuple(int(c) for c in np.median(border, axis=0)))
    background.paste(resized, ((width - new_width) // 2, (height - new_height) // 2))
    return background


def control_tensor(image: Image.Image) -> torch.Tensor:
    """(1, 3, H, W) float32 tensor in [0, 1] of an RGB image: what a ControlNet takes (not [-1, 1])."""
    pixels = torch.from_numpy(np.array(to_rgb(image), dtype=np.float32)) / 255     # (H, W, 3)
    return pixels.permute(2, 0, 1)[None]
