"""Building blocks of the Stable Diffusion UNet and VAE (Rombach et al. 2022), and their config helpers.

Attribute names mirror the diffusers state-dict keys of SD v1.x (`resnets.0.conv1`, `attn1.to_q`,
`ff.net.2`...), so published weights load with `load_state_dict(strict=True)`. Downsampling is shared with
the DDPM UNet (`nanodiffusion.nets.blocks`); upsampling here is the same map, run as a transposed conv.
"""

import weakref
from collections.abc import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanodiffusion.errors import UserError
from nanodiffusion.nets import blocks
from nanodiffusion.nets.token_merging import TokenMerge


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice with a residual path; the timestep embedding is added after the first conv.

    `temb_channels=None` gives the VAE's variant without timestep input.
    """

    def __init__(self, in_channels: int, out_channels: int, *, temb_channels: int | None, norm_groups: int,
                 eps: float, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(norm_groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = None if temb_channels is None else nn.Linear(temb_channels, out_channels)
        self.norm2 = nn.GroupNorm(norm_groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # a 1x1 conv matches the widths of the residual path only where they differ
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        """`x` is (B, C_in, H, W); `temb` is the SiLU-activated (B, temb_channels) timestep embedding."""
        # Without autograd, activations and sums overwrite the fresh tensors they read: on a CPU, allocating
        # (and page-faulting) a new 64-256 MiB map per step costs as much as the step at VAE resolutions.
        inplace = not torch.is_grad_enabled()
        h = self.conv1(F.silu(self.norm1(x), inplace=inplace))
        if self.time_emb_proj is not None:
            emb = self.time_emb_proj(temb)[:, :, None, None]                 # (B, C_out, 1, 1) broadcast
            h = h.add_(emb) if inplace else h + emb
        h = self.conv2(self.dropout(F.silu(self.norm2(h), inplace=inplace)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return h.add_(skip) if inplace else skip + h


def nearest_upsampling_kernel(weight: torch.Tensor) -> torch.Tensor:
    """The (C_in, C_out, 4, 4) stride-2 transposed-conv kernel equal to 2x nearest upsampling followed by the
    3x3 conv `weight` (C_out, C_in, 3, 3) with padding 1.

    Along each axis, output 2i sees w0*x[i-1] + (w1+w2)*x[i] and output 2i+1 sees (w0+w1)*x[i] + w2*x[i+1],
    so the taps are [w2, w1+w2, w0+w1, w0]: 16 instead of 4*9 multiply-adds per input pixel (2.25x fewer).
    """
    w = weight.float()                                   # the tap sums are rounded once, to the weight dtype
    w = torch.stack([w[:, :, 2], w[:, :, 1] + w[:, :, 2], w[:, :, 0] + w[:, :, 1], w[:, :, 0]], dim=2)
    w = torch.stack([w[..., 2], w[..., 1] + w[..., 2], w[..., 0] + w[..., 1], w[..., 0]], dim=3)
    return w.transpose(0, 1).to(weight.dtype)           # (C_in, C_out, 4, 4): conv_transpose2d's layout


class Upsample(blocks.Upsample):
    """Nearest-neighbour upsampling to `size`, then a 3x3 conv; an exact 2x runs as one transposed conv.

    The transposed conv is the same linear map with 2.25x fewer FLOPs and no upsampled copy of the input.
    Its kernel is derived from `conv.weight` and cached while the weight is unchanged and no gradient is
    being recorded (inference); under autograd it is rebuilt each call, so gradients reach `conv.weight`.
    """

    def __init__(self, channels: int):
        super().__init__(channels)
        self._kernel: tuple | None = None               # (weak reference to the weight, its state, kernel)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if tuple(size) != (2 * x.shape[-2], 2 * x.shape[-1]):
            return super().forward(x, size)         # odd latent sides (7 -> 4 -> 7) keep the general path
        return F.conv_transpose2d(x, self._transposed_kernel(x), self.conv.bias, stride=2, padding=1)

    def _transposed_kernel(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.conv.weight
        if (torch.is_grad_enabled() and weight.requires_grad) or torch.compiler.is_compiling():
            return nearest_upsampling_kernel(weight)        # torch.compile traces the derivation instead
        memory_format = (torch.channels_last if x.is_contiguous(memory_format=torch.channels_last)
                         and not x.is_contiguous() else torch.contiguous_format)
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.device, memory_format)
        # a weak reference, not id(): a weight swapped in later (LoRAs do) may reuse a freed one's id and memory
        if self._kernel is None or self._kernel[0]() is not weight or self._kernel[1] != key:
            with torch.no_grad():
                kernel = nearest_upsampling_kernel(weight).contiguous(memory_format=memory_format)
            self._kernel = (weakref.ref(weight), key, kernel)
        return self._kernel[2]


# Devices whose scaled_dot_product_attention has fused kernels (flash / memory-efficient) that never hold the
# (L, L) score matrix; elsewhere `attention` splits the queries into chunks of at most _MAX_SCORES scores.
_FUSED_ATTENTION_DEVICES = ("cpu", "cuda")
_MAX_SCORES = 2**26                     # 256 MiB of float32 scores per chunk


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, *,
              upcast: bool = False, query_chunk_size: int | None = None) -> torch.Tensor:
    """Multi-head scaled dot-product attention (Vaswani et al. 2017, §3.2) on (B, L, heads*head_dim) tensors.

    `upcast` computes it in float32 (SD 2.1 overflows in float16 otherwise). `query_chunk_size` runs the
    queries in chunks of that many, each against all keys (the same result, a smaller score matrix); the
    default chunks only on devices without a fused kernel, where the full matrix would be materialised.
    """
    batch, length, inner = q.shape
    dtype = q.dtype
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    q, k, v = (x.unflatten(-1, (num_heads, -1)).transpose(1, 2) for x in (q, k, v))  # (B, heads, L, dim)
    if query_chunk_size is None and q.device.type not in _FUSED_ATTENTION_DEVICES:
        query_chunk_size = max(1, _MAX_SCORES // (batch * num_heads * k.shape[2]))
    if query_chunk_size is None or query_chunk_size >= length:
        out = F.scaled_dot_product_attention(q, k, v)                                 # (B, heads, L, dim)
    else:
        out = torch.cat([F.scaled_dot_product_attention(q_chunk, k, v)
                         for q_chunk in q.split(query_chunk_size, dim=2)], dim=2)     # (B, heads, L, dim)
    return out.transpose(1, 2).reshape(batch, length, inner).to(dtype)                # (B, L, heads*dim)


class Attention(nn.Module):
    """Multi-head attention of tokens `x` on `context` (self-attention when it is None); no q/k/v bias."""

    def __init__(self, query_dim: int, num_heads: int, *, context_dim: int | None = None,
                 upcast: bool = False):
        super().__init__()
        context_dim = context_dim or query_dim
        self.num_heads, self.upcast = num_heads, upcast
        self.to_q = nn.Linear(query_dim, query_dim, bias=False)
        self.to_k = nn.Linear(context_dim, query_dim, bias=False)
        self.to_v = nn.Linear(context_dim, query_dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(query_dim, query_dim)])     # `to_out.0` in the checkpoints

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        out = attention(self.to_q(x), self.to_k(context), self.to_v(context), self.num_heads,
                        upcast=self.upcast)
        return self.to_out[0](out)


class GEGLU(nn.Module):
    """Linear layer to 2*dim_out features gated as a * GELU(b) (Shazeer 2020, "GLU Variants Improve
    Transformer")."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """The transformer MLP: GEGLU to 4*dim hidden features, then a linear layer back to dim."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # index 1 is the checkpoints' (parameter-free) dropout slot, kept so the output layer is `net.2`
        self.net = nn.Sequential(GEGLU(dim, mult * dim), nn.Identity(), nn.Linear(mult * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: self-attention, cross-attention on the text `context`, GEGLU feed-forward."""

    def __init__(self, dim: int, num_heads: int, context_dim: int, *, upcast_attention: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, num_heads, upcast=upcast_attention)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, num_heads, context_dim=context_dim, upcast=upcast_attention)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor,
                tokens: TokenMerge | None = None) -> torch.Tensor:
        if tokens is None:
            x = x + self.attn1(self.norm1(x))
        else:                                       # token merging: self-attention on fewer tokens
            x = x + tokens.unmerge(self.attn1(tokens.merge(self.norm1(x))))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


def _projection(channels: int, linear: bool) -> nn.Module:
    return nn.Linear(channels, channels) if linear else nn.Conv2d(channels, channels, 1)


class SpatialTransformer(nn.Module):
    """Transformer blocks over the H*W positions of a feature map, with a residual around them.

    `proj_in`/`proj_out` are 1x1 convs (SD v1.x) or, with `linear_projection`, linear layers on the tokens
    (SD 2.x); the two are the same map on differently laid-out weights.
    """

    def __init__(self, channels: int, num_heads: int, context_dim: int, *, depth: int, norm_groups: int,
                 linear_projection: bool = False, upcast_attention: bool = False):
        super().__init__()
        self.linear_projection = linear_projection
        self.norm = nn.GroupNorm(norm_groups, channels, eps=1e-6)              # fixed 1e-6 in the reference
        self.proj_in = _projection(channels, linear_projection)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(channels, num_heads, context_dim, upcast_attention=upcast_attention)
            for _ in range(depth))
        self.proj_out = _projection(channels, linear_projection)
        # (ratio, generator) while token merging is on (token_merging.merging_tokens), else None
        self.token_merging: tuple[float, torch.Generator] | None = None

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        h = self.norm(x)
        if not self.linear_projection:
            h = self.proj_in(h)
        # (B, H*W, C): a free view when x is channels_last, one copy otherwise
        h = h.permute(0, 2, 3, 1).reshape(batch, height * width, channels)
        if self.linear_projection:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            merging = self.token_merging
            h = block(h, context, None if merging is None else TokenMerge(h, height, width, *merging))
        if self.linear_projection:
            h = self.proj_out(h)
        h = h.reshape(batch, height, width, channels).permute(0, 3, 1, 2)      # (B, C, H, W), NHWC strides
        if not self.linear_projection:
            h = self.proj_out(h)
        return h + x


def read_diffusers_config(config: Mapping, class_name: str, read: Mapping, fixed: Mapping) -> dict:
    """Return the `read` keys of a diffusers `config.json` dict, with `read`'s values (diffusers' defaults)
    where it leaves one out; lists become tuples.

    Each key in `fixed` must keep the value given there: other values are options not implemented here.
    Keys starting with "_" are metadata; any other key is an error, so no option is silently dropped.
    """
    if config.get("_class_name", class_name) != class_name:
        raise UserError(f"expected a diffusers {class_name} config, "
                        f"got _class_name={config['_class_name']!r}")
    values, unknown, unsupported = dict(read), [], []
    for key, value in config.items():
        value = tuple(value) if isinstance(value, list) else value
        if key.startswith("_"):
            continue
        if key in read:
            values[key] = value
        elif key in fixed:
            if value != fixed[key]:
                unsupported.append(f"{key}={value!r} (only {fixed[key]!r} is supported)")
        else:
            unknown.append(key)
    if unknown:
        raise UserError(f"unknown keys in the {class_name} config: {sorted(unknown)}")
    if unsupported:
        raise UserError(f"unsupported {class_name} options: {', '.join(unsupported)}")
    return values
