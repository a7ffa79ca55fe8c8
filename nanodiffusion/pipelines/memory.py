"""Estimates of the memory a generation needs, so that a request this machine cannot hold is refused before any
work, with what to change, instead of one allocation of tens of GB that the system kills.

The estimates count activations only (the weights are loaded already), from the networks' configs: within a
factor of about 1.5 of the peak measured on the CPU for the built-in models (benchmarks/README.md's machine).
"""

import math
import os

import torch

from nanodiffusion.atomic import check_output_folder
from nanodiffusion.errors import UserError

SAFETY = 1.5                    # measured peaks were up to this much above the sums below
PNG_BYTES_PER_PIXEL = 3         # an RGB PNG is at most about its raw size


def unet_activation_bytes(config, batch: int, height: int, width: int, element_size: int, *,
                          score_heads: int = 0) -> int:
    """About the activations of one UNet pass on (batch, C, height, width): the skip connections kept for
    the up path, plus the working maps of the busiest level (a transformer level holds about 20 maps of its
    width: q, k, v and GEGLU's 8x-wide inner layer; a resnet level about 6). `score_heads`: heads whose
    attention scores are materialised (the DDPM UNet's math kernel)."""
    skips = work = 0
    for level, mult in enumerate(config.channel_mult):
        area = math.ceil(height / 2**level) * math.ceil(width / 2**level)
        channels = config.model_channels * mult
        attention = level in config.attention_levels
        skips += (config.num_res_blocks + 1) * channels * area
        work = max(work, (20 if attention else 6) * channels * area + (score_heads * area**2 if attention else 0))
    return batch * element_size * (skips + work)


def vae_decode_bytes(config, batch: int, height: int, width: int, element_size: int) -> int:
    """About the activations of decoding `batch` images of height x width: at each level the maps that come
    up from the level below and about 4 of the level's own width; plus the float32 images."""
    # TAESD (AutoencoderTinyConfig) is one width at its 4 resolutions
    channels = getattr(config, "block_channels", None) or (config.decoder_channels,) * 4
    work = 0
    for level, level_channels in enumerate(channels):
        area = math.ceil(height / 2**level) * math.ceil(width / 2**level)
        work = max(work, (channels[min(level + 1, len(channels) - 1)] + 4 * level_channels) * area)
    return batch * (element_size * work + 4 * 3 * height * width)


def text_to_image_bytes(pipe, request) -> int:
    """About the peak memory of `pipe.generate(request)` beyond the weights."""
    images = len(request.prompts) * request.num_images_per_prompt
    height, width, factor = request.height or pipe.native_size, request.width or pipe.native_size, pipe.vae_factor
    unet = unet_activation_bytes(pipe.unet.config, images * (2 if request.guidance_scale != 1 else 1),
                                 height // factor, width // factor, pipe.dtype.itemsize)
    vae_size = next(pipe.vae.parameters()).dtype.itemsize
    decoded = 1 if pipe.vae_slicing else images
    if pipe.vae_tile_size is None:
        decode = vae_decode_bytes(pipe.vae.config, decoded, height, width, vae_size)
    else:                       # one tile at a time, blended into the float32 images
        tile = (pipe.vae_tile_size + pipe.vae_tile_overlap) * factor
        decode = vae_decode_bytes(pipe.vae.config, decoded, min(tile, height), min(tile, width), vae_size) \
            + 2 * 4 * 3 * images * height * width
    return int(SAFETY * max(unet, decode))


def ddpm_bytes(pipe, num_images: int, guided: bool, gif_frames: int = 0) -> int:
    """About the peak memory of sampling `num_images` at once from a DDPMPipeline, GIF frames included."""
    config = pipe.unet.config
    side = config.image_size
    unet = unet_activation_bytes(config, num_images * (2 if guided else 1), side, side, 4,
                                 score_heads=config.num_heads)
    frames = gif_frames * num_images * config.in_channels * side * side * 4
    return int(SAFETY * unet) + frames


def available_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on `device` (Linux: MemAvailable, within a cgroup's limit); None when
    unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as file:
            free = next(int(line.split()[1]) * 1024 for line in file if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None
    try:
        with open("/sys/fs/cgroup/memory.max") as limit, open("/sys/fs/cgroup/memory.current") as used:
            free = min(free, int(limit.read()) - int(used.read()))
    except (OSError, ValueError):           # no cgroup v2, or "max": no limit
        pass
    return free


def check_fits(needed: int, device: torch.device, what: str, change: str) -> None:
    """A UserError when `needed` bytes exceed what `device` has free: it says both and what to `change`."""
    if os.environ.get("NANODIFFUSION_NO_MEMORY_CHECK"):
        return
    free = available_memory(device)
    if free is not None and needed > free:
        raise UserError(f"{what} needs about {needed / 2**30:.1f} GiB of memory, more than the "
                        f"{free / 2**30:.1f} GiB available on {device}: {change} "
                        "(NANODIFFUSION_NO_MEMORY_CHECK=1 skips this estimate)")


def check_generation_fits(pipe, request, folder, num_images: int) -> None:
    """`nanodiffusion generate`'s request (one image per call) fits this machine's memory, and its
    `num_images` PNGs fit on the disk of `folder`."""
    width, height = request.width or pipe.native_size, request.height or pipe.native_size
    change = "ask for a smaller --size" + ("" if pipe.vae_tile_size else ", or decode in tiles with --vae-tile 64")
    check_fits(text_to_image_bytes(pipe, request), pipe.device, f"one {width}x{height} image", change)
    check_output_folder(folder, "the images", size=num_images * PNG_BYTES_PER_PIXEL * width * height)
