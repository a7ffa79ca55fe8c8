"""Exponential moving average of model weights (Polyak averaging; used by DDPM, Ho et al. 2020 §4)."""

import copy

import torch

from nanodiffusion.errors import UserError


class EMA:
    """Keeps `shadow`, a frozen copy of a model whose weights track decay·shadow + (1-decay)·model.

    The decay warms up as min(decay, (1 + n) / (10 + n)) after n updates, so that short runs are not dominated
    by the random initial weights (0.999^1000 still leaves 37 % of them).
    """

    def __init__(self, model: torch.nn.Module, decay: float = 0.999):
        if not 0 <= decay < 1:
            raise UserError(f"ema_decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.num_updates = 0
        self.shadow = copy.deepcopy(model).eval().requires_grad_(False)

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        ema_params = list(self.shadow.parameters())
        params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, 1 - self.current_decay())   # one fused kernel for all
        self.num_updates += 1
        for b_ema, b in zip(self.shadow.buffers(), model.buffers()):
            b_ema.copy_(b)
