"""Token merging for Stable Diffusion (Bolya & Hoffman 2023, "Token Merging for Fast Stable Diffusion"), opt-in.

Before the self-attention of a transformer block at the UNet's full latent resolution, the most redundant
tokens are merged into similar ones (bipartite soft matching, Bolya et al. 2023, "Token Merging: Your ViT but
Faster", §3): one token of each 2x2 window, picked at random, is a destination; every other token finds its
most cosine-similar destination, and the `ratio`·N best-matched ones are averaged into theirs. Attention runs
on the N - r tokens left; its output is copied back to every merged token ("unmerging"). Cross-attention
and the feed-forward layer see all N tokens, as in the paper's default setting. The image changes a little:
a speed for quality trade measured in benchmarks/tome_speed.py.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn

from nanodiffusion.errors import UserError

MAX_RATIO = 0.75                        # at most the 3 non-destination tokens of each 2x2 window merge


def check_ratio(ratio: float) -> None:
    """A UserError unless 0 <= ratio <= MAX_RATIO."""
    if not 0 <= ratio <= MAX_RATIO:
        raise UserError(f"the token merging ratio (tome_ratio) must be between 0 (off) and {MAX_RATIO} (one "
                        f"token of each 2x2 window kept), got {ratio}")


class TokenMerge:
    """The merge plan of one block's tokens (B, N, C) on an H x W grid: `merge` gives (B, N - r, C), and
    `unmerge` maps such tokens back to (B, N, C), a merged token taking the value of its destination."""

    def __init__(self, x: torch.Tensor, height: int, width: int, ratio: float, generator: torch.Generator):
        batch, length, _ = x.shape
        self.src_index, self.dst_index = _partition(height, width, generator, x.device)    # (Ns,), (Nd,)
        self.r = min(int(length * ratio), len(self.src_index))
        metric = x / x.norm(dim=-1, keepdim=True)
        scores = metric[:, self.src_index] @ metric[:, self.dst_index].transpose(1, 2)     # (B, Ns, Nd)
        best, best_dst = scores.max(dim=-1)                                                # (B, Ns)
        order = best.argsort(dim=-1, descending=True)               # most redundant source tokens first
        self.merged_src, self.kept_src = order[:, :self.r], order[:, self.r:]              # (B, r), (B, Ns-r)
        self.merged_dst = best_dst.gather(1, self.merged_src)                              # (B, r)
        self.length = length

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, N - r, C): the kept source tokens, then the destinations averaged with theirs."""
        src, dst = x[:, self.src_index], x[:, self.dst_index]
        kept = src.gather(1, _expand(self.kept_src, x))
        moved = src.gather(1, _expand(self.merged_src, x))
        dst = dst.scatter_reduce(1, _expand(self.merged_dst, x), moved, reduce="mean", include_self=True)
        return torch.cat([kept, dst], dim=1)

    def unmerge(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N - r, C) -> (B, N, C) in the original token order."""
        kept, dst = x[:, :self.kept_src.shape[1]], x[:, self.kept_src.shape[1]:]
        out = x.new_empty(x.shape[0], self.length, x.shape[2])
        out[:, self.dst_index] = dst
        out.scatter_(1, _expand(self.src_index[self.kept_src], x), kept)
        out.scatter_(1, _expand(self.src_index[self.merged_src], x), dst.gather(1, _expand(self.merged_dst, x)))
        return out


def _expand(index: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return index[..., None].expand(-1, -1, x.shape[-1])                 # (B, k) -> (B, k, C)


def _partition(height: int, width: int, generator: torch.Generator,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(source, destination) token indices: one random destination per whole 2x2 window; tokens of a last odd
    row or column are sources."""
    rows, cols = height // 2, width // 2
    choice = torch.randint(4, (rows, cols), generator=generator)        # which of the window's 4 tokens
    is_dst = torch.zeros(height, width, dtype=torch.bool)
    is_dst[torch.arange(rows)[:, None] * 2 + choice // 2, torch.arange(cols)[None, :] * 2 + choice % 2] = True
    is_dst = is_dst.flatten()
    return (~is_dst).nonzero()[:, 0].to(device), is_dst.nonzero()[:, 0].to(device)


def full_resolution_transformers(unet: nn.Module) -> list[nn.Module]:
    """The UNet's SpatialTransformers at its full latent resolution (first down block, last up block)."""
    found = []
    for block in (unet.down_blocks[0], unet.up_blocks[-1]):
        found += list(block.attentions) if block.attentions is not None else []
    return found


@contextmanager
def merging_tokens(unet: nn.Module, ratio: float, seed: int) -> Iterator[None]:
    """Within the block, the UNet merges `ratio` of the tokens before each full-resolution self-attention;
    the 2x2 destinations are drawn from a generator seeded with `seed` (the same image for the same seed).
    Ratio 0 leaves the UNet untouched."""
    check_ratio(ratio)
    transformers = full_resolution_transformers(unet) if ratio > 0 else []
    generator = torch.Generator().manual_seed(seed)
    for transformer in transformers:
        transformer.token_merging = (ratio, generator)
    try:
        yield
    finally:
        for transformer in transformers:
            transformer.token_merging = None
