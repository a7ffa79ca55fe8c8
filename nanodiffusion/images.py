"""Images: tensors in [-1, 1] of shape (B, C, H, W) <-> PIL images, grids, animated GIFs, PNG text metadata.

Every file is written atomically (a temporary file in the same folder, then `os.replace`).
"""

import io
import math
import os
import struct
from collections.abc import Sequence
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from nanodiffusion.atomic import atomic_write
from nanodiffusion.errors import UserError

CHANNEL_MODES = {1: "L", 3: "RGB"}


def uint8_to_float(images: torch.Tensor) -> torch.Tensor:
    """Map uint8 pixels 0..255 to float32 in [-1, 1] (the inverse of `float_to_uint8`)."""
    return images.float() / 127.5 - 1.0


def float_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Map floats in [-1, 1] to uint8 0..255, rounding to nearest and clamping values outside the range."""
    return ((x.detach().float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def to_pil(x: torch.Tensor) -> list[Image.Image]:
    """Convert a (B, C, H, W) tensor in [-1, 1] into B PIL images: "L" when C = 1, "RGB" when C = 3."""
    if x.ndim != 4 or x.shape[1] not in CHANNEL_MODES:
        raise ValueError(f"expected a (B, C, H, W) tensor with C in (1, 3), got shape {tuple(x.shape)}")
    pixels = float_to_uint8(x).cpu().permute(0, 2, 3, 1).numpy()       # (B, H, W, C)
    if x.shape[1] == 1:
        pixels = pixels[..., 0]                                           # (B, H, W): fromarray makes "L"
    return [Image.fromarray(image) for image in pixels]


def from_pil(images: Image.Image | Sequence[Image.Image], size: int | None = None,
             channels: int = 3) -> torch.Tensor:
    """Convert PIL images into a float (B, C, H, W) tensor in [-1, 1]; see `pil_to_uint8` for `size`."""
    return uint8_to_float(pil_to_uint8(images, size, channels))


def pil_to_uint8(images: Image.Image | Sequence[Image.Image], size: int | None = None,
                 channels: int = 3) -> torch.Tensor:
    """Convert PIL images into a uint8 (B, C, H, W) tensor with C = `channels` (1: grayscale, 3: RGB).

    With `size`, each image is resized (shorter side) and center-cropped to size x size; without it, all
    images must already have the same size.
    """
    if channels not in CHANNEL_MODES:
        raise UserError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    images = [images] if isinstance(images, Image.Image) else list(images)
    if not images:
        raise ValueError("no images to convert")
    arrays = []
    for image in images:
        image = convert_mode(image, CHANNEL_MODES[channels])
        if size is not None:
            image = resize_center_crop(image, size)
        if size is None and image.size != images[0].size:
            raise UserError(f"images have different sizes ({images[0].size} and {image.size}): pass a size")
        arrays.append(np.asarray(image).reshape(image.height, image.width, channels))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()   # (B, C, H, W)


def convert_mode(image: Image.Image, mode: str) -> Image.Image:
    """Return `image` in `mode` ("L" or "RGB"); transparent pixels are composited over white."""
    has_alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
    if has_alpha:
        # Pillow's plain convert() keeps whatever color hides under alpha 0 (often black): use white instead,
        # the background such images are usually drawn to be seen on.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image if image.mode == mode else image.convert(mode)


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Resize `image` so its shorter side is `size` (bicubic, antialiased), then crop the center square."""
    if size < 1:
        raise UserError(f"image size must be positive, got {size}")
    width, height = image.size
    scale = size / min(width, height)
    new_width, new_height = max(size, round(width * scale)), max(size, round(height * scale))
    if (new_width, new_height) != image.size:
        image = image.resize((new_width, new_height), Image.Resampling.BICUBIC)
    left, top = (new_width - size) // 2, (new_height - size) // 2
    return image.crop((left, top, left + size, top + size))


def image_grid(images: Sequence[Image.Image], rows: int, cols: int) -> Image.Image:
    """Paste up to rows*cols equal-sized images into one image, row by row; empty cells stay black."""
    if rows < 1 or cols < 1:
        raise UserError(f"rows and cols must be positive, got rows={rows}, cols={cols}")
    if not images or len(images) > rows * cols:
        raise UserError(f"a {rows}x{cols} grid holds 1 to {rows * cols} images, got {len(images)}")
    width, height = images[0].size
    mode = images[0].mode
    if any(image.size != (width, height) or image.mode != mode for image in images):
        raise UserError("grid images must all have the same size and mode")
    grid = Image.new(mode, (cols * width, rows * height))
    for i, image in enumerate(images):
        grid.paste(image, (i % cols * width, i // cols * height))
    return grid


def grid_shape(num_images: int, cols: int | None = None) -> tuple[int, int]:
    """(rows, cols) of a grid for `num_images`: `cols` columns, by default a near-square ceil(sqrt(n))."""
    cols = cols or math.ceil(math.sqrt(num_images))
    return math.ceil(num_images / cols), cols


def frame_steps(num_steps: int, frames: int) -> set[int]:
    """The steps (0-based) after which to take `frames` frames of a sampler run, evenly spaced, the last step
    included; at least one and at most one per step."""
    frames = max(1, min(frames, num_steps))
    return {round((j + 1) * num_steps / frames) - 1 for j in range(frames)}


def write_png(image: Image.Image, file: BinaryIO, text: dict[str, str] | None = None) -> None:
    """Write `image` as PNG to an open binary file, with `text` as text chunks (e.g. A1111's "parameters")."""
    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)                   # tEXt when Latin-1 encodable, else UTF-8 iTXt
    image.save(file, format="PNG", pnginfo=info)


def save_png(image: Image.Image, path: str | os.PathLike, text: dict[str, str] | None = None) -> None:
    """Save `image` as a PNG with `text` as text chunks (`write_png`); the write is atomic."""
    with atomic_write(path) as file:
        write_png(image, file, text)


def read_png_text(path: str | os.PathLike) -> dict[str, str]:
    """Return the text chunks (tEXt, zTXt, iTXt) of a PNG file as a dict."""
    try:
        with Image.open(path) as image:
            if image.format != "PNG":
                raise UserError(f"{path} is a {image.format} file, not a PNG")
            return {key: str(value) for key, value in image.text.items()}
    except (OSError, Image.UnidentifiedImageError) as error:
        raise UserError(f"cannot read PNG {path}: {error}") from error


def save_gif(frames: Sequence[Image.Image], path: str | os.PathLike, *, duration_ms: int = 80,
             hold_last_ms: int = 2000, loop: int = 0) -> None:
    """Save an animated GIF showing each frame for `duration_ms` and the last one for `hold_last_ms`.

    The file has exactly len(frames) frames, repeats `loop` times (0: forever) and is written atomically.
    """
    if not frames:
        raise UserError("a GIF needs at least one frame")
    if any(frame.size != frames[0].size for frame in frames):
        raise UserError("GIF frames must all have the same size")
    if duration_ms < 10 or hold_last_ms < 10:
        raise UserError("GIF frame durations must be at least 10 ms (GIF counts hundredths of a second)")
    delays_ms = [duration_ms] * (len(frames) - 1) + [hold_last_ms]
    data = _animated_gif(frames, delays_ms, loop)
    with atomic_write(path) as file:
        file.write(data)


def _animated_gif(frames: Sequence[Image.Image], delays_ms: list[int], loop: int) -> bytes:
    """Assemble a GIF89a file from frames that Pillow encodes one at a time, each with its own color table.

    Pillow's multi-frame writer merges a frame equal to the previous one, and no option turns that off
    (python-pillow/Pillow#7809); splicing single-frame files keeps every frame.
    """
    width, height = frames[0].size
    parts = [b"GIF89a", struct.pack("<HHBBB", width, height, 0x70, 0, 0),     # no global color table
             b"\x21\xff\x0bNETSCAPE2.0\x03\x01" + struct.pack("<H", loop) + b"\x00"]
    for frame, delay_ms in zip(frames, delays_ms):
        table_flags, color_table, image_data = _encode_gif_frame(frame)
        # Graphic control extension: disposal 1 (leave the frame in place), delay in hundredths of a second.
        parts.append(struct.pack("<BBBBHBB", 0x21, 0xF9, 4, 0x04, round(delay_ms / 10), 0, 0))
        parts.append(struct.pack("<BHHHHB", 0x2C, 0, 0, width, height, 0x80 | table_flags))  # local table
        parts += [color_table, image_data]
    parts.append(b"\x3b")
    return b"".join(parts)


def _encode_gif_frame(frame: Image.Image) -> tuple[int, bytes, bytes]:
    """Encode a frame as a GIF with Pillow; return (table size bits | interlace bit, color table, LZW)."""
    buffer = io.BytesIO()
    frame = frame if frame.mode in ("L", "P") else convert_mode(frame, "RGB")
    frame.save(buffer, format="GIF", interlace=False)
    data = buffer.getvalue()
    flags, position = data[10], 13                      # after the header and logical screen descriptor
    table, table_bits = b"", 0
    if flags & 0x80:                                    # global color table
        table_bits = flags & 7
        table, position = _color_table(data, position, table_bits)
    while data[position] == 0x21:                       # skip extensions (label byte, then sub-blocks)
        position = _skip_sub_blocks(data, position + 2)
    if data[position] != 0x2C:
        raise RuntimeError("unexpected GIF layout from Pillow: no image descriptor")
    image_flags = data[position + 9]
    position += 10
    if image_flags & 0x80:                              # local color table
        table_bits = image_flags & 7
        table, position = _color_table(data, position, table_bits)
    if not table:
        raise RuntimeError("unexpected GIF layout from Pillow: no color table")
    end = _skip_sub_blocks(data, position + 1)          # the LZW minimum code size byte, then sub-blocks
    return table_bits | (image_flags & 0x40), table, data[position:end]


def _color_table(data: bytes, position: int, size_bits: int) -> tuple[bytes, int]:
    """Return the color table at `position` (2^(size_bits+1) RGB triples) and the position after it."""
    end = position + 3 * 2 ** (size_bits + 1)
    return data[position:end], end


def _skip_sub_blocks(data: bytes, position: int) -> int:
    """Return the position after the chain of length-prefixed sub-blocks starting at `position`."""
    while data[position]:
        position += data[position] + 1
    return position + 1
