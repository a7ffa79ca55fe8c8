"""Estimates of the memory a generation needs, so that a request this machine cannot hold is refused before
any work, with what to change, instead of one allocation of tens of GB that the system kills.

The estimates count activations only (the weights are loaded already), from the networks' configs: within a
factor of about 1.5 of the peak measured on the CPU for the built-in models (benchmarks/README.md's machine).
"""

import math

from nanodiffusion.atomic import check_output_folder
from nanodiffusion.validation import check_fits

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
        scores = score_heads * area**2 if attention else 0
        work = max(work, (20 if attention else 6) * channels * area + scores)
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
    height, width = request.height or pipe.native_size, request.width or pipe.native_size
    factor = pipe.vae_factor
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


def ddpm_training_bytes(config, batch: int) -> int:
    """About the activations one training step of the DDPM UNet keeps for the backward pass (float32):
    every level's maps on the way down and up, not only the busiest ones as in sampling."""
    kept = 0
    for level, mult in enumerate(config.channel_mult):
        area = math.ceil(config.image_size / 2**level) ** 2
        attention = level in config.attention_levels
        maps = (20 if attention else 8) * (2 * config.num_res_blocks + 1)       # down, up (one more) blocks
        kept += maps * config.model_channels * mult * area + (config.num_heads * area**2 if attention else 0)
    return int(SAFETY * batch * 4 * kept)


def ddpm_bytes(pipe, num_images: int, guided: bool, gif_frames: int = 0) -> int:
    """About the peak memory of sampling `num_images` at once from a DDPMPipeline, GIF frames included."""
    config = pipe.unet.config
    side = config.image_size
    unet = unet_activation_bytes(config, num_images * (2 if guided else 1), side, side, 4,
                                 score_heads=config.num_heads)
    frames = gif_frames * num_images * config.in_channels * side * side * 4
    return int(SAFETY * unet) + frames


def check_generation_fits(pipe, request, folder, num_images: int) -> None:
    """`nanodiffusion generate`'s request (one image per call) fits this machine's memory, and its
    `num_images` PNGs fit on the disk of `folder`."""
    width, height = request.width or pipe.native_size, request.height or pipe.native_size
    change = "ask for a smaller --size" + ("" if pipe.vae_tile_size else
                                           ", or decode in tiles with --vae-tile 64")
    check_fits(text_to_image_bytes(pipe, request), pipe.device, f"one {width}x{height} image", change)
    check_output_folder(folder, "the images", size=num_images * PNG_BYTES_PER_PIXEL * width * height)
