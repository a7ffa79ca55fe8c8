"""Sinusoidal timestep embedding (Vaswani et al. 2017, §3.5; as used by DDPM and Stable Diffusion)."""

import math

import torch


def timestep_embedding(t: torch.Tensor, dim: int, *, max_period: float = 10000.0,
                       cos_first: bool = True, freq_shift: float = 0.0) -> torch.Tensor:
    """Return (B, dim) features [cos(t·f_k), sin(t·f_k)] with f_k = max_period^(-k / (half - freq_shift)).

    `t` is a float tensor of shape (B,) or (); SD v1.x uses `cos_first=True, freq_shift=0`.
    """
    t = torch.as_tensor(t).reshape(-1).float()
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / (half - freq_shift))                # (half,)
    angles = t[:, None] * freqs[None, :]                             # (B, half)
    parts = (angles.cos(), angles.sin()) if cos_first else (angles.sin(), angles.cos())
    emb = torch.cat(parts, dim=-1)                                   # (B, 2*half)
    if dim % 2:                                                      # odd widths get one zero column
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb
