"""TAESD, the tiny autoencoder distilled from Stable Diffusion's VAE (Ollin Boer Bohan 2023,
github.com/madebyollin/taesd).

Plain 3x3 convs and ReLU residual blocks, no attention and no norms: about 1.2 M parameters per side against
the VAE's 34 M / 49 M, so a 512² decode costs a small fraction of the VAE's. The encoder is deterministic (no
posterior to draw from) and maps images straight to SD's *scaled* latents, hence `scaling_factor` 1.0.
Submodule names mirror diffusers' `AutoencoderTiny` (`encoder.layers.1.conv.0.weight`: one `nn.Sequential`
per side, indexed as there), so a diffusers `AutoencoderTiny` folder loads with a strict `load_state_dict`.
"""

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn as nn

from nanodiffusion.config import JSONConfig
from nanodiffusion.errors import UserError
from nanodiffusion.nets.sd_blocks import read_diffusers_config

_CLASS_NAME = "AutoencoderTiny"
# Options of diffusers' AutoencoderTiny read into AutoencoderTinyConfig, with diffusers' defaults (TAESD's).
_DIFFUSERS_READ = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4,
    "encoder_block_out_channels": (64, 64, 64, 64), "decoder_block_out_channels": (64, 64, 64, 64),
    "num_encoder_blocks": (1, 3, 3, 3), "num_decoder_blocks": (3, 3, 3, 1),
    "upsampling_scaling_factor": 2, "latent_magnitude": 3, "latent_shift": 0.5, "scaling_factor": 1.0,
    # diffusers re-registers these two itself: a copy of the decoder widths, and force_upcast=False always
    "block_out_channels": None, "force_upcast": False,
}
# Options every released TAESD leaves at one value: the only one implemented here.
_DIFFUSERS_FIXED = {"act_fn": "relu", "upsample_fn": "nearest", "shift_factor": 0.0}


@dataclass(frozen=True)
class AutoencoderTinyConfig(JSONConfig):
    """Shape of the tiny autoencoder; the defaults are TAESD for SD v1.x/2.x (4 latent channels, 8x)."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    encoder_channels: int = 64                          # width of every encoder layer
    decoder_channels: int = 64                          # width of every decoder layer
    encoder_blocks: tuple[int, ...] = (1, 3, 3, 3)      # residual blocks per level; a stride-2 conv before
                                                        # each level but the first
    decoder_blocks: tuple[int, ...] = (3, 3, 3, 1)      # residual blocks per level; an upsampling after
                                                        # each level but the last
    upsampling_factor: int = 2                          # the decoder's nearest upsampling per level
    latent_magnitude: float = 3.0                       # latents in [-magnitude, magnitude] map to bytes
    latent_shift: float = 0.5                           # ... as x / (2·magnitude) + shift (8-bit storage)
    scaling_factor: float = 1.0                         # the encoder already gives SD's scaled latents

    def __post_init__(self):
        for name in ("in_channels", "out_channels", "latent_channels", "encoder_channels", "decoder_channels",
                     "upsampling_factor"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise UserError(f"{name} must be a positive integer, got {value!r}")
        for name in ("encoder_blocks", "decoder_blocks"):
            blocks = getattr(self, name)
            if not isinstance(blocks, tuple) or not blocks or any(not isinstance(n, int) or n < 0
                                                                   for n in blocks):
                raise UserError(f"{name} must be a non-empty tuple of block counts, got {blocks!r}")
        upsampling = self.upsampling_factor ** (len(self.decoder_blocks) - 1)
        if upsampling != self.downsample_factor:
            raise UserError(f"the decoder upsamples {upsampling}x but the encoder downsamples "
                            f"{self.downsample_factor}x")
        if self.scaling_factor <= 0:
            raise UserError(f"scaling_factor must be positive, got {self.scaling_factor}")

    @property
    def downsample_factor(self) -> int:
        """Image pixels per latent pixel along each side (8 for TAESD)."""
        return 2 ** (len(self.encoder_blocks) - 1)

    @classmethod
    def from_diffusers_config(cls, config: Mapping) -> "AutoencoderTinyConfig":
        """Read diffusers' AutoencoderTiny `config.json` (a dict); other options raise a UserError."""
        values = read_diffusers_config(config, _CLASS_NAME, _DIFFUSERS_READ, _DIFFUSERS_FIXED)
        widths = {}
        for side in ("encoder", "decoder"):
            channels, blocks = values[f"{side}_block_out_channels"], values[f"num_{side}_blocks"]
            # diffusers builds each level's first conv as width[i] -> width[i]: other lists cannot run
            if len(set(channels)) != 1 or len(channels) != len(blocks):
                raise UserError(f"{side}_block_out_channels must repeat one width once per level "
                                f"({len(blocks)}), got {channels}")
            widths[side] = channels[0]
        copy = values["block_out_channels"]
        if copy is not None and copy != values["decoder_block_out_channels"]:
            raise UserError(f"block_out_channels {copy} must equal decoder_block_out_channels "
                            f"{values['decoder_block_out_channels']}")
        return cls(in_channels=values["in_channels"], out_channels=values["out_channels"],
                   latent_channels=values["latent_channels"], encoder_channels=widths["encoder"],
                   decoder_channels=widths["decoder"], encoder_blocks=values["num_encoder_blocks"],
                   decoder_blocks=values["num_decoder_blocks"],
                   upsampling_factor=values["upsampling_scaling_factor"],
                   latent_magnitude=values["latent_magnitude"], latent_shift=values["latent_shift"],
                   scaling_factor=values["scaling_factor"])

    def to_diffusers_config(self) -> dict:
        """Return diffusers' AutoencoderTiny `config.json` contents for this config (JSON-ready)."""
        return {
            "_class_name": _CLASS_NAME, **_DIFFUSERS_FIXED,
            "in_channels": self.in_channels, "out_channels": self.out_channels,
            "latent_channels": self.latent_channels,
            "encoder_block_out_channels": [self.encoder_channels] * len(self.encoder_blocks),
            "decoder_block_out_channels": [self.decoder_channels] * len(self.decoder_blocks),
            "num_encoder_blocks": list(self.encoder_blocks), "num_decoder_blocks": list(self.decoder_blocks),
            "upsampling_scaling_factor": self.upsampling_factor, "latent_magnitude": self.latent_magnitude,
            "latent_shift": self.latent_shift, "scaling_factor": self.scaling_factor, "force_upcast": False,
        }


TAESD = AutoencoderTinyConfig()
TINY_TAESD = AutoencoderTinyConfig(encoder_channels=8, decoder_channels=8, encoder_blocks=(1, 1, 1, 1),
                                   decoder_blocks=(1, 1, 1, 1))


class TinyBlock(nn.Module):
    """ReLU(conv-ReLU-conv-ReLU-conv(x) + x): TAESD's residual block (`conv.0/2/4` in the checkpoints)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(channels, channels, 3, padding=1))
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.conv(x) + x)


class TinyEncoder(nn.Module):
    """Images in [0, 1] (B, 3, H, W) -> latents (B, latent_channels, H/8, W/8)."""

    def __init__(self, config: AutoencoderTinyConfig):
        super().__init__()
        width = config.encoder_channels
        layers: list[nn.Module] = []
        for level, count in enumerate(config.encoder_blocks):
            layers.append(nn.Conv2d(config.in_channels, width, 3, padding=1) if level == 0
                          else nn.Conv2d(width, width, 3, stride=2, padding=1, bias=False))
            layers += [TinyBlock(width) for _ in range(count)]
        layers.append(nn.Conv2d(width, config.latent_channels, 3, padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class TinyDecoder(nn.Module):
    """Latents (B, latent_channels, h, w) -> images in about [0, 1] (B, 3, 8h, 8w)."""

    def __init__(self, config: AutoencoderTinyConfig):
        super().__init__()
        width, last = config.decoder_channels, len(config.decoder_blocks) - 1
        # the parameter-free ReLU and Upsample entries keep their slots: checkpoint keys count them
        layers: list[nn.Module] = [nn.Conv2d(config.latent_channels, width, 3, padding=1), nn.ReLU()]
        for level, count in enumerate(config.decoder_blocks):
            layers += [TinyBlock(width) for _ in range(count)]
            if level < last:
                layers.append(nn.Upsample(scale_factor=config.upsampling_factor, mode="nearest"))
            layers.append(nn.Conv2d(width, config.out_channels if level == last else width, 3, padding=1,
                                    bias=level == last))
        self.layers = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = torch.tanh(z / 3) * 3                   # soft clamp to [-3, 3], the range TAESD was trained on
        return self.layers(z)


class AutoencoderTiny(nn.Module):
    """`encode(images)` gives latents, `decode(latents)` images; images are in [-1, 1] like AutoencoderKL's.

    The latents are SD's scaled ones (`config.scaling_factor` is 1), so this replaces the VAE in a pipeline.
    """

    def __init__(self, config: AutoencoderTinyConfig):
        super().__init__()
        self.config = config
        self.encoder = TinyEncoder(config)
        self.decoder = TinyDecoder(config)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, H/8, W/8) of images (B, 3, H, W) in [-1, 1]; deterministic."""
        return self.encoder((x + 1) / 2)            # TAESD works on [0, 1] images

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, 8h, 8w) in about [-1, 1] from latents (B, C, h, w)."""
        return self.decoder(z) * 2 - 1
