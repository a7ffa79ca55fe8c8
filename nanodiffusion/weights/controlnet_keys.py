"""Key names of the original ControlNet files (lllyasviel's `cldm` code: control_v11p_sd15_canny.pth and
the .safetensors conversions people share), built on the UNet's rename pairs in `original_keys`:

    control_model.input_blocks.1.0.in_layers.0.weight     the UNet encoder copy (the UNet's own names)
    control_model.input_hint_block.0.weight               control-image encoder: convs at even indices
    control_model.zero_convs.3.0.weight                   one 1x1 zero conv per skip connection
    control_model.middle_block_out.0.weight               the zero conv of the middle block

Some files leave out the `control_model.` prefix; v1.0 files also carry a whole SD model beside it.
"""

import torch

from nanodiffusion.errors import UserError
from nanodiffusion.nets.controlnet import ControlNetConfig
from nanodiffusion.weights.original_keys import rename_by_pairs, unet_pairs

PREFIX = "control_model."
# What the UNet and the ControlNet share: the input conv, the time embedding, the encoder and the middle.
_ENCODER = ("conv_in", "time_embedding.", "down_blocks.", "mid_block.")
# Networks of a full SD model that v1.0 ControlNet files carry beside `control_model.*`; not read.
SD_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "model_ema.")


def controlnet_pairs(config: ControlNetConfig) -> list[tuple[str, str]]:
    """(our module, original module) pairs of a ControlNet: the UNet's for its encoder, plus its own."""
    pairs = [(ours, original) for ours, original in unet_pairs(config.unet) if ours.startswith(_ENCODER)]
    convs = 2 * len(config.embedding_channels)            # conv_in, two per width change, conv_out
    pairs.append(("controlnet_cond_embedding.conv_in", "input_hint_block.0"))
    pairs += [(f"controlnet_cond_embedding.blocks.{j}", f"input_hint_block.{2 * (j + 1)}")
              for j in range(convs - 2)]                  # odd indices of input_hint_block are SiLUs
    pairs.append(("controlnet_cond_embedding.conv_out", f"input_hint_block.{2 * (convs - 1)}"))
    levels, resnets = len(config.unet.channel_mult), config.unet.num_res_blocks
    skips = 1 + levels * resnets + levels - 1             # conv_in, every resnet, every downsampler
    pairs += [(f"controlnet_down_blocks.{i}", f"zero_convs.{i}.0") for i in range(skips)]
    pairs.append(("controlnet_mid_block", "middle_block_out.0"))
    return pairs


def original_names(config: ControlNetConfig, our_keys, prefix: str = PREFIX) -> dict[str, str]:
    """{our key: original key} for every key in `our_keys`, with `prefix` before each original key."""
    return rename_by_pairs(controlnet_pairs(config), prefix, our_keys, "controlnet")


def infer_hint_channels(shapes: dict[str, torch.Size]) -> tuple[int, tuple[int, ...]]:
    """(conditioning_channels, embedding_channels) from the `input_hint_block.*` shapes (keys without
    prefix): the input conv, then the output width of every stride-2 conv."""
    indices = sorted({int(key.split(".")[1]) for key in shapes if key.startswith("input_hint_block.")})
    if len(indices) < 2 or len(indices) % 2 or indices != list(range(0, 2 * len(indices), 2)):
        raise UserError(f"unexpected control-image encoder layout: input_hint_block convs at {indices}")
    convs = [shapes[f"input_hint_block.{i}.weight"] for i in indices]    # (C_out, C_in, 3, 3) each
    widths = (convs[0][0],) + tuple(conv[0] for conv in convs[2:-1:2])
    return convs[0][1], widths
