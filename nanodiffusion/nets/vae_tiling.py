"""Decoding large latents in bounded memory: overlapping tiles blended linearly, and one image at a time.

A VAE decode holds several (C, H, W) feature maps at full image resolution (128-256 channels for SD), so its
peak memory grows with the image area: a 1024x1024 float32 decode needs about 4x a 512x512 one. Tiling
decodes equal tiles of at most `tile_size` latent pixels that overlap by at least `overlap` and cross-fades
them, so the peak is that of one tile. Tiles see only their own context (GroupNorm statistics, the mid-block
attention), so a tiled image differs slightly from the untiled one; latents that fit one tile are decoded
whole, exactly as `decode` does.
"""

import math
from collections.abc import Callable

import torch


def tile_spans(size: int, tile_size: int, overlap: int) -> tuple[list[int], int]:
    """(starts, length): the fewest equal tiles of at most `tile_size` covering `size`, evenly spread so that
    neighbours overlap by at least `overlap`."""
    if not 0 <= overlap < tile_size:
        raise ValueError(f"need 0 <= overlap < tile_size, got overlap={overlap}, tile_size={tile_size}")
    if size <= tile_size:
        return [0], size
    count = math.ceil((size - overlap) / (tile_size - overlap))
    length = math.ceil((size + (count - 1) * overlap) / count)       # count * length >= size + overlaps
    return [i * (size - length) // (count - 1) for i in range(count)], length


def _ramp(length: int, fade: int, fade_in: bool, fade_out: bool) -> torch.Tensor:
    """Blend weights (length,): rising over the first `fade` pixels, falling over the last, 1 elsewhere."""
    position = torch.arange(length, dtype=torch.float32) + 0.5
    weight = torch.ones(length)
    if fade_in:
        weight = torch.minimum(weight, position / fade)
    if fade_out:
        weight = torch.minimum(weight, (length - position) / fade)
    return weight


def decode_tiled(decode: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, *, tile_size: int = 64,
                 overlap: int = 16, factor: int = 8) -> torch.Tensor:
    """Images (B, C, h*factor, w*factor), float32, from latents z (B, c, h, w) decoded tile by tile.

    `decode` maps latents to images `factor` times larger (e.g. `vae.decode`); `tile_size` and `overlap` are
    in latent pixels. Neighbouring tiles are cross-faded linearly over their overlap.
    """
    height, width = z.shape[-2:]
    if height <= tile_size and width <= tile_size:
        return decode(z).float()
    (rows, tile_height), (columns, tile_width) = (tile_spans(height, tile_size, overlap),
                                                  tile_spans(width, tile_size, overlap))
    images = weights = None
    fade = overlap * factor
    for i, top in enumerate(rows):
        for j, left in enumerate(columns):
            tile = decode(z[:, :, top:top + tile_height, left:left + tile_width]).float()   # (B, C, th, tw)
            if images is None:
                images = tile.new_zeros(*tile.shape[:2], height * factor, width * factor)
                weights = tile.new_zeros(height * factor, width * factor)
            pixel_height, pixel_width = tile.shape[-2:]
            weight = torch.outer(_ramp(pixel_height, fade, i > 0, i < len(rows) - 1),
                                 _ramp(pixel_width, fade, j > 0, j < len(columns) - 1)).to(tile.device)
            y, x = top * factor, left * factor
            images[:, :, y:y + pixel_height, x:x + pixel_width] += tile * weight             # (th, tw) weight
            weights[y:y + pixel_height, x:x + pixel_width] += weight
    return images / weights


def decode_sliced(decode: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor) -> torch.Tensor:
    """`decode` applied to one latent of the batch at a time (peak memory of a batch of 1), concatenated."""
    return torch.cat([decode(latent) for latent in z.split(1)])
