"""Denoisers D(x, sigma), the clean-image estimate samplers call: a network trained on a discrete VP schedule
turned into one (Karras et al. 2022, §B.6), and the wrappers that change one into another: classifier-free
guidance, the inpainting denoiser, LCM's boundary condition, ControlNet's schedule (with the UNet wrapper
that adds its residuals). A new wrapper goes here too.

Samplers see x = x0 + sigma·eps; the network saw x_vp = sqrt(ᾱ)·x0 + sqrt(1-ᾱ)·eps = x / sqrt(1 + sigma²)
at timestep t(sigma), and predicts eps, v or x0.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from nanodiffusion.diffusion.forward import PREDICTION_TYPES
from nanodiffusion.diffusion.schedules import alphas_cumprod_to_sigmas, sigma_to_t
from nanodiffusion.errors import UserError


class Denoiser:
    """`Denoiser(net, alphas_cumprod, prediction)(x, sigma, **cond)` returns the clean-image estimate.

    `net(x_vp, t, **cond)` is any callable; `sigma` is a float or a tensor of shape () or (B,).
    """

    def __init__(self, net: Callable, alphas_cumprod: torch.Tensor, prediction: str = "epsilon"):
        if prediction not in PREDICTION_TYPES:
            raise UserError(f"unknown prediction type {prediction!r}; valid: {', '.join(PREDICTION_TYPES)}")
        self.net = net
        self.prediction = prediction
        self.sigmas = alphas_cumprod_to_sigmas(alphas_cumprod.double())   # (T,) increasing
        self.sigma_min = float(self.sigmas[0])
        self.sigma_max = float(self.sigmas[-1])

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma_to_t(sigma, self.sigmas)

    def __call__(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
        t = self.timestep(sigma).to(x.device).expand(x.shape[0])            # (B,)
        s = sigma.reshape(-1, *([1] * (x.ndim - 1)))                          # (B or 1, 1, 1, 1)
        c_in = (s**2 + 1).rsqrt()                                             # = sqrt(ᾱ)
        out = self.net((x * c_in).to(x.dtype), t, **cond).to(x.dtype)
        if self.prediction == "epsilon":
            return x - s * out
        if self.prediction == "v_prediction":                                # x0 = sqrt(ᾱ)·x_vp - sqrt(1-ᾱ)·v
            return x * c_in**2 - s * c_in * out
        return out


def cfg_denoiser(denoiser: Callable, cond: dict, uncond: dict, guidance_scale: float) -> Callable:
    """Return D(x, sigma) = D_u + w·(D_c - D_u), evaluating both branches in one batched call.

    `cond` / `uncond` map the denoiser's keyword names to tensors of batch size B; w = 1 skips the
    unconditional branch (it cancels out exactly).
    """
    if guidance_scale == 1.0:
        return lambda x, sigma: denoiser(x, sigma, **cond)
    both = {k: torch.cat([uncond[k], cond[k]]) for k in cond}

    def guided(x: torch.Tensor, sigma) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, device=x.device)
        sigma2 = torch.cat([sigma.reshape(-1).expand(x.shape[0])] * 2)       # (2B,)
        d_uncond, d_cond = denoiser(torch.cat([x, x]), sigma2, **both).chunk(2)
        return d_uncond + guidance_scale * (d_cond - d_uncond)

    return guided


def inpainting_denoiser(model: Callable, original: torch.Tensor, noise: torch.Tensor,
                        mask: torch.Tensor) -> Callable:
    """D(x, sigma) that paints only where `mask` is 1 and keeps `original` (clean latents) elsewhere:
    inpainting with a plain v1 model (4 latent channels).

    Outside the mask x is replaced by original + sigma·noise (the original re-noised to the current level,
    with the start noise) before the network sees it, and the estimate there is `original`; so every
    sampler ends on the original latents outside the mask (A1111's and diffusers' latent blending).
    """
    keep = 1 - mask

    def denoise(x: torch.Tensor, sigma) -> torch.Tensor:
        s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1)  # (B or 1, 1, 1, 1)
        x = mask * x + keep * (original + s * noise)
        return mask * model(x, sigma) + keep * original

    return denoise


def lcm_boundary_condition(model: Callable, alphas_cumprod: torch.Tensor, timestep_scaling: float = 10.0,
                           sigma_data: float = 0.5) -> Callable:
    """Return f(x, sigma) = c_skip(t)·x_vp + c_out(t)·D(x, sigma), LCM's consistency parametrisation.

    c_skip = σ_d²/((k·t)² + σ_d²) and c_out = k·t/sqrt((k·t)² + σ_d²) with k = timestep_scaling and x_vp =
    x/sqrt(1 + sigma²) (Song et al. 2023, §3; diffusers' LCMScheduler). At SD's LCM timesteps (t >= 19)
    c_skip < 7e-6 and 1 - c_out < 4e-6: the wrapper matters only for exact parity.
    """
    table = alphas_cumprod_to_sigmas(alphas_cumprod.double())

    def consistency(x: torch.Tensor, sigma) -> torch.Tensor:
        s = torch.as_tensor(sigma, dtype=torch.float64)
        s = s.reshape(-1, *([1] * (x.ndim - 1)))                                  # (B or 1, 1, 1, 1)
        scaled_t = sigma_to_t(s, table).double() * timestep_scaling
        c_skip = sigma_data**2 / (scaled_t**2 + sigma_data**2)
        c_out = scaled_t / (scaled_t**2 + sigma_data**2).sqrt()
        x_vp = x / (1 + s**2).sqrt()
        return (c_skip * x_vp + c_out * model(x, sigma)).to(x.dtype)

    return consistency


# --- ControlNet (Zhang et al. 2023), scheduled as diffusers' StableDiffusionControlNetPipeline does -------
# Two thin wrappers, used together; the networks themselves know nothing of the schedule:
#
#     net = controlled_unet(unet, units)                               # net(x, t, context, control_weights)
#     model = control_denoiser(Denoiser(net, alphas_cumprod), units, sigmas)   # D(x, sigma, **cond)
#
# `control_denoiser` turns sigma into the sampler's step and gives each unit its weight there (conditioning
# scale, or 0 outside its [start, end] fraction of the steps); `controlled_unet` runs the units that have a
# weight, sums their scaled residuals and adds them into the UNet. With classifier-free guidance, the cond
# dicts carry `conditional` (B,): 1 on the prompt's rows, 0 on the unconditional ones.

# A grid sigma cast to float32 (or to a half type in a sampler) is still found as its own step.
_SIGMA_RTOL = 1e-3
# A1111's ControlNet extension: "Balanced", "My prompt is more important", "ControlNet is more important".
CONTROL_MODES = ("balanced", "prompt", "controlnet")
SOFT_INJECTION_BASE = 0.825         # the extension's per-level decay: 0.825^12 < 0.01 for SD's 13 residuals


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
    control_mode: str = "balanced"  # A1111's: "prompt" ("My prompt is more important") scales residual k
    #                                 of n by 0.825^(n-1-k); "controlnet" also keeps them off the
    #                                 unconditional rows

    def __post_init__(self):
        if not 0.0 <= self.start < self.end <= 1.0:
            raise UserError(f"control guidance start and end must satisfy 0 <= start < end <= 1, "
                            f"got start={self.start} and end={self.end}")
        if self.control_mode not in CONTROL_MODES:
            raise UserError(f"unknown control mode {self.control_mode!r}; valid: {', '.join(CONTROL_MODES)}")
        if self.guess_mode and self.control_mode != "balanced":
            raise UserError("guess mode (diffusers') and an A1111 control mode other than balanced exclude "
                            "each other: choose one")
        if self.image.ndim != 4:
            raise UserError(f"a control image must be a (B, C, H, W) tensor, "
                            f"got shape {tuple(self.image.shape)}")

    @property
    def conditional_only(self) -> bool:
        """Whether the unconditional rows of classifier-free guidance get no residuals."""
        return self.guess_mode or self.pooled or self.control_mode == "controlnet"


def active_steps(num_steps: int, start: float, end: float) -> list[bool]:
    """Whether each of `num_steps` steps runs the ControlNet: step i does when i/N >= start and
    (i+1)/N <= end, diffusers' `controlnet_keep`."""
    return [not (i / num_steps < start or (i + 1) / num_steps > end) for i in range(num_steps)]


def guess_mode_scales(count: int) -> torch.Tensor:
    """(count,) factors 10^(k/(count-1) - 1), 0.1 for the first skip connection up to 1 for the middle block
    (diffusers' guess mode: the deeper the residual, the more it is trusted without a prompt)."""
    return torch.logspace(-1, 0, count, dtype=torch.float64)


def soft_injection_scales(count: int) -> torch.Tensor:
    """(count,) factors 0.825^(count-1-k), 1 for the middle block (A1111's "soft injection", used by its
    control modes other than balanced)."""
    return SOFT_INJECTION_BASE ** torch.arange(count - 1, -1, -1, dtype=torch.float64)


def level_scales(unit: ControlUnit, count: int) -> torch.Tensor | None:
    """The unit's factor on each of its `count` residuals (None: all 1)."""
    if unit.guess_mode and not unit.pooled:
        return guess_mode_scales(count)
    if unit.control_mode != "balanced":
        return soft_injection_scales(count)
    return None


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
    (`conditional` == 0) for units with `conditional_only`. `sigmas` is the grid the sampler runs."""
    num_steps = len(sigmas) - 1
    table = torch.tensor([[unit.scale * active for active in active_steps(num_steps, unit.start, unit.end)]
                          for unit in units], dtype=torch.float64).reshape(len(units), num_steps)
    conditional_only = torch.tensor([unit.conditional_only for unit in units], dtype=torch.bool)

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
    levels = level_scales(unit, len(residuals))
    if levels is not None:
        factors = factors * levels[None, :]                                     # (rows, residuals)
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
