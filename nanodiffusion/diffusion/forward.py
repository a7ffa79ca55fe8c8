"""The forward process q(x_t | x_0) in closed form, training targets and the diffusion loss (Ho et al. 2020)."""

import torch

from nanodiffusion.errors import UserError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _per_sample(values: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """Gather values[t] and shape them (B, 1, ..., 1) to broadcast against a (B, ...) batch."""
    return values.to(t.device)[t].reshape(-1, *([1] * (ndim - 1)))


def q_sample(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Return x_t = sqrt(ᾱ_t)·x0 + sqrt(1 - ᾱ_t)·noise, a draw from q(x_t | x_0) (Ho et al. eq. 4).

    `t` holds integer timesteps (B,); the result has x0's dtype.
    """
    a = _per_sample(alphas_cumprod, t, x0.ndim)
    return (a.sqrt() * x0 + (1 - a).sqrt() * noise).to(x0.dtype)


def training_target(prediction: str, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                    alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Return what the network learns to predict: eps, v = sqrt(ᾱ)·eps - sqrt(1-ᾱ)·x0 (Salimans & Ho 2022), or x0."""
    if prediction == "epsilon":
        return noise
    if prediction == "sample":
        return x0
    if prediction == "v_prediction":
        a = _per_sample(alphas_cumprod, t, x0.ndim)
        return (a.sqrt() * noise - (1 - a).sqrt() * x0).to(x0.dtype)
    raise UserError(f"unknown prediction type {prediction!r}; valid: {', '.join(PREDICTION_TYPES)}")


def min_snr_weights(prediction: str, t: torch.Tensor, alphas_cumprod: torch.Tensor,
                    gamma: float = 5.0) -> torch.Tensor:
    """Return per-sample loss weights min(SNR, gamma) expressed for the prediction type (Hang et al. 2023, eq. 9).

    SNR_t = ᾱ_t / (1 - ᾱ_t); the eps-loss weight is min(SNR, γ)/SNR, the v-loss weight min(SNR, γ)/(SNR + 1).
    """
    a = alphas_cumprod.to(t.device)[t]
    snr = a / (1 - a)
    clipped = snr.clamp(max=gamma)
    if prediction == "epsilon":
        return (clipped / snr).float()
    if prediction == "v_prediction":
        return (clipped / (snr + 1)).float()
    return clipped.float()


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Return the "simple" loss: mean squared error over every pixel, optionally weighted per sample."""
    per_sample = (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)   # (B,)
    if weights is not None:
        per_sample = per_sample * weights
    return per_sample.mean()
