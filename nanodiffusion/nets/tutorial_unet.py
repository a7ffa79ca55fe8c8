"""The small UNet of the classic "DDPM on Fashion-MNIST" tutorial, kept to compare against the ResNet UNet.

Architecture of B. Pulfer, "Generating images with DDPM: a PyTorch implementation" (2022), written anew and
generalised from its fixed 28×28 / 10-20-40 layout to `DDPMUNetConfig` fields. Every level is a stage of
plain conv blocks (no residuals, no attention); each stage adds its own time-embedding MLP output to its
input.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanodiffusion.nets.embeddings import timestep_embedding

if TYPE_CHECKING:
    from nanodiffusion.nets.ddpm_unet import DDPMUNetConfig


def tutorial_sizes(image_size: int, num_levels: int) -> list[int]:
    """Side lengths of the levels and, last, of the bottleneck: 28 → [28, 14, 7, 3] for three levels.

    An even side halves; an odd one loses a pixel first (7 → 6 → 3), as the tutorial's extra 2×2 conv does.
    """
    sizes = [image_size]
    for _ in range(num_levels):
        sizes.append(sizes[-1] // 2)
    return sizes


class TutorialBlock(nn.Module):
    """LayerNorm over (C, H, W) → conv3×3 → SiLU → conv3×3 → SiLU; no residual connection."""

    def __init__(self, in_channels: int, out_channels: int, size: int, *, normalize: bool = True):
        super().__init__()
        # The LayerNorm has one weight per (c, y, x), so the block only runs at the size it was built for.
        self.norm = nn.LayerNorm((in_channels, size, size)) if normalize else nn.Identity()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.conv2(F.silu(self.conv1(self.norm(x)))))


class TutorialStage(nn.Module):
    """Blocks of widths `channels[0] → channels[1] → ...`, after adding a per-stage time MLP to the input."""

    def __init__(self, channels: list[int], size: int, embed_dim: int, *, normalize_last: bool = True):
        super().__init__()
        self.time_mlp = nn.Sequential(nn.Linear(embed_dim, channels[0]), nn.SiLU(),
                                      nn.Linear(channels[0], channels[0]))
        last = len(channels) - 2
        self.blocks = nn.Sequential(*(
            TutorialBlock(c_in, c_out, size, normalize=normalize_last or i < last)
            for i, (c_in, c_out) in enumerate(zip(channels[:-1], channels[1:]))))

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        return self.blocks(x + self.time_mlp(t_emb)[:, :, None, None])


def _downsample(channels: int, size: int) -> nn.Module:
    """4×4 stride-2 conv; an odd side first goes through a 2×2 conv and SiLU (7 → 6 → 3), as the tutorial."""
    halve = nn.Conv2d(channels, channels, 4, stride=2, padding=1)
    if size % 2 == 0:
        return halve
    return nn.Sequential(nn.Conv2d(channels, channels, 2), nn.SiLU(), halve)


def _upsample(channels: int, size: int) -> nn.Module:
    """Mirror of `_downsample` with transposed convs, back to side `size` (3 → 6 → 7 for size 7)."""
    double = nn.ConvTranspose2d(channels, channels, 4, stride=2, padding=1)
    if size % 2 == 0:
        return double
    return nn.Sequential(double, nn.SiLU(), nn.ConvTranspose2d(channels, channels, 2))


class TutorialUNet(nn.Module):
    """The tutorial's UNet: returns a (B, out_channels, H, W) prediction; runs only at `config.image_size`.

    Each stage has `num_res_blocks` blocks. Going down, a stage widens to its level width; the bottleneck
    narrows to half and back; going up, a stage takes [skip, upsampled] and ends at the next level's width.
    With the TUTORIAL_UNET preset this is the tutorial's net: widths 10/20/40, 3 blocks a stage, a 100-wide
    sinusoid.
    """

    def __init__(self, config: DDPMUNetConfig):
        super().__init__()
        widths = [config.model_channels * m for m in config.channel_mult]
        sizes = tutorial_sizes(config.image_size, len(widths))
        blocks, embed_dim = config.num_res_blocks, config.time_embed_dim
        self.embed_dim = embed_dim

        self.down_stages = nn.ModuleList()
        self.downsamplers = nn.ModuleList()
        for level, width in enumerate(widths):
            previous = config.in_channels if level == 0 else widths[level - 1]
            self.down_stages.append(TutorialStage([previous] + [width] * blocks, sizes[level], embed_dim))
            self.downsamplers.append(_downsample(width, sizes[level]))

        bottom = widths[-1]
        mid_channels = [bottom] + [bottom // 2] * (blocks - 1) + [bottom]       # 40 → 20 → 20 → 40
        self.mid_stage = TutorialStage(mid_channels, sizes[-1], embed_dim)

        self.upsamplers = nn.ModuleList()                     # deepest level first
        self.up_stages = nn.ModuleList()
        for level in reversed(range(len(widths))):
            width, next_width = widths[level], widths[max(level - 1, 0)]
            channels = [2 * width, width] + [next_width] * (blocks - 1)
            self.upsamplers.append(_upsample(width, sizes[level]))
            # The tutorial's very last block has no LayerNorm.
            self.up_stages.append(TutorialStage(channels, sizes[level], embed_dim, normalize_last=level > 0))
        self.conv_out = nn.Conv2d(widths[0], config.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """`x` is (B, C, H, W) at the configured size, `t` a float tensor of shape (B,)."""
        t_emb = timestep_embedding(t, self.embed_dim)       # (B, embed_dim)
        skips = []
        for stage, downsample in zip(self.down_stages, self.downsamplers):
            x = stage(x, t_emb)
            skips.append(x)
            x = downsample(x)
        x = self.mid_stage(x, t_emb)
        for upsample, stage in zip(self.upsamplers, self.up_stages):
            x = stage(torch.cat([skips.pop(), upsample(x)], dim=1), t_emb)
        return self.conv_out(x)
