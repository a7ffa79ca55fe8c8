"""Samplers driven by the exact denoiser of Gaussian data N(mu, s²) (STYLE §8.1), and their sigma grids."""

import numpy as np
import pytest
import torch

from nanodiffusion.diffusion.denoisers import cfg_denoiser
from nanodiffusion.diffusion.sampler_options import schedule_inputs
from nanodiffusion.diffusion.samplers import SAMPLERS, get_sampler, resolve_sampler
from nanodiffusion.diffusion.samplers_dpmpp import sample_dpmpp_2m, sample_dpmpp_2m_sde
from nanodiffusion.diffusion.samplers_multistep import lms_coefficient
from nanodiffusion.diffusion.samplers_onestep import (
    sample_ddim, sample_ddpm, sample_euler, sample_heun, sample_lcm,
)
from nanodiffusion.diffusion.sampling_plan import final_latent, initial_noise_scale, make_sigmas
from nanodiffusion.diffusion.schedules import (
    ScheduleConfig, alphas_cumprod_to_sigmas, get_alphas_cumprod, get_sigmas_from_timesteps, get_sigmas_karras,
    get_timesteps,
)
from nanodiffusion.errors import UserError

from gaussian_data import MU, S, gaussian_consistency, gaussian_denoiser, start


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


@pytest.mark.parametrize("name, options, order", [
    ("heun", {}, 2), ("dpm_2", {}, 2), ("dpmpp_2m", {}, 2), ("lms", {}, 4),
    ("plms", {}, 2),                     # Adams-Bashforth weights for equal steps: 2nd order on a Karras grid
    ("unipc", {}, 3), ("unipc", {"variant": "bh1"}, 3),      # UniC raises UniP-2 by one order (Zhao et al.)
])
def test_higher_order_samplers_converge_at_their_order_before_the_last_jump(name, options, order):
    """The grid stops at sigma_min, so the error is the solver's alone (a jump to 0 adds O(sigma_min²))."""
    sigma_min, sigma_max = 0.02, 80.0
    noise, x_T = start(10_000, sigma_max)
    exact = MU + noise * (S**2 + sigma_min**2) ** 0.5
    errors = []
    for n in (80, 160):                  # past the warm-up steps of the multistep methods
        sigmas = get_sigmas_karras(n, sigma_min, sigma_max)[:-1]
        x = SAMPLERS[name].function(gaussian_denoiser, x_T, sigmas, **options)
        errors.append((x - exact).abs().max())
    assert errors[1] < 5e-3
    assert errors[0] / errors[1] > 0.85 * 2**order


def test_lms_coefficients_integrate_the_interpolating_polynomial():
    sigmas = [10.0, 6.0, 3.5, 2.0, 1.1]
    # the 4 coefficients of a step integrate any cubic through the 4 last nodes exactly
    cubic = lambda s: 0.3 * s**3 - s**2 + 2 * s - 1                                   # noqa: E731
    antiderivative = lambda s: 0.075 * s**4 - s**3 / 3 + s**2 - s                    # noqa: E731
    i = 3
    total = sum(lms_coefficient(sigmas, i, j, 4) * cubic(sigmas[i - j]) for j in range(4))
    assert total == pytest.approx(antiderivative(sigmas[i + 1]) - antiderivative(sigmas[i]), rel=1e-12)
    assert lms_coefficient(sigmas, 0, 0, 1) == pytest.approx(sigmas[1] - sigmas[0])   # order 1 is Euler


def test_dpmpp_2m_sde_with_eta0_is_dpmpp_2m():
    _, x_T = start(100, 14.6)
    sigmas = get_sigmas_karras(15, 0.03, 14.6)
    torch.testing.assert_close(sample_dpmpp_2m_sde(gaussian_denoiser, x_T, sigmas, eta=0.0),
                               sample_dpmpp_2m(gaussian_denoiser, x_T, sigmas))


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
    ("ddim", {"eta": 0.5}), ("euler_ancestral", {}), ("dpm_2_ancestral", {}), ("dpmpp_2m_sde", {}),
    ("dpmpp_2m_sde", {"eta": 0.5}),
])
def test_stochastic_samplers_end_with_the_data_distribution(name, options):
    sigmas = _discrete_sigmas("linear", 1000)       # the tutorial's full 1000-step reverse process
    _, x_T = start(40_000, float(sigmas[0]))
    g = torch.Generator().manual_seed(1)
    x = SAMPLERS[name].function(gaussian_denoiser, x_T, sigmas, generator=g, **options)
    assert x.mean().item() == pytest.approx(MU, abs=0.01)
    assert x.std().item() == pytest.approx(S, rel=0.02)


@pytest.mark.parametrize("steps", [1, 4])
def test_lcm_with_the_exact_consistency_function_samples_the_data_at_any_step_count(steps):
    sigmas = make_sigmas("lcm", steps, get_alphas_cumprod(ScheduleConfig("scaled_linear")))
    _, x_T = start(40_000, float(sigmas[0]))
    x = sample_lcm(gaussian_consistency, x_T, sigmas, generator=torch.Generator().manual_seed(2))
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


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_is_reproducible_keeps_shapes_and_reports_every_step(name):
    sigmas = make_sigmas(name, 6, SD_ALPHAS_CUMPROD)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    x_T = noise * initial_noise_scale(name, sigmas)
    seen = []
    function = SAMPLERS[name].function
    inputs = schedule_inputs(function, SD_ALPHAS_CUMPROD)                             # TCD's timesteps
    a = function(gaussian_denoiser, x_T, sigmas, generator=torch.Generator().manual_seed(7),
                 callback=lambda i, x, d: seen.append((i, x.shape, d.shape)), **inputs)
    b = function(gaussian_denoiser, x_T, sigmas, generator=torch.Generator().manual_seed(7), **inputs)
    assert torch.equal(a, b) and a.shape == x_T.shape and a.dtype == x_T.dtype and torch.isfinite(a).all()
    assert seen == [(i, x_T.shape, x_T.shape) for i in range(6)]


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


# --- sigma grids (sampling_plan): the diffusers timestep rules, checked here without diffusers -------------

SD_ALPHAS_CUMPROD = get_alphas_cumprod(ScheduleConfig("scaled_linear"))
SD_SIGMAS = alphas_cumprod_to_sigmas(SD_ALPHAS_CUMPROD)


def test_every_name_of_a_sampler_resolves_to_it():
    assert len(SAMPLERS) >= 12
    for name, sampler in SAMPLERS.items():
        assert sampler.grid.family in ("discrete", "k", "multistep", "lcm")
        assert {resolve_sampler(alias) for alias in (name, sampler.a1111, *sampler.aliases)} == {name}
        assert get_sampler(sampler.a1111) is sampler.function


def test_spacings_round_like_diffusers_numpy_formulas_for_every_step_count():
    for n in range(1, 1001):
        linspace = np.linspace(0, 999, n).round()[::-1]                 # DDIM/DDPM/PNDM "linspace"
        trailing = np.round(np.arange(1000, 0, -1000 / n))[:n] - 1      # np.arange can give n + 1 values
        assert np.array_equal(get_timesteps(n, 1000, "linspace").round().numpy(), linspace)
        assert np.array_equal(get_timesteps(n, 1000, "trailing").numpy(), trailing)


def test_ddim_grid_is_leading_with_offset_and_ends_at_alpha_bar_0():
    sigmas = make_sigmas("ddim", 10, SD_ALPHAS_CUMPROD)
    torch.testing.assert_close(sigmas[:-1], SD_SIGMAS[[901, 801, 701, 601, 501, 401, 301, 201, 101, 1]])
    assert sigmas[-1] == SD_SIGMAS[0]                                  # set_alpha_to_one=False
    assert make_sigmas("ddpm", 10, SD_ALPHAS_CUMPROD)[-1] == 0          # DDPMScheduler always ends at ᾱ = 1


def test_multistep_grid_spaces_n_plus_1_points_and_k_grid_interpolates_sigma_linearly():
    sigmas = make_sigmas("dpmpp_2m", 10, SD_ALPHAS_CUMPROD)
    torch.testing.assert_close(sigmas[:-1], SD_SIGMAS[[999, 899, 799, 699, 599, 500, 400, 300, 200, 100]])
    euler = make_sigmas("euler", 3, SD_ALPHAS_CUMPROD)                  # linspace timesteps 999, 499.5, 0
    torch.testing.assert_close(euler, torch.stack([SD_SIGMAS[999], (SD_SIGMAS[499] + SD_SIGMAS[500]) / 2,
                                                   SD_SIGMAS[0], torch.tensor(0.0, dtype=torch.float64)]))


def test_lcm_grid_picks_from_the_50_distillation_timesteps():
    sigmas = make_sigmas("lcm", 4, SD_ALPHAS_CUMPROD)
    torch.testing.assert_close(sigmas[:-1], SD_SIGMAS[[999, 759, 499, 259]])
    assert sigmas[-1] == 0


def test_karras_grids_span_the_table_for_multistep_and_the_spaced_grid_for_k_samplers():
    multistep = make_sigmas("dpmpp_2m", 8, SD_ALPHAS_CUMPROD, sigma_schedule="karras", spacing="leading")
    torch.testing.assert_close(multistep[[0, -2]], SD_SIGMAS[[-1, 0]])
    k = make_sigmas("euler", 8, SD_ALPHAS_CUMPROD, sigma_schedule="karras", spacing="leading")
    torch.testing.assert_close(k[[0, -2]], SD_SIGMAS[[876, 1]])            # leading: 7·125 + 1 down to 1
    torch.testing.assert_close(k, get_sigmas_karras(8, float(SD_SIGMAS[1]), float(SD_SIGMAS[876])))


def test_initial_noise_scale_and_final_latent_follow_the_scheduler_family():
    k = make_sigmas("euler", 10, SD_ALPHAS_CUMPROD)
    assert initial_noise_scale("euler", k) == float(k[0])
    leading = make_sigmas("euler", 10, SD_ALPHAS_CUMPROD, spacing="leading")
    scale = initial_noise_scale("euler", leading, spacing="leading")
    assert scale == pytest.approx((1 + leading[0] ** 2) ** 0.5)
    ddim = make_sigmas("ddim", 10, SD_ALPHAS_CUMPROD)
    assert initial_noise_scale("ddim", ddim) == pytest.approx((1 + ddim[0] ** 2) ** 0.5)
    x = torch.ones(3)
    torch.testing.assert_close(final_latent("ddim", x, ddim), x / (1 + ddim[-1] ** 2).sqrt().float())
    euler = make_sigmas("euler", 10, SD_ALPHAS_CUMPROD, final_sigma="sigma_min")
    assert euler[-1] > 0 and torch.equal(final_latent("euler", x, euler), x)


@pytest.mark.parametrize("call, message", [
    (lambda: make_sigmas("nope", 10, SD_ALPHAS_CUMPROD), "unknown sampler.*euler.*lcm"),
    (lambda: make_sigmas("euler", 10, SD_ALPHAS_CUMPROD, sigma_schedule="cosine"), "karras, exponential"),
    (lambda: make_sigmas("euler", 10, SD_ALPHAS_CUMPROD, spacing="middle"), "leading, trailing, linspace"),
    (lambda: make_sigmas("lcm", 4, SD_ALPHAS_CUMPROD, spacing="trailing"), "lcm walks its own"),
    (lambda: make_sigmas("lcm", 60, SD_ALPHAS_CUMPROD), "original_steps"),
    (lambda: make_sigmas("ddpm", 1000, SD_ALPHAS_CUMPROD), "steps_offset=0"),
    (lambda: make_sigmas("ddim", 0, SD_ALPHAS_CUMPROD), "steps"),
])
def test_bad_grid_requests_are_user_errors(call, message):
    with pytest.raises(UserError, match=message):
        call()
    assert len(make_sigmas("ddpm", 1000, SD_ALPHAS_CUMPROD, steps_offset=0)) == 1001    # the full DDPM chain
