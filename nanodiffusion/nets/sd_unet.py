"""The Stable Diffusion v1.x / 2.x UNet: latent eps (or v) prediction with text cross-attention (Rombach et
al. 2022). SD 2.x differs only in options: linear projections, 64-wide heads, upcast attention.

Submodule names mirror diffusers' `UNet2DConditionModel`, so a diffusers `unet/` folder loads with
`load_state_dict(strict=True)` once its `config.json` is read by `SDUNetConfig.from_diffusers_config`.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanodiffusion.config import JSONConfig
from nanodiffusion.errors import UserError
from nanodiffusion.nets.blocks import Downsample
from nanodiffusion.nets.embeddings import timestep_embedding
from nanodiffusion.nets.sd_blocks import (ResnetBlock, SpatialTransformer, Upsample,
                                          read_diffusers_config)

_CLASS_NAME = "UNet2DConditionModel"
_DOWN_TYPES = {True: "CrossAttnDownBlock2D", False: "DownBlock2D"}     # keyed by "level has attention"
_UP_TYPES = {True: "CrossAttnUpBlock2D", False: "UpBlock2D"}
_MID_TYPE = "UNetMidBlock2DCrossAttn"

# Options of diffusers' UNet2DConditionModel read into SDUNetConfig, with diffusers' defaults (which fill keys
# that an older config.json leaves out; they are not SD's values).
_DIFFUSERS_READ = {
    "sample_size": None, "in_channels": 4, "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2, "dropout": 0.0,
    "norm_num_groups": 32, "norm_eps": 1e-5, "cross_attention_dim": 1280, "transformer_layers_per_block": 1,
    "attention_head_dim": 8, "use_linear_projection": False, "upcast_attention": False,
}
# Options that SD v1.x/2.x leave at one value: the only one implemented here.
_DIFFUSERS_FIXED = {
    "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0, "mid_block_type": _MID_TYPE,
    "only_cross_attention": False, "downsample_padding": 1, "mid_block_scale_factor": 1, "act_fn": "silu",
    "reverse_transformer_layers_per_block": None, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "num_attention_heads": None, "dual_cross_attention": False, "class_embed_type": None,
    "addition_embed_type": None, "addition_time_embed_dim": None, "num_class_embeds": None,
    "resnet_time_scale_shift": "default", "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional", "time_embedding_dim": None, "time_embedding_act_fn": None,
    "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None, "attention_type": "default",
    "class_embeddings_concat": False, "mid_block_only_cross_attention": None, "cross_attention_norm": None,
    "addition_embed_type_num_heads": 64,
}


@dataclass(frozen=True)
class SDUNetConfig(JSONConfig):
    """Shape of the SD UNet; the defaults are SD v1.x (v1.4, v1.5 and their fine-tunes)."""

    in_channels: int = 4                            # latent channels of the VAE
    out_channels: int = 4
    model_channels: int = 320                       # level i has model_channels * channel_mult[i] channels
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2                         # resnets per level going down (one more going up)
    attention_levels: tuple[int, ...] = (0, 1, 2)   # levels with transformers (the middle always has one)
    num_heads: int | tuple[int, ...] = 8            # number of heads, not head size; or one count per level
    transformer_depth: int = 1                      # transformer blocks per attention layer
    context_dim: int = 768                          # width of the CLIP ViT-L/14 text encoder
    linear_projection: bool = False                 # linear proj_in/proj_out (SD 2.x) instead of 1x1 convs
    upcast_attention: bool = False                  # attention in float32 (SD 2.1 overflows in float16)
    norm_groups: int = 32
    norm_eps: float = 1e-5
    dropout: float = 0.0                            # inside the resnet blocks; for training
    sample_size: int | tuple[int, int] | None = 64  # default latent size (pipelines derive the image size)

    def __post_init__(self):
        levels = len(self.channel_mult)
        sizes = {"in_channels": self.in_channels, "out_channels": self.out_channels,
                 "model_channels": self.model_channels, "num_res_blocks": self.num_res_blocks,
                 "transformer_depth": self.transformer_depth, "context_dim": self.context_dim,
                 "norm_groups": self.norm_groups}
        for name, value in sizes.items():
            if not isinstance(value, int) or value < 1:
                raise UserError(f"{name} must be a positive integer, got {value!r}")
        for name in ("channel_mult", "attention_levels", "num_heads"):
            if isinstance(getattr(self, name), list):
                raise UserError(f"{name} must be a tuple, not a list (from_dict converts JSON lists)")
        if levels == 0 or any(not isinstance(m, int) or m < 1 for m in self.channel_mult):
            raise UserError(f"channel_mult must be a non-empty tuple of positive integers, "
                            f"got {self.channel_mult}")
        if list(self.attention_levels) != sorted(set(self.attention_levels)) or \
                any(level not in range(levels) for level in self.attention_levels):
            raise UserError(f"attention_levels must be increasing level indices in range({levels}), "
                            f"got {self.attention_levels}")
        if isinstance(self.num_heads, tuple) and len(self.num_heads) != levels:
            raise UserError(f"num_heads must be one integer or one per level ({levels}), "
                            f"got {self.num_heads}")
        for level in range(levels):
            width, heads = self.channels(level), self.heads(level)
            if width % self.norm_groups:
                raise UserError(f"level {level} width {width} is not divisible by "
                                f"norm_groups={self.norm_groups}")
            if (level in self.attention_levels or level == levels - 1) and (heads < 1 or width % heads):
                raise UserError(f"level {level} width {width} is not divisible by its num_heads={heads}")
        if self.norm_eps <= 0 or not 0 <= self.dropout < 1:
            raise UserError(f"need norm_eps > 0 and 0 <= dropout < 1, got {self.norm_eps} and {self.dropout}")

    def channels(self, level: int) -> int:
        """Feature channels at resolution `level` (0 is the full latent resolution)."""
        return self.model_channels * self.channel_mult[level]

    def heads(self, level: int) -> int:
        """Attention heads at `level` (the middle block uses the last level's count)."""
        return self.num_heads[level] if isinstance(self.num_heads, tuple) else self.num_heads

    @classmethod
    def from_diffusers_config(cls, config: Mapping) -> "SDUNetConfig":
        """Read diffusers' `unet/config.json` (a dict); options outside SD v1.x/2.x raise a UserError."""
        values = read_diffusers_config(config, _CLASS_NAME, _DIFFUSERS_READ, _DIFFUSERS_FIXED)
        widths, down_types = values["block_out_channels"], values["down_block_types"]
        if len(down_types) != len(widths) or any(t not in _DOWN_TYPES.values() for t in down_types):
            raise UserError(f"down_block_types must be {len(widths)} of {sorted(_DOWN_TYPES.values())}, "
                            f"got {down_types}")
        attention = [t == _DOWN_TYPES[True] for t in down_types]
        expected_up = tuple(_UP_TYPES[a] for a in reversed(attention))
        if values["up_block_types"] != expected_up:
            raise UserError(f"up_block_types {values['up_block_types']} do not mirror down_block_types "
                            f"(expected {expected_up})")
        if any(w % widths[0] for w in widths):
            raise UserError(f"block_out_channels {widths} must be multiples of the first")
        heads = values["attention_head_dim"]    # diffusers keeps SD v1.x/2.x's head *count* under this name
        if isinstance(heads, tuple) and len(set(heads)) == 1:
            heads = heads[0]
        return cls(
            in_channels=values["in_channels"], out_channels=values["out_channels"], model_channels=widths[0],
            channel_mult=tuple(w // widths[0] for w in widths),
            num_res_blocks=_one_value("layers_per_block", values["layers_per_block"]),
            attention_levels=tuple(level for level, a in enumerate(attention) if a), num_heads=heads,
            transformer_depth=_one_value("transformer_layers_per_block",
                                         values["transformer_layers_per_block"]),
            context_dim=_one_value("cross_attention_dim", values["cross_attention_dim"]),
            linear_projection=values["use_linear_projection"], upcast_attention=values["upcast_attention"],
            norm_groups=values["norm_num_groups"], norm_eps=values["norm_eps"], dropout=values["dropout"],
            sample_size=values["sample_size"])

    def to_diffusers_config(self) -> dict:
        """Return diffusers' `unet/config.json` contents for this config (JSON-ready)."""
        attention = [level in self.attention_levels for level in range(len(self.channel_mult))]
        return {
            "_class_name": _CLASS_NAME, **_DIFFUSERS_FIXED,
            "sample_size": _json_ready(self.sample_size),
            "in_channels": self.in_channels, "out_channels": self.out_channels,
            "down_block_types": [_DOWN_TYPES[a] for a in attention],
            "up_block_types": [_UP_TYPES[a] for a in reversed(attention)],
            "block_out_channels": [self.channels(level) for level in range(len(self.channel_mult))],
            "layers_per_block": self.num_res_blocks, "dropout": self.dropout,
            "norm_num_groups": self.norm_groups, "norm_eps": self.norm_eps,
            "cross_attention_dim": self.context_dim, "transformer_layers_per_block": self.transformer_depth,
            "attention_head_dim": _json_ready(self.num_heads),
            "use_linear_projection": self.linear_projection, "upcast_attention": self.upcast_attention,
        }


def _json_ready(value):
    return list(value) if isinstance(value, tuple) else value


def _one_value(name: str, value):
    """Return `value`, or its single value when diffusers gives one per level; per-level variation fails."""
    if not isinstance(value, tuple):
        return value
    if len(set(value)) != 1:
        raise UserError(f"a different {name} per level ({value}) is not supported")
    return value[0]


SD15_UNET = SDUNetConfig()
TINY_UNET = SDUNetConfig(model_channels=32, channel_mult=(1, 2), attention_levels=(1,), num_heads=2,
                         context_dim=32, norm_groups=8, sample_size=8)
# SD 2.x: 64-wide heads (so 5, 10, 20, 20 of them), linear projections, OpenCLIP ViT-H/14's 1024-wide text.
# The 512-base models (SD-Turbo too) and the 768-v ones, whose config also upcasts attention (SD 2.1).
SD2_UNET = SDUNetConfig(num_heads=(5, 10, 20, 20), context_dim=1024, linear_projection=True)
SD2_V_UNET = SDUNetConfig(num_heads=(5, 10, 20, 20), context_dim=1024, linear_projection=True,
                          upcast_attention=True, sample_size=96)
# A tiny SD 2.x-style UNet: attention but at the last level, 64-wide heads per level, linear projections.
TINY_SD2_UNET = SDUNetConfig(model_channels=64, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0,),
                             num_heads=(1, 2), context_dim=64, linear_projection=True, sample_size=8)


def _resnet(config: SDUNetConfig, in_channels: int, out_channels: int) -> ResnetBlock:
    return ResnetBlock(in_channels, out_channels, temb_channels=4 * config.model_channels,
                       norm_groups=config.norm_groups, eps=config.norm_eps, dropout=config.dropout)


def _transformer(config: SDUNetConfig, level: int) -> SpatialTransformer:
    return SpatialTransformer(config.channels(level), config.heads(level), config.context_dim,
                              depth=config.transformer_depth, norm_groups=config.norm_groups,
                              linear_projection=config.linear_projection,
                              upcast_attention=config.upcast_attention)


class TimestepEmbedding(nn.Module):
    """MLP on the sinusoidal timestep features: linear, SiLU, linear."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, out_features)
        self.linear_2 = nn.Linear(out_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class DownBlock(nn.Module):
    """One level going down: resnets (each then a transformer at attention levels) and a stride-2 conv.

    Every output on the way is pushed onto `skips` for the matching up block.
    """

    def __init__(self, in_channels: int, config: SDUNetConfig, level: int, *, add_downsample: bool):
        super().__init__()
        width, count = config.channels(level), config.num_res_blocks
        self.resnets = nn.ModuleList(_resnet(config, in_channels if j == 0 else width, width)
                                     for j in range(count))
        has_attention = level in config.attention_levels
        self.attentions = (nn.ModuleList(_transformer(config, level) for _ in range(count))
                           if has_attention else None)
        self.downsamplers = nn.ModuleList([Downsample(width)]) if add_downsample else None

    def forward(self, h: torch.Tensor, temb: torch.Tensor, context: torch.Tensor,
                skips: list[torch.Tensor]) -> torch.Tensor:
        for j, resnet in enumerate(self.resnets):
            h = resnet(h, temb)
            if self.attentions is not None:
                h = self.attentions[j](h, context)
            skips.append(h)
        if self.downsamplers is not None:
            h = self.downsamplers[0](h)
            skips.append(h)
        return h


class MidBlock(nn.Module):
    """The lowest resolution: resnet, transformer, resnet."""

    def __init__(self, config: SDUNetConfig):
        super().__init__()
        last = len(config.channel_mult) - 1
        width = config.channels(last)
        self.resnets = nn.ModuleList([_resnet(config, width, width), _resnet(config, width, width)])
        self.attentions = nn.ModuleList([_transformer(config, last)])

    def forward(self, h: torch.Tensor, temb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        h = self.resnets[0](h, temb)
        h = self.attentions[0](h, context)
        return self.resnets[1](h, temb)


class UpBlock(nn.Module):
    """One level going up: resnets on [h, skip] (each then a transformer at attention levels), popping the
    skips, and nearest upsampling to the next skip's size plus a conv.
    """

    def __init__(self, in_channels: int, skip_channels: list[int], config: SDUNetConfig, level: int, *,
                 add_upsample: bool):
        super().__init__()
        width = config.channels(level)
        # skips are consumed last-in first-out, so resnet j sees skip_channels[-1 - j]
        self.resnets = nn.ModuleList(
            _resnet(config, (in_channels if j == 0 else width) + skip, width)
            for j, skip in enumerate(reversed(skip_channels)))
        has_attention = level in config.attention_levels
        self.attentions = nn.ModuleList(
            _transformer(config, level) for _ in skip_channels) if has_attention else None
        self.upsamplers = nn.ModuleList([Upsample(width)]) if add_upsample else None

    def forward(self, h: torch.Tensor, temb: torch.Tensor, context: torch.Tensor,
                skips: list[torch.Tensor]) -> torch.Tensor:
        for j, resnet in enumerate(self.resnets):
            h = resnet(torch.cat([h, skips.pop()], dim=1), temb)
            if self.attentions is not None:
                h = self.attentions[j](h, context)
        if self.upsamplers is not None:
            # the next skip has the target size; plain 2x would overshoot when a latent side was odd
            h = self.upsamplers[0](h, size=skips[-1].shape[-2:])
        return h


def build_down_blocks(config: SDUNetConfig) -> tuple[nn.ModuleList, list[int]]:
    """The encoder's down blocks, and the channels of every skip connection they (and conv_in) leave."""
    levels = len(config.channel_mult)
    blocks, skip_channels = nn.ModuleList(), [config.model_channels]
    for level in range(levels):
        add_downsample = level < levels - 1
        blocks.append(DownBlock(skip_channels[-1], config, level, add_downsample=add_downsample))
        skip_channels += [config.channels(level)] * (config.num_res_blocks + add_downsample)
    return blocks, skip_channels


class SDUNet(nn.Module):
    """`SDUNet(config)(x, t, context)` predicts the noise eps of latents `x` (B, C, h, w) at timesteps `t`
    ((B,) or scalar, float) given text embeddings `context` (B, L, context_dim).

    A ControlNet's outputs (Zhang et al. 2023, eq. 4) are added to the skip connections (`down_residuals`,
    one per skip) and to the middle block's output (`mid_residual`), as diffusers' UNet2DConditionModel does.
    """

    def __init__(self, config: SDUNetConfig):
        super().__init__()
        self.config = config
        levels = len(config.channel_mult)
        self.conv_in = nn.Conv2d(config.in_channels, config.model_channels, 3, padding=1)
        self.time_embedding = TimestepEmbedding(config.model_channels, 4 * config.model_channels)

        self.down_blocks, skip_channels = build_down_blocks(config)
        channels = skip_channels[-1]
        self.mid_block = MidBlock(config)
        self.up_blocks = nn.ModuleList()
        for level in reversed(range(levels)):
            count = config.num_res_blocks + 1
            block_skips, skip_channels = skip_channels[-count:], skip_channels[:-count]
            self.up_blocks.append(UpBlock(channels, block_skips, config, level, add_upsample=level > 0))
            channels = config.channels(level)
        self.conv_norm_out = nn.GroupNorm(config.norm_groups, config.model_channels, eps=config.norm_eps)
        self.conv_out = nn.Conv2d(config.model_channels, config.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, context: torch.Tensor,
                down_residuals: Sequence[torch.Tensor] | None = None,
                mid_residual: torch.Tensor | None = None) -> torch.Tensor:
        temb = embed_inputs(self.config, self.time_embedding, x, t, context)
        h = self.conv_in(x)
        skips = [h]
        for block in self.down_blocks:
            h = block(h, temb, context, skips)
        if down_residuals is not None:          # a ControlNet's residuals join the skip connections
            if len(down_residuals) != len(skips):
                raise ValueError(f"down_residuals must hold one tensor per skip connection ({len(skips)}), "
                                 f"got {len(down_residuals)}")
            skips = [skip + residual for skip, residual in zip(skips, down_residuals)]
        h = self.mid_block(h, temb, context)
        if mid_residual is not None:
            h = h + mid_residual
        for block in self.up_blocks:
            h = block(h, temb, context, skips)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


def embed_inputs(config: SDUNetConfig, time_embedding: TimestepEmbedding, x: torch.Tensor,
                 t: torch.Tensor | float, context: torch.Tensor) -> torch.Tensor:
    """Check the shapes of a UNet (or ControlNet) input and return the SiLU-activated timestep embedding
    (B, 4*model_channels) of `t` ((B,) or scalar)."""
    batch = x.shape[0]
    if x.ndim != 4 or x.shape[1] != config.in_channels:
        raise ValueError(f"x must have shape (B, {config.in_channels}, h, w), got {tuple(x.shape)}")
    if context.ndim != 3 or context.shape[0] != batch or context.shape[2] != config.context_dim:
        raise ValueError(f"context must have shape ({batch}, L, {config.context_dim}), "
                         f"got {tuple(context.shape)}")
    t = torch.as_tensor(t, device=x.device)
    if t.ndim > 1 or t.numel() not in (1, batch):
        raise ValueError(f"t must be a scalar or have shape ({batch},), got {tuple(t.shape)}")
    features = timestep_embedding(t.expand(batch), config.model_channels, cos_first=True,
                                  freq_shift=0)                             # (B, model_channels)
    # every resnet applies SiLU to the embedding before its projection: done once here
    return F.silu(time_embedding(features.to(x.dtype)))                    # (B, 4*model_channels)
