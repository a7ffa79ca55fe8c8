"""Pixel-space UNet for DDPM (Ho et al. 2020), optionally class-conditional for classifier-free guidance.

`DDPMUNet(config)(x, t, class_labels=None)` returns a prediction shaped like `x`. Two architectures:
- "resnet" (default): DDPM / improved-DDPM UNet of ResNet blocks, self-attention at chosen levels and in the
  middle, concatenated skips. Module names follow diffusers' `UNet2DModel` (`down_blocks.1.resnets.0.conv1`).
- "tutorial": the small LayerNorm UNet of the classic Fashion-MNIST tutorial (`tutorial_unet.py`), for
  comparison only.
"""

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanodiffusion.config import JSONConfig
from nanodiffusion.errors import UserError
from nanodiffusion.nets.blocks import NORM_EPS, AttentionBlock, Downsample, ResnetBlock, Upsample
from nanodiffusion.nets.embeddings import timestep_embedding
from nanodiffusion.nets.tutorial_unet import TutorialUNet, tutorial_sizes

ARCHITECTURES = ("resnet", "tutorial")


@dataclass(frozen=True)
class DDPMUNetConfig(JSONConfig):
    """Hyper-parameters of `DDPMUNet`; `to_dict()` / `from_dict()` convert to and from JSON-safe dicts.

    Arch "tutorial" has no attention, dropout or classes; it ignores num_heads, norm_groups and
    use_scale_shift_norm.
    """

    arch: str = "resnet"                       # "resnet" or "tutorial"
    in_channels: int = 1
    out_channels: int = 1
    image_size: int = 28                       # side of the training images; "tutorial" runs only at it
    model_channels: int = 32                   # width of level 0; level i is model_channels * channel_mult[i]
    channel_mult: tuple[int, ...] = (1, 2, 2)  # one entry per resolution level (28, 14, 7 for 28×28 inputs)
    num_res_blocks: int = 2                    # blocks per level going down (resnet: one more going up)
    attention_levels: tuple[int, ...] = (2,)   # levels with self-attention (0: full size); + the middle
    num_heads: int = 4                         # number of heads, not head size
    norm_groups: int = 8                       # GroupNorm groups; every level width must be divisible by it
    time_embed_dim: int = 128                  # resnet: width of the shared time(+class) embedding;
                                               # tutorial: width of the sinusoid fed to each stage's MLP
    use_scale_shift_norm: bool = True          # resnet: AdaGN (scale, shift) instead of adding emb
    dropout: float = 0.0                       # costs ~20% of a CPU training step (slow bernoulli_)
    num_classes: int | None = 10               # None: unconditional; else num_classes + 1 rows, the last null

    def __post_init__(self):
        for name in ("in_channels", "out_channels", "image_size", "model_channels", "num_res_blocks",
                     "num_heads", "norm_groups", "time_embed_dim"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise UserError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("channel_mult", "attention_levels"):
            value = getattr(self, name)
            if not isinstance(value, tuple) or not all(isinstance(v, int) for v in value):
                raise UserError(f"{name} must be a tuple of integers, got {value!r}")
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise UserError(f"channel_mult must be non-empty and positive, got {self.channel_mult}")
        if self.num_classes is not None and (not isinstance(self.num_classes, int) or self.num_classes < 1):
            raise UserError(f"num_classes must be None or a positive integer, got {self.num_classes!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.arch == "resnet":
            self._check_resnet()
        elif self.arch == "tutorial":
            self._check_tutorial()
        else:
            raise UserError(f"unknown arch {self.arch!r}; valid: {', '.join(ARCHITECTURES)}")

    def _check_resnet(self):
        levels = len(self.channel_mult)
        bad_levels = sorted(set(a for a in self.attention_levels if not 0 <= a < levels))
        if bad_levels or len(set(self.attention_levels)) != len(self.attention_levels):
            raise UserError(f"attention_levels must be distinct levels in 0..{levels - 1} (one per "
                            f"channel_mult entry), got {self.attention_levels}")
        widths = [self.model_channels * m for m in self.channel_mult]
        if any(w % self.norm_groups for w in widths):
            raise UserError(f"every level width {widths} (model_channels * channel_mult) must be divisible "
                            f"by norm_groups={self.norm_groups}")
        attended = [widths[a] for a in self.attention_levels] + [widths[-1]]   # the middle block attends too
        if any(w % self.num_heads for w in attended):
            raise UserError(f"the widths with attention {sorted(set(attended))} must be divisible by "
                            f"num_heads={self.num_heads}")

    def _check_tutorial(self):
        problems = [
            (self.num_classes is not None, "num_classes must be None (no class conditioning)"),
            (self.attention_levels != (), "attention_levels must be () (no attention)"),
            (self.dropout != 0, "dropout must be 0 (no dropout)"),
            (self.num_res_blocks < 2,
             "num_res_blocks must be at least 2 (a stage ends at the next level's width)"),
            (self.model_channels * self.channel_mult[-1] % 2 == 1,
             "model_channels * channel_mult[-1] must be even (the bottleneck halves it)"),
        ]
        for failed, message in problems:
            if failed:
                raise UserError(f"arch 'tutorial' is kept for comparison only: {message}; "
                                f"start from TUTORIAL_UNET")
        sizes = tutorial_sizes(self.image_size, len(self.channel_mult))
        if sizes[-1] < 1:
            raise UserError(f"image_size {self.image_size} is too small for {len(self.channel_mult)} levels "
                            f"of arch 'tutorial' (level sides would be {sizes})")


# Fashion-MNIST, class-conditional: 1.74M parameters (7 MB in fp32), the fastest of the candidates measured
# for a 2-core CPU training step (batch 128, bf16 autocast), where the 28×28 convolutions dominate the cost.
DEFAULT_UNET = DDPMUNetConfig()
TUTORIAL_UNET = DDPMUNetConfig(arch="tutorial", model_channels=10, channel_mult=(1, 2, 4), num_res_blocks=3,
                               attention_levels=(), time_embed_dim=100, dropout=0.0, num_classes=None)
TINY_UNET = DDPMUNetConfig(image_size=16, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                           attention_levels=(1,), num_heads=2, norm_groups=8, time_embed_dim=32,
                           dropout=0.0, num_classes=3)
UNET_PRESETS = {"tutorial": TUTORIAL_UNET, "default": DEFAULT_UNET, "tiny": TINY_UNET}


class DownBlock(nn.Module):
    """One level going down: ResNet blocks (each followed by attention if any), then an optional downsample.

    Returns the output and every intermediate map, which the up path concatenates back in reverse order.
    """

    def __init__(self, in_channels: int, out_channels: int, config: DDPMUNetConfig, *, attention: bool,
                 downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            _resnet(in_channels if i == 0 else out_channels, out_channels, config)
            for i in range(config.num_res_blocks))
        self.attentions = nn.ModuleList(
            AttentionBlock(out_channels, config.num_heads, norm_groups=config.norm_groups)
            for _ in range(config.num_res_blocks if attention else 0))
        self.downsamplers = nn.ModuleList([Downsample(out_channels)] if downsample else [])

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        for i, resnet in enumerate(self.resnets):
            h = resnet(h, emb)
            if self.attentions:
                h = self.attentions[i](h)
            skips.append(h)
        for downsample in self.downsamplers:
            h = downsample(h)
            skips.append(h)
        return h, skips


class MidBlock(nn.Module):
    """ResNet block → self-attention → ResNet block at the lowest resolution."""

    def __init__(self, channels: int, config: DDPMUNetConfig):
        super().__init__()
        self.resnets = nn.ModuleList(_resnet(channels, channels, config) for _ in range(2))
        self.attentions = nn.ModuleList([AttentionBlock(channels, config.num_heads,
                                                        norm_groups=config.norm_groups)])

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](h, emb)), emb)


class UpBlock(nn.Module):
    """One level going up: ResNet blocks on [h, skip] concatenations (+ attention), then an optional upsample.

    `skip_channels[i]` is the width of the skip that block i consumes (the down path's maps, last one first).
    """

    def __init__(self, in_channels: int, out_channels: int, skip_channels: list[int], config: DDPMUNetConfig,
                 *, attention: bool, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            _resnet((in_channels if i == 0 else out_channels) + skip, out_channels, config)
            for i, skip in enumerate(skip_channels))
        self.attentions = nn.ModuleList(
            AttentionBlock(out_channels, config.num_heads, norm_groups=config.norm_groups)
            for _ in range(len(skip_channels) if attention else 0))
        self.upsamplers = nn.ModuleList([Upsample(out_channels)] if upsample else [])

    def forward(self, h: torch.Tensor, emb: torch.Tensor, skips: list[torch.Tensor],
                size: tuple[int, int] | None) -> torch.Tensor:
        """`skips` in the order they were produced (consumed last first); `size` is the upsampled side."""
        for i, resnet in enumerate(self.resnets):
            h = resnet(torch.cat([h, skips[-1 - i]], dim=1), emb)
            if self.attentions:
                h = self.attentions[i](h)
        for upsample in self.upsamplers:
            h = upsample(h, size)
        return h


def _resnet(in_channels: int, out_channels: int, config: DDPMUNetConfig) -> ResnetBlock:
    return ResnetBlock(in_channels, out_channels, config.time_embed_dim, norm_groups=config.norm_groups,
                       dropout=config.dropout, scale_shift=config.use_scale_shift_norm)


class DDPMUNet(nn.Module):
    """UNet: (x, t, class_labels) → a prediction shaped like x (Ho et al. 2020; Dhariwal & Nichol 2021).

    Class conditioning adds an embedding to the time embedding; row `null_class` (= num_classes) is the
    "no class" row that classifier-free guidance trains and samples with (Ho & Salimans 2022). With arch
    "tutorial" the whole network is the submodule `tutorial` (keys `tutorial.down_stages.0...`).
    """

    def __init__(self, config: DDPMUNetConfig):
        super().__init__()
        self.config = config
        if config.arch == "tutorial":
            self.tutorial = TutorialUNet(config)
            return
        widths = [config.model_channels * m for m in config.channel_mult]
        levels = len(widths)
        self.conv_in = nn.Conv2d(config.in_channels, widths[0], 3, padding=1)
        self.time_embedding = nn.Sequential(OrderedDict(
            linear_1=nn.Linear(config.model_channels, config.time_embed_dim), act=nn.SiLU(),
            linear_2=nn.Linear(config.time_embed_dim, config.time_embed_dim)))
        self.class_embedding = (nn.Embedding(config.num_classes + 1, config.time_embed_dim)
                                if config.num_classes is not None else None)

        self.down_blocks = nn.ModuleList()
        skip_channels = [widths[0]]                         # widths of the maps the up path concatenates
        for level, width in enumerate(widths):
            previous, last = widths[max(level - 1, 0)], level == levels - 1
            attention = level in config.attention_levels
            self.down_blocks.append(DownBlock(previous, width, config, attention=attention,
                                              downsample=not last))
            skip_channels += [width] * (config.num_res_blocks + (0 if last else 1))
        self.mid_block = MidBlock(widths[-1], config)

        self.up_blocks = nn.ModuleList()
        for level in reversed(range(levels)):
            count = config.num_res_blocks + 1
            skips, skip_channels = skip_channels[-count:], skip_channels[:-count]
            below = widths[min(level + 1, levels - 1)]      # width of what comes up: mid block or level + 1
            self.up_blocks.append(UpBlock(below, widths[level], skips[::-1], config,
                                          attention=level in config.attention_levels, upsample=level > 0))

        self.conv_norm_out = nn.GroupNorm(config.norm_groups, widths[0], eps=NORM_EPS)
        self.conv_out = nn.Conv2d(widths[0], config.out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)                # the untrained net predicts 0: a stable start
        nn.init.zeros_(self.conv_out.bias)

    @property
    def null_class(self) -> int | None:
        """Class index meaning "no class" (for classifier-free guidance); None for an unconditional net."""
        return self.config.num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor | float,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """`x` (B, C, H, W), `t` float (B,) or scalar, `class_labels` int64 (B,) or None (the null class)."""
        t = _broadcast_timesteps(t, x)
        if self.config.arch == "tutorial":
            if class_labels is not None:
                raise UserError("arch 'tutorial' has no class conditioning; pass class_labels=None")
            if x.shape[-2:] != (self.config.image_size,) * 2:
                raise UserError(f"arch 'tutorial' only runs at its image_size {self.config.image_size}, "
                                f"got a {tuple(x.shape[-2:])} input")
            return self.tutorial(x, t)

        emb = self.time_embedding(timestep_embedding(t, self.config.model_channels))   # (B, time_embed_dim)
        if self.class_embedding is not None:
            emb = emb + self.class_embedding(self._check_labels(class_labels, x))
        elif class_labels is not None:
            raise UserError("this UNet is unconditional (num_classes=None); pass class_labels=None")
        emb = F.silu(emb)                                   # every ResNet block projects SiLU(emb)

        h = self.conv_in(x)
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, emb)
            skips += block_skips
        h = self.mid_block(h, emb)
        for block in self.up_blocks:
            count = len(block.resnets)
            block_skips, skips = skips[-count:], skips[:-count]
            h = block(h, emb, block_skips, skips[-1].shape[-2:] if skips else None)
        return self.conv_out(F.silu(self.conv_norm_out(h)))

    def _check_labels(self, class_labels: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        """(B,) int64 labels in [0, num_classes]; None becomes the null class for the whole batch."""
        if class_labels is None:
            return torch.full((x.shape[0],), self.null_class, dtype=torch.long, device=x.device)
        if class_labels.shape != (x.shape[0],) or class_labels.dtype != torch.long:
            raise UserError(f"class_labels must be int64 of shape ({x.shape[0]},), "
                            f"got {class_labels.dtype} {tuple(class_labels.shape)}")
        if torch.compiler.is_compiling() or not class_labels.numel():   # the check would break the graph
            return class_labels
        low, high = int(class_labels.min()), int(class_labels.max())
        if low < 0 or high > self.null_class:
            raise UserError(f"class_labels must be in 0..{self.null_class} ({self.null_class} is the null "
                            f"class), got {low}..{high}")
        return class_labels


def _broadcast_timesteps(t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """Timesteps as a (B,) tensor: a scalar is broadcast to the batch of `x`."""
    t = torch.as_tensor(t, device=x.device)
    if t.ndim == 0:
        return t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise UserError(f"t must be a scalar or of shape ({x.shape[0]},), got {tuple(t.shape)}")
    return t
