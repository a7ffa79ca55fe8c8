"""When and how strongly ControlNets steer the sampling (Zhang et al. 2023), as diffusers'
StableDiffusionControlNetPipeline schedules them; the networks themselves know nothing of it.

Two thin wrappers, used together:

    net = controlled_unet(unet, units)                               # net(x, t, context, control_weights)
    model = control_denoiser(Denoiser(net, alphas_cumprod), units, sigmas)   # D(x, sigma, **cond)

`control_denoiser` turns sigma into the sampler's step and gives each unit its weight there (conditioning
scale, or 0 outside its [start, end] fraction of the steps); `controlled_unet` runs the units that have a
weight, sums their scaled residuals and adds them into the UNet. With classifier-free guidance, the cond
dicts carry `conditional` (B,): 1 on the prompt's rows, 0 on the unconditional ones.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from nanodiffusion.errors import UserError

# A grid sigma cast to float32 (or to a half type in a sampler) is still found as its own step.
_SIGMA_RTOL = 1e-3


@dataclass(frozen=True, eq=False)
class ControlUnit:
    """One ControlNet with its control image, strength and active fraction of the steps."""

    controlnet: Callable            # (x, t, context, image) -> (down residuals, mid residual)
    image: torch.Tensor             # (1 or B, C, H, W) in [0, 1], 8x the latent size
    scale: float = 1.0              # diffusers' controlnet_conditioning_scale, A1111's weight
    start: float = 0.0              # fraction of the steps before which it is off (control_guidance_start)
    end: float = 1.0                # fraction of the steps after which it is off (control_guidance_end)
    guess_mode: bool = False        # diffusers' guess mode: residuals only on the conditional rows, residual
    #                                 k of n (the middle last) scaled by 10^(k/n - 1), from 0.1 to 1
    pooled: bool = False            # the ControlNet averages its residuals (global_pool): diffusers keeps
    #                                 them off the unconditional rows, without the guess-mode scales

    def __post_init__(self):
        if not 0.0 <= self.start < self.end <= 1.0:
            raise UserError(f"control guidance start and end must satisfy 0 <= start < end <= 1, "
                            f"got start={self.start} and end={self.end}")
        if self.image.ndim != 4:
            raise UserError(f"a control image must be a (B, C, H, W) tensor, "
                            f"got shape {tuple(self.image.shape)}")


def active_steps(num_steps: int, start: float, end: float) -> list[bool]:
    """Whether each of `num_steps` steps runs the ControlNet: step i does when i/N >= start and
    (i+1)/N <= end, diffusers' `controlnet_keep`."""
    return [not (i / num_steps < start or (i + 1) / num_steps > end) for i in range(num_steps)]


def guess_mode_scales(count: int) -> torch.Tensor:
    """(count,) factors 10^(k/(count-1) - 1), 0.1 for the first skip connection up to 1 for the middle block
    (diffusers' guess mode: the deeper the residual, the more it is trusted without a prompt)."""
    return torch.logspace(-1, 0, count, dtype=torch.float64)


def step_index(sigma: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """(B,) index i of the step that evaluates at each `sigma` on the decreasing grid `sigmas`: the last i
    with sigmas[i] >= sigma. An evaluation between two grid points (DPM2's midpoint) belongs to the step
    that starts above it; Heun's second evaluation, at sigmas[i+1], to step i+1."""
    grid = sigmas[:-1].to(dtype=torch.float64, device="cpu")                   # (N,) the steps' start sigmas
    sigma = sigma.detach().to(dtype=torch.float64, device="cpu").reshape(-1, 1)
    at_or_below = grid[None, :] >= sigma * (1 - _SIGMA_RTOL)                  # (B, N)
    return (at_or_below.sum(dim=1) - 1).clamp(0, len(grid) - 1)


def control_denoiser(denoiser: Callable, units: Sequence[ControlUnit], sigmas: torch.Tensor) -> Callable:
    """D(x, sigma, conditional=None, **cond) calling `denoiser(x, sigma, control_weights=W, **cond)`, where
    W (B, units) is each unit's scale on the steps it is active, else 0, and 0 on the unconditional rows
    (`conditional` == 0) for units in guess mode or pooled. `sigmas` is the grid the sampler runs."""
    num_steps = len(sigmas) - 1
    table = torch.tensor([[unit.scale * active for active in active_steps(num_steps, unit.start, unit.end)]
                          for unit in units], dtype=torch.float64).reshape(len(units), num_steps)
    conditional_only = torch.tensor([unit.guess_mode or unit.pooled for unit in units], dtype=torch.bool)

    def denoise(x: torch.Tensor, sigma, conditional: torch.Tensor | None = None, **cond) -> torch.Tensor:
        sigma_rows = torch.as_tensor(sigma).reshape(-1).expand(x.shape[0])
        weights = table[:, step_index(sigma_rows, sigmas)].T                    # (B, units)
        if conditional is not None:
            keep = conditional.detach().cpu().to(torch.float64)[:, None] != 0  # (B, 1)
            weights = torch.where(conditional_only[None, :] & ~keep, 0.0, weights)
        return denoiser(x, sigma, control_weights=weights, **cond)

    return denoise


def controlled_unet(unet: Callable, units: Sequence[ControlUnit]) -> Callable:
    """net(x, t, context, control_weights=None) = unet(x, t, context) plus the sum over units of their
    residuals times their weight (B, units); without weights every unit runs at its scale."""

    def net(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
            control_weights: torch.Tensor | None = None) -> torch.Tensor:
        if control_weights is None:
            scales = torch.tensor([unit.scale for unit in units], dtype=torch.float64)
            control_weights = scales.expand(x.shape[0], -1)                           # (B, units)
        total = None
        for unit, weights in zip(units, control_weights.T):
            residuals = unit_residuals(unit, weights, x, t, context)
            if residuals is not None:
                total = residuals if total is None else [a + b for a, b in zip(total, residuals)]
        if total is None:                          # no unit active at this step: the plain UNet, at no cost
            return unet(x, t, context)
        return unet(x, t, context, down_residuals=total[:-1], mid_residual=total[-1])

    return net


def unit_residuals(unit: ControlUnit, weights: torch.Tensor, x: torch.Tensor, t: torch.Tensor,
                   context: torch.Tensor) -> list[torch.Tensor] | None:
    """The unit's down residuals and mid residual (last), each row times its weight (B,); the ControlNet
    runs only on the rows with a nonzero weight (None when there is none)."""
    batch = x.shape[0]
    if batch % unit.image.shape[0]:
        raise UserError(f"the control image batch ({unit.image.shape[0]}) must be 1 or divide the batch "
                        f"({batch})")
    rows = weights != 0
    if not rows.any():
        return None
    image = unit.image.repeat(batch // unit.image.shape[0], 1, 1, 1).to(x.device)   # (B, C, H, W), CFG halves
    t = torch.as_tensor(t, device=x.device).reshape(-1).expand(batch)
    every_row = bool(rows.all())
    if not every_row:                              # e.g. guess mode: the unconditional half gets no residuals
        index = rows.nonzero().squeeze(1).to(x.device)
        x, t, context, image = x[index], t[index], context[index], image[index]
    down, mid = unit.controlnet(x, t, context, image)
    residuals = [*down, mid]
    factors = weights[rows].to(torch.float64)[:, None]                          # (rows, 1)
    if unit.guess_mode and not unit.pooled:
        factors = factors * guess_mode_scales(len(residuals))[None, :]           # (rows, residuals)
    factors = factors.expand(-1, len(residuals)).to(device=mid.device, dtype=mid.dtype)   # one transfer
    scaled = [r * factors[:, k].reshape(-1, 1, 1, 1) for k, r in enumerate(residuals)]
    if every_row:
        return scaled
    full = []
    for residual in scaled:                        # zeros on the rows the ControlNet did not run for
        padded = residual.new_zeros((batch, *residual.shape[1:]))
        padded[index] = residual
        full.append(padded)
    return full
