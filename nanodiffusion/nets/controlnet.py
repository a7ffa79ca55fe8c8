"""ControlNet (Zhang et al. 2023, "Adding Conditional Control to Text-to-Image Diffusion Models"): a trainable
copy of the SD UNet's encoder, fed a control image, whose zero-initialised 1x1 convs give one residual per
skip connection and one for the middle block; `SDUNet` adds them (its `down_residuals`, `mid_residual`).

Submodule names mirror diffusers' `ControlNetModel`, so a diffusers ControlNet folder loads strictly once its
`config.json` is read by `ControlNetConfig.from_diffusers_config`. The encoder reuses the UNet's blocks. The
network returns raw residuals: conditioning scales and when they apply live in `diffusion/denoisers.py`.
"""

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanodiffusion.config import JSONConfig
from nanodiffusion.errors import UserError
from nanodiffusion.nets.sd_unet import (TINY_UNET, MidBlock, SDUNet, SDUNetConfig, TimestepEmbedding,
                                        build_down_blocks, embed_inputs)

_CLASS_NAME = "ControlNetModel"
# ControlNetModel's own options, with diffusers' defaults; every other key is a UNet2DConditionModel option.
_OWN_OPTIONS = {"conditioning_channels": 3, "conditioning_embedding_out_channels": (16, 32, 96, 256),
                "global_pool_conditions": False, "controlnet_conditioning_channel_order": "rgb"}
# The UNet2DConditionModel options that ControlNetModel also has (it has no decoder, no output conv).
_UNET_OPTIONS = (
    "in_channels", "flip_sin_to_cos", "freq_shift", "down_block_types", "mid_block_type",
    "only_cross_attention", "block_out_channels", "layers_per_block", "downsample_padding",
    "mid_block_scale_factor", "act_fn", "norm_num_groups", "norm_eps", "cross_attention_dim",
    "transformer_layers_per_block", "encoder_hid_dim", "encoder_hid_dim_type", "attention_head_dim",
    "num_attention_heads", "use_linear_projection", "class_embed_type", "addition_embed_type",
    "addition_time_embed_dim", "num_class_embeds", "upcast_attention", "resnet_time_scale_shift",
    "projection_class_embeddings_input_dim", "addition_embed_type_num_heads")
# Model families by the width of their text context, to name a ControlNet made for another one.
FAMILIES = {768: "SD v1.x", 1024: "SD 2.x", 2048: "SDXL"}


@dataclass(frozen=True)
class ControlNetConfig(JSONConfig):
    """Shape of a ControlNet: the UNet whose encoder it copies, and its control-image encoder.

    Only the encoder fields of `unet` matter (out_channels and sample_size are unused); the defaults are
    the SD v1.x ControlNets (lllyasviel's control_v11p_sd15_*).
    """

    unet: SDUNetConfig = SDUNetConfig(sample_size=None)
    conditioning_channels: int = 3                          # channels of the control image
    embedding_channels: tuple[int, ...] = (16, 32, 96, 256)  # control-image encoder widths; /2 between them
    global_pool: bool = False       # residuals averaged over positions (the "shuffle" ControlNet)
    channel_order: str = "rgb"      # "bgr": the network was trained on BGR control images

    def __post_init__(self):
        if not isinstance(self.unet, SDUNetConfig):
            raise UserError(f"unet must be an SDUNetConfig, got {type(self.unet).__name__}")
        if not isinstance(self.conditioning_channels, int) or self.conditioning_channels < 1:
            raise UserError(f"conditioning_channels must be a positive integer, "
                            f"got {self.conditioning_channels!r}")
        channels = self.embedding_channels
        if not isinstance(channels, tuple) or not channels or \
                any(not isinstance(c, int) or c < 1 for c in channels):
            raise UserError(f"embedding_channels must be a non-empty tuple of positive integers, "
                            f"got {channels!r}")
        if self.channel_order not in ("rgb", "bgr"):
            raise UserError(f"channel_order must be 'rgb' or 'bgr', got {self.channel_order!r}")

    @property
    def downscale(self) -> int:
        """Control image pixels per latent pixel along a side (8 for SD: three stride-2 convs)."""
        return 2 ** (len(self.embedding_channels) - 1)

    def to_dict(self) -> dict:
        """JSON-safe dict of the fields, `unet` as its own dict."""
        return {**super().to_dict(), "unet": self.unet.to_dict()}

    @classmethod
    def from_dict(cls, data: Mapping) -> "ControlNetConfig":
        """Inverse of `to_dict`; unknown keys are a UserError, missing ones take the defaults."""
        data = dict(data)
        if "unet" in data:
            data["unet"] = SDUNetConfig.from_dict(data["unet"])
        return super().from_dict(data)

    @classmethod
    def from_diffusers_config(cls, config: Mapping) -> "ControlNetConfig":
        """Read diffusers' ControlNetModel `config.json` (a dict); options we lack raise a UserError."""
        if config.get("_class_name", _CLASS_NAME) != _CLASS_NAME:
            raise UserError(f"expected a diffusers {_CLASS_NAME} config, "
                            f"got _class_name={config['_class_name']!r}")
        if config.get("addition_embed_type") == "text_time" or config.get("cross_attention_dim") == 2048:
            raise UserError("this is an SDXL ControlNet (a 2048-wide text context and size embeddings); "
                            "only SD v1.x and 2.x ControlNets are supported")
        own = {key: config.get(key, default) for key, default in _OWN_OPTIONS.items()}
        unet = {key: value for key, value in config.items() if key not in _OWN_OPTIONS}
        # A ControlNet config is a UNet config without the decoder: read it as the UNet it was copied from.
        down_types = unet.get("down_block_types", SDUNetConfig().to_diffusers_config()["down_block_types"])
        unet.update(_class_name="UNet2DConditionModel", sample_size=None,
                    out_channels=unet.get("in_channels", 4),
                    up_block_types=[kind.replace("Down", "Up") for kind in reversed(down_types)])
        try:
            unet_config = SDUNetConfig.from_diffusers_config(unet)
        except UserError as error:
            raise UserError(f"ControlNet config: {error}") from None
        return cls(unet=unet_config, conditioning_channels=own["conditioning_channels"],
                   embedding_channels=tuple(own["conditioning_embedding_out_channels"]),
                   global_pool=own["global_pool_conditions"],
                   channel_order=own["controlnet_conditioning_channel_order"])

    def to_diffusers_config(self) -> dict:
        """Return diffusers' ControlNetModel `config.json` contents for this config (JSON-ready)."""
        unet = self.unet.to_diffusers_config()
        return {"_class_name": _CLASS_NAME, **{key: unet[key] for key in _UNET_OPTIONS if key in unet},
                "conditioning_channels": self.conditioning_channels,
                "conditioning_embedding_out_channels": list(self.embedding_channels),
                "global_pool_conditions": self.global_pool,
                "controlnet_conditioning_channel_order": self.channel_order}

    def check_fits(self, unet: SDUNetConfig) -> None:
        """Raise a UserError unless this ControlNet's residuals and text context fit `unet`."""
        mine, theirs = self.unet.context_dim, unet.context_dim
        if mine != theirs:
            def family(width: int) -> str:
                return f"{FAMILIES[width]} (text context {width})" if width in FAMILIES else \
                    f"a model with text context {width}"
            raise UserError(f"this ControlNet was made for {family(mine)} but the model is {family(theirs)}: "
                            "use a ControlNet trained for this model's family")
        fields = ("model_channels", "channel_mult", "num_res_blocks")
        wrong = [f"{name} {getattr(self.unet, name)} vs {getattr(unet, name)}" for name in fields
                 if getattr(self.unet, name) != getattr(unet, name)]
        if wrong:
            raise UserError(f"this ControlNet's residuals do not fit the UNet ({'; '.join(wrong)})")


SD15_CONTROLNET = ControlNetConfig()
TINY_CONTROLNET = ControlNetConfig(unet=dataclasses.replace(TINY_UNET, sample_size=None),
                                   embedding_channels=(8, 8, 16, 16))


def _zero(module: nn.Module) -> nn.Module:
    """A "zero convolution": weights and bias start at 0, so training starts from the plain UNet."""
    for parameter in module.parameters():
        nn.init.zeros_(parameter)
    return module


class ConditioningEmbedding(nn.Module):
    """The control-image encoder: 3x3 convs with SiLU, a stride-2 conv between widths, to the latent size
    and the UNet's first width (the paper's E(·), §3.2)."""

    def __init__(self, config: ControlNetConfig):
        super().__init__()
        channels = config.embedding_channels
        self.conv_in = nn.Conv2d(config.conditioning_channels, channels[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for width, next_width in zip(channels, channels[1:]):
            self.blocks.append(nn.Conv2d(width, width, 3, padding=1))
            self.blocks.append(nn.Conv2d(width, next_width, 3, padding=1, stride=2))
        self.conv_out = _zero(nn.Conv2d(channels[-1], config.unet.model_channels, 3, padding=1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.conv_in(image))
        for conv in self.blocks:
            h = F.silu(conv(h))
        return self.conv_out(h)


class ControlNet(nn.Module):
    """`ControlNet(config)(x, t, context, control_image)` returns (down residuals, one per skip connection of
    the UNet, and the middle-block residual) for latents `x` (B, C, h, w) and a control image
    (B, conditioning_channels, h*8, w*8) with values in [0, 1].
    """

    def __init__(self, config: ControlNetConfig):
        super().__init__()
        self.config = config
        unet = config.unet
        self.conv_in = nn.Conv2d(unet.in_channels, unet.model_channels, 3, padding=1)
        self.time_embedding = TimestepEmbedding(unet.model_channels, 4 * unet.model_channels)
        self.controlnet_cond_embedding = ConditioningEmbedding(config)
        self.down_blocks, skip_channels = build_down_blocks(unet)
        self.mid_block = MidBlock(unet)
        self.controlnet_down_blocks = nn.ModuleList(_zero(nn.Conv2d(c, c, 1)) for c in skip_channels)
        width = unet.channels(len(unet.channel_mult) - 1)
        self.controlnet_mid_block = _zero(nn.Conv2d(width, width, 1))

    @classmethod
    def from_unet(cls, unet: SDUNet, **options) -> "ControlNet":
        """A ControlNet whose encoder starts as a copy of `unet`'s (the paper's initialisation, §3.1);
        `options` are ControlNetConfig fields other than `unet`."""
        config = ControlNetConfig(unet=dataclasses.replace(unet.config, sample_size=None), **options)
        weight = next(unet.parameters())
        controlnet = cls(config).to(device=weight.device, dtype=weight.dtype)
        encoder = {key: value for key, value in unet.state_dict().items()
                   if key.startswith(("conv_in.", "time_embedding.", "down_blocks.", "mid_block."))}
        missing, unexpected = controlnet.load_state_dict(encoder, strict=False)
        assert not unexpected and all(key.startswith("controlnet_") for key in missing), (missing, unexpected)
        return controlnet

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, context: torch.Tensor,
                control_image: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        temb = embed_inputs(self.config.unet, self.time_embedding, x, t, context)
        size = (x.shape[0], self.config.conditioning_channels,
                x.shape[2] * self.config.downscale, x.shape[3] * self.config.downscale)
        if tuple(control_image.shape) != size:
            raise ValueError(f"control_image must have shape {size} ({self.config.downscale}x the latents), "
                             f"got {tuple(control_image.shape)}")
        control_image = control_image.to(x.dtype)
        if self.config.channel_order == "bgr":
            control_image = control_image.flip(1)
        h = self.conv_in(x) + self.controlnet_cond_embedding(control_image)
        skips = [h]
        for block in self.down_blocks:
            h = block(h, temb, context, skips)
        h = self.mid_block(h, temb, context)
        down = [conv(skip) for conv, skip in zip(self.controlnet_down_blocks, skips)]
        mid = self.controlnet_mid_block(h)
        if self.config.global_pool:
            down = [residual.mean(dim=(2, 3), keepdim=True) for residual in down]   # (B, C, 1, 1)
            mid = mid.mean(dim=(2, 3), keepdim=True)
        return down, mid
