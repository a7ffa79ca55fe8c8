"""A1111's sigma schedules (its modules/sd_schedulers.py) against k-diffusion's discrete schedule, scipy and
their documented endpoints, on SD v1.5's table (sigma 0.0292 to 14.61)."""

import numpy as np
import pytest
import torch

from nanodiffusion.diffusion.sampling_plan import SIGMA_SCHEDULES, make_sigmas
from nanodiffusion.diffusion.schedules import (
    AYS_SD15_SIGMAS, ScheduleConfig, alphas_cumprod_to_sigmas, beta_quantile, get_alphas_cumprod,
    get_sigmas_align_your_steps, get_sigmas_beta, get_sigmas_ddim_uniform, get_sigmas_exponential,
    get_sigmas_karras, get_sigmas_normal, get_sigmas_simple,
)
from nanodiffusion.errors import UserError

from kdiffusion_oracle import load_k_diffusion

SD_ALPHAS_CUMPROD = get_alphas_cumprod(ScheduleConfig("scaled_linear"))
TABLE = alphas_cumprod_to_sigmas(SD_ALPHAS_CUMPROD)                      # (1000,) increasing
STEP_COUNTS = (1, 2, 7, 10, 20, 33, 50)


@pytest.fixture(scope="module")
def kdiffusion():
    return load_k_diffusion()


@pytest.mark.parametrize("n", STEP_COUNTS)
def test_uniform_normal_and_sgm_uniform_are_k_diffusions_discrete_schedule(kdiffusion, n):
    """A1111: Uniform is get_sigmas(n); Normal and SGM Uniform space t(sigma_max) .. t(sigma_min) linearly
    (n points; n + 1 less the last) and read sigma back, both through k-diffusion's DiscreteSchedule."""
    schedule = kdiffusion.external.DiscreteSchedule(TABLE, quantize=False)
    t_max, t_min = schedule.sigma_to_t(TABLE[-1]), schedule.sigma_to_t(TABLE[0])
    normal = torch.cat([schedule.t_to_sigma(torch.linspace(t_max, t_min, n)), torch.zeros(1)])
    sgm = torch.cat([schedule.t_to_sigma(torch.linspace(t_max, t_min, n + 1)[:-1]), torch.zeros(1)])
    close = lambda a, b: torch.testing.assert_close(a, b.double(), rtol=2e-6, atol=0)       # noqa: E731
    close(get_sigmas_normal(n, TABLE), schedule.get_sigmas(n))                               # float32 t there
    close(get_sigmas_normal(n, TABLE), normal)
    close(get_sigmas_normal(n, TABLE, sgm=True), sgm)
    assert float(get_sigmas_normal(n, TABLE)[0]) == pytest.approx(float(TABLE[-1]), rel=1e-14)


def test_simple_and_ddim_pick_these_table_indices():
    torch.testing.assert_close(get_sigmas_simple(3, TABLE)[:-1], TABLE[[999, 666, 333]])  # 999 - int(k·333.3)
    torch.testing.assert_close(get_sigmas_simple(10, TABLE)[:-1], TABLE[list(range(999, 0, -100))])
    torch.testing.assert_close(get_sigmas_ddim_uniform(10, TABLE)[:-1], TABLE[list(range(901, 0, -100))])
    # 7 steps: timesteps 1 + 142·k; A1111 adds an 8th (995), we keep the 7 asked for
    torch.testing.assert_close(get_sigmas_ddim_uniform(7, TABLE)[:-1],
                               TABLE[[853, 711, 569, 427, 285, 143, 1]])
    for grid in (get_sigmas_simple(20, TABLE), get_sigmas_ddim_uniform(20, TABLE)):
        assert len(grid) == 21 and grid[-1] == 0 and bool((grid[:-1].diff() < 0).all())


@pytest.mark.parametrize("n", STEP_COUNTS)
def test_beta_schedule_is_the_beta_quantile_between_the_table_ends(n):
    stats = pytest.importorskip("scipy.stats")
    low, high = float(TABLE[0]), float(TABLE[-1])
    expected = low + stats.beta.ppf(1 - np.linspace(0, 1, n), 0.6, 0.6) * (high - low)
    grid = get_sigmas_beta(n, low, high)
    torch.testing.assert_close(grid[:-1], torch.as_tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)
    assert float(grid[0]) == pytest.approx(high) and grid[-1] == 0
    if n > 1:
        assert float(grid[-2]) == pytest.approx(low)


def test_beta_quantile_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for a, b in [(0.6, 0.6), (0.5, 0.5), (2.0, 5.0), (3.0, 1.2)]:
        for p in (1e-6, 0.01, 0.2, 0.5, 0.8, 0.99, 1 - 1e-6):
            assert beta_quantile(p, a, b) == pytest.approx(stats.beta.ppf(p, a, b), abs=1e-12)
    assert (beta_quantile(0.0, 0.6, 0.6), beta_quantile(1.0, 0.6, 0.6)) == (0.0, 1.0)


def test_align_your_steps_is_the_published_sd15_schedule_interpolated_log_linearly():
    published = torch.tensor([*AYS_SD15_SIGMAS, 0.0], dtype=torch.float64)
    torch.testing.assert_close(get_sigmas_align_your_steps(11), published)          # 11 points as published
    for n in (4, 10, 25):              # A1111: np.interp of the log sigmas, both lists running upwards
        logs = np.interp(np.linspace(0, 1, n), np.linspace(0, 1, 11), np.log(AYS_SD15_SIGMAS[::-1]))
        expected = torch.as_tensor([*np.exp(logs)[::-1], 0.0], dtype=torch.float64)
        torch.testing.assert_close(get_sigmas_align_your_steps(n), expected, rtol=1e-12, atol=0)
    linear = get_alphas_cumprod(ScheduleConfig("linear"))                       # another model's schedule
    with pytest.raises(UserError, match="align_your_steps has sigmas for SD v1.x"):
        make_sigmas("euler", 10, linear, sigma_schedule="align_your_steps")


def test_karras_and_exponential_are_k_diffusions(kdiffusion):
    for ours, theirs in [(get_sigmas_karras, kdiffusion.sampling.get_sigmas_karras),
                         (get_sigmas_exponential, kdiffusion.sampling.get_sigmas_exponential)]:
        torch.testing.assert_close(ours(15, 0.0292, 14.6146).float(), theirs(15, 0.0292, 14.6146))


@pytest.mark.parametrize("schedule", [name for name, s in SIGMA_SCHEDULES.items() if s.span == "table"])
def test_table_schedules_are_the_same_for_every_sampler_family_and_end_as_the_sampler_does(schedule):
    """A1111 applies a schedule whatever the sampler: so do we, keeping each sampler's final sigma."""
    reference = SIGMA_SCHEDULES[schedule].make(8, TABLE)
    for sampler in ("euler", "dpmpp_2m", "ddpm", "lcm", "tcd", "ddim"):
        grid = make_sigmas(sampler, 8, SD_ALPHAS_CUMPROD, sigma_schedule=schedule)
        torch.testing.assert_close(grid[:-1], reference[:-1])
        assert grid[-1] == (TABLE[0] if sampler in ("tcd", "ddim") else 0)


def test_lcm_takes_an_explicit_schedule_but_not_a_spacing():
    karras = make_sigmas("lcm", 4, SD_ALPHAS_CUMPROD, sigma_schedule="karras")
    torch.testing.assert_close(karras, get_sigmas_karras(4, float(TABLE[0]), float(TABLE[-1])))
    with pytest.raises(UserError, match="tcd walks its own distillation timesteps"):
        make_sigmas("tcd", 4, SD_ALPHAS_CUMPROD, spacing="leading")
