"""What the two denoising trainers (pixel-space DDPM and the latent text-to-image UNet) share: the settings of
the objective and its loss, the "simple" MSE of Ho et al. 2020 (eq. 14) on an ε, v or x0 target, optionally
weighted by min-SNR (Hang et al. 2023)."""

from dataclasses import dataclass

import torch

from nanodiffusion.diffusion.forward import PREDICTION_TYPES, diffusion_loss, min_snr_weights, training_target
from nanodiffusion.errors import UserError
from nanodiffusion.training.run_state import LoopConfig
from nanodiffusion.validation import check_float


@dataclass(frozen=True)
class DenoisingConfig(LoopConfig):
    """LoopConfig plus the denoising objective and the EMA of the weights."""

    ema_decay: float = 0.999
    prediction: str = "epsilon"
    min_snr_gamma: float | None = None    # Hang et al. 2023; None = the simple unweighted loss

    def __post_init__(self):
        super().__post_init__()
        if self.prediction not in PREDICTION_TYPES:
            raise UserError(f"unknown prediction type {self.prediction!r}; "
                            f"valid: {', '.join(PREDICTION_TYPES)}")
        if not 0 <= check_float("ema_decay", self.ema_decay) < 1:
            raise UserError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.min_snr_gamma is not None:
            check_float("min_snr_gamma", self.min_snr_gamma, above=0)


def denoising_loss(config: DenoisingConfig, pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor,
                   t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of the (min-SNR weighted) squared error of `pred` against the configured target."""
    target = training_target(config.prediction, x0, noise, t, alphas_cumprod)
    weights = (min_snr_weights(config.prediction, t, alphas_cumprod, config.min_snr_gamma)
               if config.min_snr_gamma else None)
    return diffusion_loss(pred, target, weights)
