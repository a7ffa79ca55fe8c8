"""Parity with k-diffusion (STYLE §8.2), the samplers A1111 and ComfyUI run: on the exact denoiser of Gaussian
data and the same injected noise, ours equal k-diffusion's in float64 to 1e-10 (achieved: 3e-15)."""

import math

import pytest
import torch

from nanodiffusion.diffusion.samplers import SAMPLERS
from nanodiffusion.diffusion.samplers_restart import restart_segments
from nanodiffusion.diffusion.schedules import get_sigmas_karras

from gaussian_data import S, gaussian_denoiser
from kdiffusion_oracle import load_k_diffusion

SHAPE = (3, 500)
TOLERANCE = 1e-10


@pytest.fixture(scope="module")
def kdiffusion():
    return load_k_diffusion()


def injected_noise(seed=0):
    """k-diffusion's noise_sampler interface, returning the same N(0, I) sequence for every instance."""
    generator = torch.Generator().manual_seed(seed)
    return lambda sigma, sigma_next: torch.randn(SHAPE, generator=generator, dtype=torch.float64)


def _start(sigmas):
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return noise * (S**2 + float(sigmas[0]) ** 2) ** 0.5


@pytest.mark.parametrize("name, options", [
    ("dpmpp_2s_ancestral", {}), ("dpmpp_2s_ancestral", {"eta": 0.6, "s_noise": 1.3}),
    ("dpmpp_sde", {}), ("dpmpp_sde", {"eta": 0.7, "s_noise": 0.8, "r": 0.3}), ("dpmpp_sde", {"eta": 0.0}),
    ("dpmpp_2m_sde", {}), ("dpmpp_2m_sde", {"solver_type": "heun", "eta": 0.5}), ("dpmpp_3m_sde", {}),
    ("dpmpp_3m_sde", {"eta": 0.4, "s_noise": 1.2}), ("dpmpp_3m_sde", {"eta": 0.0}),
    ("euler_ancestral", {"eta": 0.8, "s_noise": 1.1}), ("dpm_2_ancestral", {"eta": 0.8, "s_noise": 1.1}),
    ("euler", {}), ("heun", {}), ("dpm_2", {}), ("dpmpp_2m", {}), ("lms", {}),
])
def test_sampler_equals_k_diffusion_on_the_same_noise(kdiffusion, name, options):
    sigmas = get_sigmas_karras(12, 0.0292, 14.6146)
    x_T = _start(sigmas)
    reference = getattr(kdiffusion.sampling, f"sample_{name}")
    stochastic = name not in ("euler", "heun", "dpm_2", "dpmpp_2m", "lms")
    noise = lambda: {"noise_sampler": injected_noise()} if stochastic else {}                 # noqa: E731
    theirs = reference(gaussian_denoiser, x_T, sigmas, disable=True, **options, **noise())
    ours = SAMPLERS[name].function(gaussian_denoiser, x_T, sigmas, **options, **noise())
    assert (ours - theirs).abs().max().item() < TOLERANCE


def test_dpmpp_2m_sde_heun_is_k_diffusions_heun_solver_type(kdiffusion):
    sigmas = get_sigmas_karras(12, 0.0292, 14.6146)
    x_T = _start(sigmas)
    theirs = kdiffusion.sampling.sample_dpmpp_2m_sde(gaussian_denoiser, x_T, sigmas, disable=True,
                                                      solver_type="heun", noise_sampler=injected_noise())
    ours = SAMPLERS["dpmpp_2m_sde_heun"].function(gaussian_denoiser, x_T, sigmas,
                                                  noise_sampler=injected_noise())
    assert (ours - theirs).abs().max().item() < TOLERANCE


class _RandnLikeByCall:
    """Stands in for `torch` inside k-diffusion's sampling module: randn_like returns draws[call number]."""

    def __init__(self, draws):
        self.draws, self.calls = draws, 0

    def __getattr__(self, name):
        return getattr(torch, name)

    def randn_like(self, x):
        self.calls += 1
        return self.draws[self.calls - 1]


@pytest.mark.parametrize("name", ["euler", "heun", "dpm_2"])
@pytest.mark.parametrize("window", [(0.0, math.inf), (0.5, 5.0)])
def test_churn_equals_k_diffusion(kdiffusion, monkeypatch, name, window):
    """k-diffusion draws churn noise at every step, used or not; ours only where it churns: step i's noise is
    draws[i] on both sides."""
    sigmas = get_sigmas_karras(10, 0.0292, 14.6146)
    x_T = _start(sigmas)
    draws = torch.randn(10, *SHAPE, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    options = {"s_churn": 5.0, "s_tmin": window[0], "s_tmax": window[1], "s_noise": 1.05}
    monkeypatch.setattr(kdiffusion.sampling, "torch", _RandnLikeByCall(draws))
    theirs = getattr(kdiffusion.sampling, f"sample_{name}")(gaussian_denoiser, x_T, sigmas, disable=True,
                                                            **options)
    steps = sigmas.tolist()
    by_step = lambda sigma, sigma_hat: draws[steps.index(sigma)]                            # noqa: E731
    ours = SAMPLERS[name].function(gaussian_denoiser, x_T, sigmas, noise_sampler=by_step, **options)
    assert (ours - theirs).abs().max().item() < TOLERANCE


@pytest.mark.parametrize("num_steps", [12, 24, 40])
def test_restart_is_k_diffusions_heun_on_its_plan_with_the_restart_noise(kdiffusion, num_steps):
    """A1111's Restart: k-diffusion's Heun step on each segment, and noise sqrt(sigma² - last²) going up."""
    sigmas = get_sigmas_karras(num_steps, 0.0292, 14.6146)
    x_T = _start(sigmas)
    noise, x, last = injected_noise(), x_T, None
    for sigma, sigma_next in restart_segments(sigmas):
        if last is not None and sigma > last:
            x = x + noise(last, sigma) * math.sqrt(sigma**2 - last**2)
        pair = torch.tensor([sigma, sigma_next], dtype=torch.float64)
        x, last = kdiffusion.sampling.sample_heun(gaussian_denoiser, x, pair, disable=True), sigma_next
    ours = SAMPLERS["restart"].function(gaussian_denoiser, x_T, sigmas, noise_sampler=injected_noise())
    assert (ours - x).abs().max().item() < TOLERANCE
