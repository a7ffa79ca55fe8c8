"""The DPM++ SDE family, Restart and TCD on exact Gaussian data (STYLE §8.1), their noise and options."""

import math

import pytest
import torch

from nanodiffusion.diffusion.sampler_noise import brownian_noise, churn
from nanodiffusion.diffusion.sampler_options import NOISE_OPTIONS, check_options, schedule_inputs
from nanodiffusion.diffusion.samplers import SAMPLERS, sampler_options
from nanodiffusion.diffusion.samplers_onestep import sample_ddim, sample_heun
from nanodiffusion.diffusion.samplers_restart import restart_segments
from nanodiffusion.diffusion.sampling_plan import make_sigmas
from nanodiffusion.diffusion.schedules import (
    ScheduleConfig, alphas_cumprod_to_sigmas, get_alphas_cumprod, get_sigmas_from_timesteps,
    get_sigmas_karras, get_timesteps,
)
from nanodiffusion.errors import UserError

from gaussian_data import MU, S, gaussian_consistency, gaussian_denoiser, start

SD_ALPHAS_CUMPROD = get_alphas_cumprod(ScheduleConfig("scaled_linear"))


# DPM++ 3M SDE is 2nd order, like k-diffusion's which it retraces: its D2 term (Lu et al. 2022b's 3M
# update) is half what a D quadratic in lambda needs, so its steps are exact only up to D linear in lambda
@pytest.mark.parametrize("name, order", [
    ("dpmpp_2s_ancestral", 2), ("dpmpp_sde", 2), ("dpmpp_2m_sde_heun", 2), ("dpmpp_2m_sde", 2),
    ("dpmpp_3m_sde", 2),
])
def test_sde_samplers_without_noise_converge_at_their_order(name, order):
    """eta = 0 leaves the ODE solver; the grid stops at sigma_min so the error is the solver's alone."""
    sigma_min, sigma_max = 0.02, 80.0
    noise, x_T = start(10_000, sigma_max)
    exact = MU + noise * (S**2 + sigma_min**2) ** 0.5
    errors = []
    for n in (160, 320):
        sigmas = get_sigmas_karras(n, sigma_min, sigma_max)[:-1]
        errors.append((SAMPLERS[name].function(gaussian_denoiser, x_T, sigmas, eta=0.0) - exact).abs().max())
    assert errors[1] < 1e-3
    assert errors[0] / errors[1] > 0.85 * 2**order


def _discrete_sigmas(steps):
    table = alphas_cumprod_to_sigmas(get_alphas_cumprod(ScheduleConfig("linear")))
    return get_sigmas_from_timesteps(get_timesteps(steps, 1000, "leading"), table)


@pytest.mark.parametrize("name, options", [
    ("dpmpp_2s_ancestral", {}), ("dpmpp_2s_ancestral", {"eta": 0.5}), ("dpmpp_sde", {}),
    ("dpmpp_sde", {"eta": 0.5, "r": 0.3}), ("dpmpp_2m_sde_heun", {}), ("dpmpp_3m_sde", {}),
    ("dpmpp_3m_sde", {"eta": 0.5}), ("restart", {}), ("euler", {"s_churn": 40.0}),
    ("heun", {"s_churn": 40.0, "s_tmin": 0.05, "s_tmax": 50.0}), ("dpm_2", {"s_churn": 40.0}),
])
def test_stochastic_samplers_end_with_the_data_distribution(name, options):
    sigmas = _discrete_sigmas(1000)              # the tutorial chain; Restart restarts twice (from 36 steps)
    _, x_T = start(40_000, float(sigmas[0]))
    x = SAMPLERS[name].function(gaussian_denoiser, x_T, sigmas, generator=torch.Generator().manual_seed(1),
                                **options)
    assert x.mean().item() == pytest.approx(MU, abs=0.01)
    assert x.std().item() == pytest.approx(S, rel=0.02)


def test_s_noise_scales_the_fresh_noise_and_zero_leaves_the_ode_step():
    sigmas = get_sigmas_karras(10, 0.03, 14.6)
    _, x_T = start(2000, 14.6)
    run = lambda **o: SAMPLERS["euler_ancestral"].function(gaussian_denoiser, x_T, sigmas,      # noqa: E731
                                                           generator=torch.Generator().manual_seed(3), **o)
    no_noise = run(s_noise=0.0)
    # with s_noise = 0 the ancestral step is the Euler step to sigma_down and nothing else
    down = x_T
    for sigma, sigma_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        sigma_down = sigma_next**2 / sigma                              # eta = 1: sigma_down = sigma'²/sigma
        down = down + (down - gaussian_denoiser(down, sigma)) / sigma * (sigma_down - sigma)
    torch.testing.assert_close(no_noise, down)
    # the denoiser is affine, so the sample is affine in the noise: twice s_noise, twice the deviation
    ratio = (run(s_noise=2.0) - no_noise).norm() / (run() - no_noise).norm()
    assert ratio.item() == pytest.approx(2.0, rel=1e-9)


def test_churn_raises_sigma_only_inside_its_window_and_draws_only_then():
    x, draws = torch.zeros(1000, dtype=torch.float64), []
    noise = lambda sigma, sigma_hat: draws.append(sigma) or torch.ones_like(x)                  # noqa: E731
    x_hat, sigma_hat = churn(x, 2.0, noise, 10, s_churn=1.0, s_tmin=1.0, s_tmax=3.0, s_noise=0.5)
    assert sigma_hat == pytest.approx(2.2) and draws == [2.0]          # gamma = s_churn / num_steps = 0.1
    torch.testing.assert_close(x_hat, torch.full_like(x, 0.5 * math.sqrt(2.2**2 - 4)))
    assert churn(x, 5.0, noise, 10, 1.0, 1.0, 3.0, 1.0) == (x, 5.0) and draws == [2.0]
    assert churn(x, 2.0, noise, 2, 80.0, 0.0, math.inf, 1.0)[1] == pytest.approx(2 * math.sqrt(2))  # capped


def test_brownian_noise_has_brownian_increments_across_nested_queries():
    """Queries [a, c] then [a, b] inside it: each is N(0, 1), and corr = sqrt((a - c) / (a - b))."""
    x = torch.zeros(200_000, dtype=torch.float64)
    noise = brownian_noise(x, torch.Generator().manual_seed(0))
    first, second = noise(10.0, 6.0), noise(10.0, 2.0)
    for draw in (first, second):
        assert draw.mean().item() == pytest.approx(0, abs=0.01)
        assert draw.std().item() == pytest.approx(1, abs=0.01)
    assert (first * second).mean().item() == pytest.approx(math.sqrt(4 / 8), abs=0.01)
    later = noise(2.0, 1.0)                                            # a new interval: independent
    assert (later * second).mean().item() == pytest.approx(0, abs=0.01)
    bridge = brownian_noise(x, torch.Generator().manual_seed(1))
    whole, part = bridge(10.0, 2.0), bridge(10.0, 6.0)                 # the inner point comes from the bridge
    assert part.std().item() == pytest.approx(1, abs=0.01)
    assert (whole * part).mean().item() == pytest.approx(math.sqrt(4 / 8), abs=0.01)


def test_restart_below_20_steps_is_heun_and_its_plan_from_20_steps_on():
    sigmas = get_sigmas_karras(12, 0.0292, 14.6146)
    _, x_T = start(100, 14.6146)
    torch.testing.assert_close(SAMPLERS["restart"].function(gaussian_denoiser, x_T, sigmas),
                               sample_heun(gaussian_denoiser, x_T, sigmas))
    plans = [(20, 11, 9, 1), (35, 26, 9, 1), (36, 18, 9, 2), (50, 26, 12, 2)]      # n, main walk, R, K
    for n, main, restart_steps, restart_times in plans:
        segments = restart_segments(get_sigmas_karras(n, 0.0292, 14.6146))
        grid = get_sigmas_karras(main, 0.0292, 14.6146).tolist()
        assert len(segments) == n                                        # the step budget is kept
        ups = [k for k in range(1, n) if segments[k][0] > segments[k - 1][1]]
        assert len(ups) == restart_times
        low = min(grid, key=lambda s: abs(s - 0.1))                      # restarts from the sigma nearest 0.1
        high = min(grid, key=lambda s: abs(s - 2.0))                      # back up to the one nearest 2
        for k in ups:
            assert segments[k - 1][1] == pytest.approx(low) and segments[k][0] == pytest.approx(high)
            assert segments[k + restart_steps - 1][1] == pytest.approx(low)
        main_walk = [s for k, s in enumerate(segments) if not any(u <= k < u + restart_steps for u in ups)]
        assert main_walk == [pytest.approx(pair) for pair in zip(grid[:-1], grid[1:])]


@pytest.mark.parametrize("eta", [0.3, 1.0])
def test_tcd_is_ddim_at_eta_0_and_its_noise_keeps_the_gaussian_chain_variance(eta):
    sigmas = make_sigmas("tcd", 4, SD_ALPHAS_CUMPROD)
    _, x_T = start(40_000, float(sigmas[0]))
    tcd = SAMPLERS["tcd"].function
    torch.testing.assert_close(tcd(gaussian_denoiser, x_T, sigmas, alphas_cumprod=SD_ALPHAS_CUMPROD, eta=0.0),
                               sample_ddim(gaussian_denoiser, x_T, sigmas))
    x = tcd(gaussian_consistency, x_T, sigmas, alphas_cumprod=SD_ALPHAS_CUMPROD, eta=eta,
            generator=torch.Generator().manual_seed(2))
    # every step is affine in x - MU plus fresh noise: x0 - MU = a·(x - MU), a = S/sqrt(S² + sigma²), then
    # x_s = x0 + sigma_s·(x - x0)/sigma, then noise of variance sigma'² - sigma_s², sigma_s at (1 - eta)·t'
    table, variance = alphas_cumprod_to_sigmas(SD_ALPHAS_CUMPROD), S**2 + float(sigmas[0]) ** 2
    for t_next, sigma, sigma_next in zip([759, 499, 259, 0], sigmas[:-1].tolist(), sigmas[1:].tolist()):
        sigma_s = float(table[math.floor((1 - eta) * t_next)])
        a = S / (S**2 + sigma**2) ** 0.5
        variance = (a + sigma_s * (1 - a) / sigma) ** 2 * variance + sigma_next**2 - sigma_s**2
    assert x.mean().item() == pytest.approx(MU, abs=0.01)
    assert x.std().item() == pytest.approx(variance**0.5, rel=0.01)
    with pytest.raises(UserError, match="eta"):
        tcd(gaussian_denoiser, x_T, sigmas, alphas_cumprod=SD_ALPHAS_CUMPROD, eta=1.5)


def test_options_api_lists_what_each_sampler_takes():
    assert sampler_options("euler_ancestral") == {"eta": 1.0, "s_noise": 1.0}
    assert set(sampler_options("euler")) == {"s_churn", "s_tmin", "s_tmax", "s_noise"}
    assert sampler_options("dpmpp_sde") == {"eta": 1.0, "s_noise": 1.0, "r": 0.5}
    assert sampler_options("tcd") == {"eta": 0.3} and sampler_options("dpmpp_2m") == {}
    assert schedule_inputs(SAMPLERS["tcd"].function, SD_ALPHAS_CUMPROD)["alphas_cumprod"] is SD_ALPHAS_CUMPROD
    assert schedule_inputs(SAMPLERS["euler"].function, SD_ALPHAS_CUMPROD) == {}
    takes_eta = {name for name in SAMPLERS if "eta" in sampler_options(name)}
    assert takes_eta == {"ddim", "euler_ancestral", "dpm_2_ancestral", "dpmpp_2m_sde", "dpmpp_2s_ancestral",
                         "dpmpp_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde", "tcd"}
    neutral = {"s_noise": 1.0, "s_churn": 0.0, "s_tmin": 0.0, "s_tmax": math.inf}
    for name in SAMPLERS:                         # unset standard options change nothing
        for option, default in sampler_options(name).items():
            assert option not in neutral or default == neutral[option], (name, option)
    assert set(NOISE_OPTIONS) == {"eta", *neutral}
    with pytest.raises(UserError, match="'dpmpp_2m' takes no option eta; its options: none"):
        check_options("dpmpp_2m", SAMPLERS["dpmpp_2m"].function, {"eta": 0.5})
    check_options("euler", SAMPLERS["euler"].function, {"s_churn": 1.0})
