"""A1111's img2img inputs made ready for the pipeline: base64 images read with bounds, `resize_mode`, the
inpainting mask (`inpainting_mask_invert`, `mask_blur`, `inpainting_fill`, `inpaint_full_res`), and the
finished image pasted back over the original as A1111 does.

A1111 keeps the unmasked pixels of an inpainted image exactly: the generated image is composited over the
original through the blurred mask. With `inpaint_full_res` ("only masked") it generates the masked region
alone at width x height, then scales it back into the original, which keeps its own size.
"""

import base64
import binascii
import io
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter, ImageOps

from nanodiffusion.errors import UserError
from nanodiffusion.images import convert_mode

FORMATS = ("PNG", "JPEG", "WEBP")
# A1111's resize modes; 3 ("Just resize (latent upscale)") scales latents, which the pipeline does not do
RESIZE_MODES = {0: "just resize", 1: "crop and resize", 2: "resize and fill"}
# inpainting_fill: 0 fills the masked area from its surroundings first, 1 starts from the original there;
# 2 (latent noise) and 3 (latent nothing) replace the masked latents, which the pipeline does not do
INPAINTING_FILLS = {0: "fill", 1: "original"}


def decode_image(data: str, field: str, max_pixels: int) -> Image.Image:
    """A base64 PNG, JPEG or WebP (optionally a data URL: "data:image/png;base64,..."), read fully."""
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise UserError(f"{field}: not valid base64") from None
    try:
        image = Image.open(io.BytesIO(raw), formats=FORMATS)
        if image.width * image.height > max_pixels:         # checked before the pixels are decompressed
            raise UserError(f"{field}: the image is {image.width}x{image.height}, more than the "
                            f"{max_pixels} pixels allowed")
        image.load()
    except UserError:
        raise
    except Image.DecompressionBombError as error:          # Pillow's own bound, met before ours
        raise UserError(f"{field}: the image has more than the {max_pixels} pixels allowed ({error})") \
            from None
    except Exception as error:                              # Pillow raises many kinds on broken files
        raise UserError(f"{field}: not a readable {'/'.join(FORMATS)} image ({type(error).__name__})") \
            from None
    return image


def resize(image: Image.Image, mode: int, width: int, height: int) -> Image.Image:
    """`image` brought to width x height as A1111's resize_mode says: 0 stretches; 1 scales to cover and
    crops the centre; 2 scales to fit and fills the bands beside it by stretching the image's edge pixels."""
    if image.size == (width, height):
        return image
    if mode == 0:
        return image.resize((width, height), Image.LANCZOS)
    if mode == 1:
        return ImageOps.fit(image, (width, height), Image.LANCZOS)
    scale = min(width / image.width, height / image.height)
    fitted = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                          Image.LANCZOS)
    canvas = fitted.resize((width, height), Image.NEAREST)
    left, top = (width - fitted.width) // 2, (height - fitted.height) // 2
    if top:                                     # bands above and below: the edge rows stretched
        canvas.paste(fitted.crop((0, 0, fitted.width, 1)).resize((width, top)), (0, 0))
        bottom = height - top - fitted.height
        canvas.paste(fitted.crop((0, fitted.height - 1, fitted.width, fitted.height)).resize((width, bottom)),
                     (0, top + fitted.height))
    if left:                                    # bands left and right: the edge columns stretched
        canvas.paste(fitted.crop((0, 0, 1, fitted.height)).resize((left, height)), (0, 0))
        right = width - left - fitted.width
        canvas.paste(fitted.crop((fitted.width - 1, 0, fitted.width, fitted.height)).resize((right, height)),
                     (left + fitted.width, 0))
    canvas.paste(fitted, (left, top))
    return canvas


def read_mask(mask: Image.Image, invert: bool, blur: int) -> Image.Image:
    """The mask as "L", white where to paint: a transparent mask's alpha channel, else its brightness,
    rounded to black and white, inverted if asked, then blurred (a Gaussian of std `blur` pixels)."""
    if mask.mode in ("RGBA", "LA") and mask.getextrema()[-1][0] < 255:
        mask = mask.getchannel("A")
    mask = mask.convert("L").point(lambda value: 255 if value > 127 else 0)
    if invert:
        mask = ImageOps.invert(mask)
    return mask.filter(ImageFilter.GaussianBlur(blur)) if blur > 0 else mask


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """The masked area (white) painted over with a smooth fill of the colours around it: normalised
    box-filtered averages of the unmasked pixels, coarse to fine (A1111's inpainting_fill 0)."""
    rgb = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)[None]      # (1, 3, H, W)
    keep = 1 - torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255)[None, None]       # (1, 1, H, W)
    size = rgb.shape[2:]
    filled = ((rgb * keep).sum((2, 3), keepdim=True) / keep.sum().clamp(min=1)).expand_as(rgb)
    for scale in (64, 16, 4, 2):                # each finer average replaces the coarser where it has data
        small = (max(1, size[0] // scale), max(1, size[1] // scale))
        weight, total = (F.interpolate(F.interpolate(t, small, mode="area"), size, mode="bilinear")
                         for t in (keep, rgb * keep))
        confidence = (weight * 4).clamp(max=1)
        filled = filled + confidence * (total / weight.clamp(min=1e-6) - filled)
    out = rgb * keep + filled * (1 - keep)
    return Image.fromarray(out[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy())


def crop_region(mask: Image.Image, padding: int, width: int, height: int) -> tuple[int, int, int, int] | None:
    """The box (x0, y0, x1, y1) around the mask's painted pixels, padded, grown to the aspect ratio of
    width x height where the image allows; None for an empty mask."""
    box = mask.getbbox()
    if box is None:
        return None
    x0, y0, x1, y1 = (max(0, box[0] - padding), max(0, box[1] - padding),
                      min(mask.width, box[2] + padding), min(mask.height, box[3] + padding))
    want = width / height
    if (x1 - x0) / (y1 - y0) < want:           # too narrow: widen around the centre
        x0, x1 = _grow(x0, x1, round((y1 - y0) * want), mask.width)
    else:
        y0, y1 = _grow(y0, y1, round((x1 - x0) / want), mask.height)
    return x0, y0, x1, y1


def _grow(start: int, stop: int, length: int, limit: int) -> tuple[int, int]:
    """[start, stop) grown to `length` around its centre, shifted to stay inside [0, limit)."""
    length = min(length, limit)
    start = max(0, min((start + stop - length) // 2, limit - length))
    return start, start + length


@dataclass
class EditImage:
    """One init image made ready: what the pipeline gets (`init`, `mask`, at width x height) and what puts
    its result back (`original`, `overlay` mask at the original's size, `box` for only-masked)."""

    init: Image.Image
    mask: Image.Image | None = None
    original: Image.Image | None = None
    overlay: Image.Image | None = None
    box: tuple[int, int, int, int] | None = None

    def finish(self, generated: Image.Image) -> Image.Image:
        """The image to return: with a mask, `generated` composited over the original through it."""
        if self.mask is None:
            return generated
        base = self.original.copy()
        if self.box is not None:
            x0, y0, x1, y1 = self.box
            base.paste(ImageOps.fit(generated, (x1 - x0, y1 - y0), Image.LANCZOS), (x0, y0))
        else:
            base = generated
        return Image.composite(base, self.original, self.overlay)


def prepare(image: Image.Image, mask: Image.Image | None, width: int, height: int, *, resize_mode: int,
            fill: int, full_res: bool, padding: int) -> EditImage:
    """The pipeline's inputs for one init image (and mask, from `read_mask`), as A1111 prepares them."""
    image = convert_mode(image, "RGB")                  # transparency over white
    if mask is None:
        return EditImage(resize(image, resize_mode, width, height))
    if full_res and mask.size != image.size:
        mask = mask.resize(image.size, Image.LANCZOS)
    box = crop_region(mask, padding, width, height) if full_res else None
    if full_res and box is None:
        return EditImage(resize(image, resize_mode, width, height))     # nothing to paint: plain img2img
    if box is not None:
        original, overlay = image, mask
        init, painted = (resize(part.crop(box), 2, width, height) for part in (image, mask))
    else:
        original = init = resize(image, resize_mode, width, height)
        overlay = painted = resize(mask, resize_mode, width, height)
    overlay = overlay.point(lambda value: min(255, 2 * value))         # a firm edge, as A1111's overlay
    if fill == 0:
        init = fill_masked(init, painted)
    return EditImage(init, painted, original, overlay, box)
