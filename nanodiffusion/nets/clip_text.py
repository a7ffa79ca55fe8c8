"""CLIP text transformer (Radford et al. 2021, §2.4): the prompt encoder of Stable Diffusion v1.x.

A causal pre-LayerNorm transformer over token + learned position embeddings. Submodule names follow
transformers' CLIPTextModel as stored in a diffusers folder's `text_encoder/`
(`text_model.encoder.layers.3.mlp.fc1.weight`), so those weights load with a strict `load_state_dict`.
"""

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from nanodiffusion.config import JSONConfig
from nanodiffusion.errors import UserError


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x·sigmoid(1.702x): the sigmoid approximation of GELU (Hendrycks & Gimpel 2016, §2) used by CLIP."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}

# config.json key (transformers' CLIPTextConfig) for each of our field names.
_TRANSFORMERS_KEYS = {
    "vocab_size": "vocab_size", "hidden_size": "hidden_size", "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads", "intermediate_size": "intermediate_size",
    "max_positions": "max_position_embeddings", "layer_norm_eps": "layer_norm_eps",
    "activation": "hidden_act", "bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id",
    "pad_token_id": "pad_token_id",
}
# transformers' CLIPTextConfig defaults (the ViT-B/32 text tower), which apply to keys a config.json omits.
_TRANSFORMERS_DEFAULTS = {
    "vocab_size": 49408, "hidden_size": 512, "num_hidden_layers": 12, "num_attention_heads": 8,
    "intermediate_size": 2048, "max_position_embeddings": 77, "layer_norm_eps": 1e-5,
    "hidden_act": "quick_gelu", "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1,
}
# transformers pools at the highest token id when eos_token_id == 2, the stale value that configs written
# before transformers PR #24773 carry (SD v1.x's text_encoder/config.json among them). In CLIP's vocabulary
# the highest id in a prompt is <|endoftext|> (49407), so both rules pick the same position there.
LEGACY_EOS_TOKEN_ID = 2


@dataclass(frozen=True)
class CLIPTextConfig(JSONConfig):
    """Sizes and token ids of a CLIP text transformer; `CLIPTextModel(config)` builds it."""

    vocab_size: int = 49408
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12                     # number of heads, not head size
    intermediate_size: int = 3072           # width of the MLP's hidden layer
    max_positions: int = 77                 # longest token sequence, specials included
    layer_norm_eps: float = 1e-5
    activation: str = "quick_gelu"
    bos_token_id: int = 49406               # <|startoftext|>
    eos_token_id: int = 49407               # <|endoftext|>: the pooled output is read where it first occurs
    pad_token_id: int = 49407               # SD v1.x pads with <|endoftext|>

    def __post_init__(self):
        sizes = ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                 "max_positions")
        for name in sizes:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise UserError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.hidden_size % self.num_heads:
            raise UserError(f"hidden_size={self.hidden_size} must be divisible by "
                            f"num_heads={self.num_heads}")
        if self.activation not in ACTIVATIONS:
            raise UserError(f"unknown activation {self.activation!r}; valid: {', '.join(ACTIVATIONS)}")

    @classmethod
    def from_transformers_config(cls, data: dict) -> "CLIPTextConfig":
        """Read a diffusers folder's `text_encoder/config.json` (transformers' CLIPTextConfig as a dict)."""
        if "text_config" in data:
            raise UserError("this is a full CLIPModel config: pass its 'text_config' entry")
        if data.get("model_type", "clip_text_model") != "clip_text_model":
            raise UserError(f"expected a CLIP text model config, got model_type={data['model_type']!r}")
        values = {ours: data.get(theirs, _TRANSFORMERS_DEFAULTS[theirs])
                  for ours, theirs in _TRANSFORMERS_KEYS.items()}
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if not isinstance(values[name], int):
                raise UserError(f"{_TRANSFORMERS_KEYS[name]} must be one integer, got {values[name]!r}")
        return cls(**values)

    def to_transformers_config(self) -> dict:
        """The `text_encoder/config.json` content from which transformers builds this CLIPTextModel."""
        values = {theirs: getattr(self, ours) for ours, theirs in _TRANSFORMERS_KEYS.items()}
        # transformers 5 loads weights in the dtype a config declares, else in the file's: an fp16 file would
        # come up fp16 beside diffusers' fp32 UNet and VAE ("mat1 and mat2 must have the same dtype")
        return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "torch_dtype": "float32",
                **values}


SD15_TEXT = CLIPTextConfig()                # OpenAI's ViT-L/14 text tower, used by SD v1.x
# CLIP's vocabulary, so the real tokenizer works with it; 32 wide like TINY_UNET's context.
TINY_TEXT = CLIPTextConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
# OpenCLIP's ViT-H/14 text tower as SD 2.x reads it: the first 23 of its 24 layers (SD 2 conditions on the
# penultimate layer, through the final LayerNorm), exact GELU, prompts padded with "!" (id 0) as open_clip.
SD2_TEXT = CLIPTextConfig(hidden_size=1024, num_layers=23, num_heads=16, intermediate_size=4096,
                          activation="gelu", pad_token_id=0)
# Its tiny stand-in: 64-wide heads as in every CLIP tower, so its config can be inferred from shapes.
TINY_SD2_TEXT = CLIPTextConfig(hidden_size=64, num_layers=2, num_heads=1, intermediate_size=128,
                               activation="gelu", pad_token_id=0)


class CLIPTextOutput(NamedTuple):
    """What `CLIPTextModel` returns; SD v1.x conditions its UNet on `hidden_states`."""

    hidden_states: torch.Tensor             # (B, L, hidden_size), after the final LayerNorm
    pooled: torch.Tensor                    # (B, hidden_size): hidden_states at each row's end-of-text token


class CLIPEmbeddings(nn.Module):
    """Token embedding plus learned absolute position embedding."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_positions, config.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = self.position_embedding.weight[: input_ids.shape[1]]     # (L, hidden)
        return self.token_embedding(input_ids) + positions

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints from transformers < 4.31 store the buffer `position_ids` = arange(77). It is accepted
        # and ignored: positions are always 0..L-1 (some merged checkpoints hold corrupted float copies).
        state_dict.pop(prefix + "position_ids", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class CLIPAttention(nn.Module):
    """Multi-head self-attention (Vaswani et al. 2017, §3.2.2) with q/k/v/out projections carrying biases."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """`mask` is a boolean (B, 1, L, L) "may attend" mask, or None for the plain causal mask."""
        batch, length, width = x.shape
        q, k, v = (proj(x).view(batch, length, self.num_heads, width // self.num_heads).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))           # (B, heads, L, head_dim)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, width))   # (B, L, hidden)


class CLIPEncoderLayer(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.self_attn = CLIPAttention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = nn.ModuleDict({"fc1": nn.Linear(config.hidden_size, config.intermediate_size),
                                  "fc2": nn.Linear(config.intermediate_size, config.hidden_size)})
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.activation = ACTIVATIONS[config.activation]

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp.fc2(self.activation(self.mlp.fc1(self.layer_norm2(x))))


class CLIPTextModel(nn.Module):
    """CLIP's text encoder: token ids (B, L) → per-token states (B, L, hidden) and a pooled (B, hidden)."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.text_model = nn.ModuleDict({
            "embeddings": CLIPEmbeddings(config),
            "encoder": nn.ModuleDict({"layers": nn.ModuleList(CLIPEncoderLayer(config)
                                                              for _ in range(config.num_layers))}),
            "final_layer_norm": nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps),
        })

    def forward(self, input_ids: torch.Tensor, *, clip_skip: int = 1,
                attention_mask: torch.Tensor | None = None) -> CLIPTextOutput:
        """Encode token ids (B, L); `attention_mask` (B, L) is 1 for real tokens, 0 for right-side padding.

        `clip_skip=k` returns the output of layer num_layers - k + 1 (1: the last, 2: the penultimate, as
        A1111's "clip skip" and diffusers' `clip_skip=k-1`), always through the final LayerNorm. The layers
        after it are not run, and `pooled` is read from the returned states.
        """
        self._check_inputs(input_ids, clip_skip, attention_mask)
        batch, length = input_ids.shape
        mask = None
        if attention_mask is not None:
            causal = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).tril()  # (L, L)
            mask = causal & attention_mask.bool()[:, None, None, :]             # (B, 1, L, L)
        x = self.text_model.embeddings(input_ids)                               # (B, L, hidden)
        for layer in self.text_model.encoder.layers[: self.config.num_layers - clip_skip + 1]:
            x = layer(x, mask)
        x = self.text_model.final_layer_norm(x)
        if self.config.eos_token_id == LEGACY_EOS_TOKEN_ID:
            eos_index = input_ids.argmax(dim=-1)
        else:
            # The first EOS: the pad token may be EOS too.
            eos_index = (input_ids == self.config.eos_token_id).int().argmax(dim=-1)
        pooled = x[torch.arange(batch, device=x.device), eos_index]             # (B, hidden)
        return CLIPTextOutput(x, pooled)

    def _check_inputs(self, input_ids: torch.Tensor, clip_skip: int,
                      attention_mask: torch.Tensor | None) -> None:
        if input_ids.ndim != 2 or input_ids.dtype not in (torch.int32, torch.int64):
            raise UserError(f"input_ids must be integer token ids of shape (B, L), got {input_ids.dtype} "
                            f"{tuple(input_ids.shape)}")
        if input_ids.shape[1] > self.config.max_positions:
            raise UserError(f"input_ids has {input_ids.shape[1]} tokens; the model takes at most "
                            f"{self.config.max_positions}")
        if not 1 <= clip_skip <= self.config.num_layers:
            raise UserError(f"clip_skip must be between 1 and {self.config.num_layers}, got {clip_skip}")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise UserError(f"attention_mask shape {tuple(attention_mask.shape)} must equal input_ids shape "
                            f"{tuple(input_ids.shape)}")
        eos = self.config.eos_token_id
        if eos != LEGACY_EOS_TOKEN_ID and not (input_ids == eos).any(dim=-1).all():
            raise UserError(f"every row of input_ids needs the end-of-text token {eos}: the pooled output "
                            "is read there")
