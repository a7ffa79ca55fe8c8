"""Samplers driven by the exact denoiser of Gaussian data N(mu, s²) (STYLE §8.1)."""

import pytest
import torch

from nanodiffusion.diffusion.guidance import cfg_denoiser
from nanodiffusion.diffusion.samplers import (
    SAMPLERS, get_sampler, sample_ddim, sample_ddpm, sample_dpmpp_2m, sample_euler, sample_heun,
)
from nanodiffusion.diffusion.schedules import (
    ScheduleConfig, alphas_cumprod_to_sigmas, get_alphas_cumprod, get_sigmas_from_timesteps, get_sigmas_karras,
    get_timesteps,
)
from nanodiffusion.errors import UserError

MU, S = 0.3, 0.5


def gaussian_denoiser(x, sigma):
    """The optimal denoiser E[x0 | x] for x0 ~ N(MU, S²) and x = x0 + sigma·eps."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype)
    return MU + (x - MU) * S**2 / (S**2 + sigma**2)


def start(n, sigma_max, seed=0):
    noise = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return noise, MU + noise * (S**2 + sigma_max**2) ** 0.5


@pytest.mark.parametrize("sampler, order", [(sample_euler, 1), (sample_heun, 2), (sample_dpmpp_2m, 2),
                                            (sample_ddim, 1)])
def test_ode_samplers_converge_at_their_order(sampler, order):
    sigma_max = 80.0
    noise, x_T = start(10_000, sigma_max)
    exact = MU + noise * S                           # x(σ) - μ scales by sqrt((s²+σ²)/(s²+σ0²)) along the flow
    errors = []
    for n in (20, 40):
        sigmas = get_sigmas_karras(n, sigma_min=0.02, sigma_max=sigma_max)
        errors.append((sampler(gaussian_denoiser, x_T, sigmas) - exact).abs().max())
    assert errors[1] < (0.2 if order == 1 else 0.02)
    assert errors[0] / errors[1] > 0.85 * 2**order


def test_ddim_eta0_is_euler():
    _, x_T = start(100, 14.6)
    sigmas = get_sigmas_karras(15, 0.03, 14.6)
    torch.testing.assert_close(sample_ddim(gaussian_denoiser, x_T, sigmas),
                               sample_euler(gaussian_denoiser, x_T, sigmas))


def _discrete_sigmas(kind, steps):
    config = ScheduleConfig(kind)
    table = alphas_cumprod_to_sigmas(get_alphas_cumprod(config))
    return get_sigmas_from_timesteps(get_timesteps(steps, 1000, "leading"), table)


@pytest.mark.parametrize("name, options", [
    ("ddpm", {"variance": "beta_tilde"}), ("ddpm", {"variance": "beta"}), ("ddim", {"eta": 1.0}),
    ("ddim", {"eta": 0.5}), ("euler_ancestral", {}),
])
def test_stochastic_samplers_end_with_the_data_distribution(name, options):
    sigmas = _discrete_sigmas("linear", 1000)       # the tutorial's full 1000-step reverse process
    _, x_T = start(40_000, float(sigmas[0]))
    g = torch.Generator().manual_seed(1)
    x = SAMPLERS[name](gaussian_denoiser, x_T, sigmas, generator=g, **options)
    assert x.mean().item() == pytest.approx(MU, abs=0.01)
    assert x.std().item() == pytest.approx(S, rel=0.02)


def test_ddpm_variance_choices_bracket_the_data_std_with_few_steps():
    """With large steps, beta_tilde (posterior variance) undershoots the std and beta overshoots it (Ho §3.2)."""
    sigmas = _discrete_sigmas("linear", 100)
    _, x_T = start(40_000, float(sigmas[0]))
    std = {v: sample_ddpm(gaussian_denoiser, x_T, sigmas, variance=v,
                          generator=torch.Generator().manual_seed(0)).std().item() for v in ("beta_tilde", "beta")}
    assert 0.9 * S < std["beta_tilde"] < S < std["beta"] < 1.1 * S


def test_ddim_eta1_equals_ddpm_posterior_variance():
    sigmas = _discrete_sigmas("scaled_linear", 25)
    _, x_T = start(1000, float(sigmas[0]))
    a = sample_ddim(gaussian_denoiser, x_T, sigmas, eta=1.0, generator=torch.Generator().manual_seed(5))
    b = sample_ddpm(gaussian_denoiser, x_T, sigmas, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b)


def test_same_generator_seed_gives_the_same_samples_and_callback_sees_every_step():
    sigmas = _discrete_sigmas("cosine", 10)
    _, x_T = start(16, float(sigmas[0]))
    seen = []
    a = sample_ddpm(gaussian_denoiser, x_T, sigmas, generator=torch.Generator().manual_seed(7),
                    callback=lambda i, x, d: seen.append(i))
    b = sample_ddpm(gaussian_denoiser, x_T, sigmas, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and seen == list(range(10))


def test_guidance_scale_one_is_the_conditional_prediction_and_scales_linearly():
    def denoiser(x, sigma, y):
        return x * 0.5 + y.reshape(-1, 1)

    x = torch.randn(3, 4)
    cond, uncond = {"y": torch.tensor([1.0, 2.0, 3.0])}, {"y": torch.zeros(3)}
    torch.testing.assert_close(cfg_denoiser(denoiser, cond, uncond, 1.0)(x, 1.0), denoiser(x, 1.0, **cond))
    guided = cfg_denoiser(denoiser, cond, uncond, 3.0)(x, torch.tensor(1.0))
    torch.testing.assert_close(guided, x * 0.5 + 3 * cond["y"].reshape(-1, 1))


def test_unknown_sampler_lists_the_valid_names():
    with pytest.raises(UserError, match="euler.*heun"):
        get_sampler("nope")
