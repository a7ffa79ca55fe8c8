"""The Stable Diffusion autoencoder (AutoencoderKL; Rombach et al. 2022, §3 and appendix G).

It maps images (B, 3, H, W) in [-1, 1] to a diagonal Gaussian over latents (B, 4, H/8, W/8) and back. The
`scaling_factor` that brings latents to unit variance is stored in the config and applied by the pipeline,
not here. Submodule names mirror diffusers' `AutoencoderKL`, so a diffusers `vae/` folder loads strictly.
"""

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanodiffusion.config import JSONConfig
from nanodiffusion.errors import UserError
from nanodiffusion.nets.sd_blocks import (ResnetBlock, Upsample, attention,
                                          read_diffusers_config)

_CLASS_NAME = "AutoencoderKL"
_EPS = 1e-6     # GroupNorm epsilon of every VAE norm, fixed in the original (ldm) and diffusers code
# Options of diffusers' AutoencoderKL read into VAEConfig, with diffusers' defaults (which fill keys that
# a config.json leaves out; they are not SD's values).
_DIFFUSERS_READ = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ("DownEncoderBlock2D",),
    "up_block_types": ("UpDecoderBlock2D",), "block_out_channels": (64,), "layers_per_block": 1,
    "latent_channels": 4, "norm_num_groups": 32, "sample_size": 32, "scaling_factor": 0.18215,
    "force_upcast": True,
}
# Options that the SD v1.x/2.x VAEs leave at one value: the only one implemented here.
_DIFFUSERS_FIXED = {
    "act_fn": "silu", "shift_factor": None, "latents_mean": None, "latents_std": None,
    "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True,
}


@dataclass(frozen=True)
class VAEConfig(JSONConfig):
    """Shape of the SD autoencoder; the defaults are the SD v1.x/2.x VAE (8x smaller, 4 latent channels)."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_channels: tuple[int, ...] = (128, 256, 512, 512)   # encoder widths per level (decoder reversed)
    layers_per_block: int = 2                                # encoder resnets per level (decoder: one more)
    norm_groups: int = 32
    scaling_factor: float = 0.18215     # latents * scaling_factor have about unit variance (pipeline's job)
    sample_size: int = 512              # image size the VAE was trained at
    force_upcast: bool = True           # overflows in float16: pipelines should run it in float32

    def __post_init__(self):
        sizes = {"in_channels": self.in_channels, "out_channels": self.out_channels,
                 "latent_channels": self.latent_channels, "layers_per_block": self.layers_per_block,
                 "norm_groups": self.norm_groups}
        for name, value in sizes.items():
            if not isinstance(value, int) or value < 1:
                raise UserError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.block_channels, tuple):
            raise UserError("block_channels must be a tuple, not a list (from_dict converts JSON lists)")
        if not self.block_channels or any(c < 1 or c % self.norm_groups for c in self.block_channels):
            raise UserError(f"block_channels must be a non-empty tuple of multiples of "
                            f"norm_groups={self.norm_groups}, got {self.block_channels}")
        if self.scaling_factor <= 0:
            raise UserError(f"scaling_factor must be positive, got {self.scaling_factor}")

    @property
    def downsample_factor(self) -> int:
        """Image pixels per latent pixel along each side (8 for SD)."""
        return 2 ** (len(self.block_channels) - 1)

    @classmethod
    def from_diffusers_config(cls, config: Mapping) -> "VAEConfig":
        """Read diffusers' `vae/config.json` (a dict); options outside the SD VAE raise a UserError."""
        values = read_diffusers_config(config, _CLASS_NAME, _DIFFUSERS_READ, _DIFFUSERS_FIXED)
        levels = len(values["block_out_channels"])
        for key, block_type in (("down_block_types", "DownEncoderBlock2D"),
                                ("up_block_types", "UpDecoderBlock2D")):
            if values[key] != (block_type,) * levels:
                raise UserError(f"{key} must be {levels} x {block_type!r}, got {values[key]}")
        return cls(in_channels=values["in_channels"], out_channels=values["out_channels"],
                   latent_channels=values["latent_channels"], block_channels=values["block_out_channels"],
                   layers_per_block=values["layers_per_block"], norm_groups=values["norm_num_groups"],
                   scaling_factor=values["scaling_factor"], sample_size=values["sample_size"],
                   force_upcast=values["force_upcast"])

    def to_diffusers_config(self) -> dict:
        """Return diffusers' `vae/config.json` contents for this config (JSON-ready)."""
        levels = len(self.block_channels)
        return {
            "_class_name": _CLASS_NAME, **_DIFFUSERS_FIXED,
            "in_channels": self.in_channels, "out_channels": self.out_channels,
            "down_block_types": ["DownEncoderBlock2D"] * levels,
            "up_block_types": ["UpDecoderBlock2D"] * levels,
            "block_out_channels": list(self.block_channels), "layers_per_block": self.layers_per_block,
            "latent_channels": self.latent_channels, "norm_num_groups": self.norm_groups,
            "sample_size": self.sample_size, "scaling_factor": self.scaling_factor,
            "force_upcast": self.force_upcast,
        }


SD15_VAE = VAEConfig()
TINY_VAE = VAEConfig(block_channels=(16, 32), layers_per_block=1, norm_groups=8, sample_size=32)


class DiagonalGaussian:
    """The encoder's posterior N(mean, exp(logvar)) per latent element (Kingma & Welling 2014)."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)                       # (B, C, h, w) each
        self.logvar = logvar.clamp(-30.0, 20.0)                           # as SD does, keeps exp() finite
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw mean + std * noise (the reparametrisation trick)."""
        noise = torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype,
                            device=self.mean.device)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        """The most likely latents: the mean."""
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL divergence to N(0, I), summed over each sample's elements: shape (B,)."""
        return 0.5 * (self.mean.square() + self.logvar.exp() - 1.0 - self.logvar).sum(dim=(1, 2, 3))


def _resnet(config: VAEConfig, in_channels: int, out_channels: int) -> ResnetBlock:
    return ResnetBlock(in_channels, out_channels, temb_channels=None, norm_groups=config.norm_groups,
                       eps=_EPS)


class PaddedDownsample(nn.Module):
    """Halve the resolution with a stride-2 3x3 conv after padding only the right and bottom edges.

    A quirk of the original SD VAE (CompVis' ldm) that its weights depend on; a side n becomes n // 2.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class SelfAttention2d(nn.Module):
    """Single-head self-attention over the H*W positions of a feature map, with a residual."""

    def __init__(self, channels: int, norm_groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(norm_groups, channels, eps=_EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])     # `to_out.0` in the checkpoints

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        # (B, H*W, C): a free view when x is channels_last, one copy otherwise
        h = self.group_norm(x).permute(0, 2, 3, 1).reshape(batch, height * width, channels)
        h = self.to_out[0](attention(self.to_q(h), self.to_k(h), self.to_v(h), num_heads=1))
        return x + h.reshape(batch, height, width, channels).permute(0, 3, 1, 2)  # (B, C, H, W), NHWC strides


class MidBlock(nn.Module):
    """The lowest resolution of encoder and decoder: resnet, self-attention, resnet."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        width = config.block_channels[-1]
        self.resnets = nn.ModuleList([_resnet(config, width, width), _resnet(config, width, width)])
        self.attentions = nn.ModuleList([SelfAttention2d(width, config.norm_groups)])

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](h)))


class EncoderBlock(nn.Module):
    """Resnets at one resolution, then an optional stride-2 conv."""

    def __init__(self, config: VAEConfig, in_channels: int, out_channels: int, *, add_downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(_resnet(config, in_channels if j == 0 else out_channels, out_channels)
                                     for j in range(config.layers_per_block))
        self.downsamplers = nn.ModuleList([PaddedDownsample(out_channels)]) if add_downsample else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            h = resnet(h)
        return h if self.downsamplers is None else self.downsamplers[0](h)


class DecoderBlock(nn.Module):
    """Resnets at one resolution, then an optional 2x nearest upsampling and conv."""

    def __init__(self, config: VAEConfig, in_channels: int, out_channels: int, *, add_upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(_resnet(config, in_channels if j == 0 else out_channels, out_channels)
                                     for j in range(config.layers_per_block + 1))
        self.upsamplers = nn.ModuleList([Upsample(out_channels)]) if add_upsample else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            h = resnet(h)
        if self.upsamplers is None:
            return h
        return self.upsamplers[0](h, size=(2 * h.shape[-2], 2 * h.shape[-1]))


class Encoder(nn.Module):
    """Images (B, in_channels, H, W) -> Gaussian moments (B, 2*latent_channels, H//f, W//f).

    f is `config.downsample_factor`.
    """

    def __init__(self, config: VAEConfig):
        super().__init__()
        widths, levels = config.block_channels, len(config.block_channels)
        self.conv_in = nn.Conv2d(config.in_channels, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            EncoderBlock(config, widths[max(level - 1, 0)], widths[level], add_downsample=level < levels - 1)
            for level in range(levels))
        self.mid_block = MidBlock(config)
        self.conv_norm_out = nn.GroupNorm(config.norm_groups, widths[-1], eps=_EPS)
        self.conv_out = nn.Conv2d(widths[-1], 2 * config.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for block in self.down_blocks:
            h = block(h)
        h = self.mid_block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class Decoder(nn.Module):
    """Latents (B, latent_channels, h, w) -> images (B, out_channels, h*f, w*f).

    f is `config.downsample_factor`.
    """

    def __init__(self, config: VAEConfig):
        super().__init__()
        widths, levels = config.block_channels[::-1], len(config.block_channels)   # lowest resolution first
        self.conv_in = nn.Conv2d(config.latent_channels, widths[0], 3, padding=1)
        self.mid_block = MidBlock(config)
        self.up_blocks = nn.ModuleList(
            DecoderBlock(config, widths[max(i - 1, 0)], widths[i], add_upsample=i < levels - 1)
            for i in range(levels))
        self.conv_norm_out = nn.GroupNorm(config.norm_groups, widths[-1], eps=_EPS)
        self.conv_out = nn.Conv2d(widths[-1], config.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class AutoencoderKL(nn.Module):
    """`encode(x)` gives the latent posterior of images in [-1, 1]; `decode(z)` maps latents back to images.

    Latents here are unscaled: the pipeline multiplies by `config.scaling_factor` after encoding and divides
    before decoding.
    """

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """Posterior over latents (B, latent_channels, H//f, W//f) of images x (B, in_channels, H, W)."""
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"images must have shape (B, {self.config.in_channels}, H, W), "
                             f"got {tuple(x.shape)}")
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images (B, out_channels, h*f, w*f), about in [-1, 1], from unscaled latents z (B, C, h, w)."""
        if z.ndim != 4 or z.shape[1] != self.config.latent_channels:
            raise ValueError(f"latents must have shape (B, {self.config.latent_channels}, h, w), "
                             f"got {tuple(z.shape)}")
        return self.decoder(self.post_quant_conv(z))
