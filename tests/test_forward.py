import pytest
import torch

from nanodiffusion.diffusion.denoisers import Denoiser
from nanodiffusion.diffusion.forward import diffusion_loss, min_snr_weights, q_sample, training_target
from nanodiffusion.diffusion.schedules import ScheduleConfig, alphas_cumprod_to_sigmas, get_alphas_cumprod

A = get_alphas_cumprod(ScheduleConfig("linear"))


@pytest.mark.parametrize("t", [0, 250, 999])
def test_q_sample_has_the_closed_form_mean_and_variance(t):
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((200_000,), 0.7, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    xt = q_sample(x0, torch.full((200_000,), t), noise, A)
    a = A[t].item()
    assert xt.mean().item() == pytest.approx(a**0.5 * 0.7, abs=4e-3)
    assert xt.var().item() == pytest.approx(1 - a, rel=1e-2, abs=1e-5)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_denoiser_inverts_every_prediction_target(prediction):
    """A network that returns the exact target makes the denoiser return the exact x0."""
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(4, 1, 5, 5, generator=g, dtype=torch.float64)
    noise = torch.randn(4, 1, 5, 5, generator=g, dtype=torch.float64)
    t = torch.tensor([3, 100, 500, 990])
    sigma = alphas_cumprod_to_sigmas(A)[t]
    x_ve = x0 + sigma.reshape(-1, 1, 1, 1) * noise
    x_vp = q_sample(x0, t, noise, A)

    def oracle(x_in, t_in):
        torch.testing.assert_close(x_in, x_vp)                  # the net sees the VP input...
        torch.testing.assert_close(t_in, t.float(), atol=1e-3, rtol=0)   # ...at its own timestep
        return training_target(prediction, x0, noise, t, A)

    denoised = Denoiser(oracle, A, prediction)(x_ve, sigma)
    torch.testing.assert_close(denoised, x0)


def test_min_snr_weights_cap_the_snr():
    t = torch.tensor([0, 500, 999])
    w = min_snr_weights("epsilon", t, A, gamma=5.0)
    snr = A[t] / (1 - A[t])
    torch.testing.assert_close(w.double(), (snr.clamp(max=5) / snr), rtol=1e-6, atol=0)
    assert w[0] < 1e-3 and w[-1] == pytest.approx(1.0)      # low-noise steps are down-weighted


def test_loss_is_weighted_mse():
    pred, target = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    target[1] *= 2
    assert diffusion_loss(pred, target).item() == pytest.approx(2.5)
    assert diffusion_loss(pred, target, torch.tensor([1.0, 0.0])).item() == pytest.approx(0.5)
