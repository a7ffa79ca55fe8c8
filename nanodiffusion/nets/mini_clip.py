"""A miniature CLIP (Radford et al. 2021): a small convolutional image encoder and our CLIP text transformer,
each followed by a linear projection into one embedding space.

`nanodiffusion train text-encoder` trains it contrastively (training/clip_trainer.py); its text transformer
then conditions the UNet, frozen, as SD's CLIP text encoder does, and the whole model scores how well images
follow their prompts (evaluation/clip_score.py).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nanodiffusion.config import JSONConfig
from nanodiffusion.errors import UserError
from nanodiffusion.nets.clip_text import CLIPTextConfig, CLIPTextModel

INITIAL_TEMPERATURE = 0.07              # CLIP's initial softmax temperature
MAX_LOGIT_SCALE = 100.0                 # CLIP clips 1/temperature here to keep training stable


@dataclass(frozen=True)
class MiniCLIPConfig(JSONConfig):
    """The image tower and the joint embedding of a miniature CLIP; the text tower has a CLIPTextConfig."""

    image_channels: int = 1
    image_size: int = 32
    image_widths: tuple[int, ...] = (32, 64, 128)   # conv widths; each step to the next halves the side
    norm_groups: int = 8
    embed_dim: int = 128                             # width of the joint image-text embedding

    def __post_init__(self):
        if self.image_size % 2 ** (len(self.image_widths) - 1):
            raise UserError(f"image_size {self.image_size} must be divisible by "
                            f"{2 ** (len(self.image_widths) - 1)} for {len(self.image_widths)} widths")
        if not self.image_widths or any(w < 1 or w % self.norm_groups for w in self.image_widths):
            raise UserError(f"image_widths must be multiples of norm_groups={self.norm_groups}, "
                            f"got {self.image_widths}")
        if self.image_channels < 1 or self.embed_dim < 1:
            raise UserError("image_channels and embed_dim must be positive")


class ImageEncoder(nn.Module):
    """Conv stem, (GroupNorm, SiLU, stride-2 conv) blocks between the widths, then a linear projection of
    the whole final feature map: not pooled, so that where things are ("on the left") is kept."""

    def __init__(self, config: MiniCLIPConfig):
        super().__init__()
        widths = config.image_widths
        self.conv_in = nn.Conv2d(config.image_channels, widths[0], 3, padding=1)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.GroupNorm(config.norm_groups, w_in), nn.SiLU(),
                          nn.Conv2d(w_in, w_out, 3, stride=2, padding=1))
            for w_in, w_out in zip(widths[:-1], widths[1:]))
        self.norm_out = nn.GroupNorm(config.norm_groups, widths[-1])
        side = config.image_size // 2 ** (len(widths) - 1)
        self.projection = nn.Linear(widths[-1] * side**2, config.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for block in self.blocks:
            h = block(h)
        return self.projection(F.silu(self.norm_out(h)).flatten(1))           # (B, embed_dim)


class MiniCLIP(nn.Module):
    """`model(images, input_ids)` -> (image embeddings, text embeddings, logit scale): unit-norm (B, E) each
    and exp(learned log scale), CLIP's 1/temperature."""

    def __init__(self, config: MiniCLIPConfig, text_config: CLIPTextConfig):
        super().__init__()
        self.config, self.text_config = config, text_config
        self.image_encoder = ImageEncoder(config)
        self.text_encoder = CLIPTextModel(text_config)
        self.text_projection = nn.Linear(text_config.hidden_size, config.embed_dim, bias=False)
        nn.init.normal_(self.text_projection.weight, std=text_config.hidden_size ** -0.5)     # as CLIP's
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / INITIAL_TEMPERATURE)))

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_encoder(images).float(), dim=-1)

    def embed_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_projection(self.text_encoder(input_ids).pooled).float(), dim=-1)

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor):
        return self.embed_images(images), self.embed_text(input_ids), self.logit_scale.exp()
