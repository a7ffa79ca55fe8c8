import json
import math

import pytest
import torch

from nanodiffusion.diffusion.schedules import (
    ScheduleConfig, alphas_cumprod_to_sigmas, get_alphas_cumprod, get_betas, get_sigmas_exponential,
    get_sigmas_karras, get_timesteps, sigma_to_t, t_to_sigma,
)
from nanodiffusion.errors import UserError


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "cosine"])
def test_schedule_is_float64_monotone_and_in_range(kind):
    config = ScheduleConfig(kind=kind)
    betas, a = get_betas(config), get_alphas_cumprod(config)
    assert betas.dtype == a.dtype == torch.float64 and betas.shape == (1000,)
    assert (betas > 0).all() and (betas < 1).all()
    assert (a.diff() < 0).all()                        # ᾱ strictly decreases: more noise at every step
    sigmas = alphas_cumprod_to_sigmas(a)
    assert (sigmas.diff() > 0).all()


def test_linear_schedule_endpoints():
    betas = get_betas(ScheduleConfig("linear"))
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)


def test_scaled_linear_gives_sd_sigma_range():
    sigmas = alphas_cumprod_to_sigmas(get_alphas_cumprod(ScheduleConfig("scaled_linear")))
    assert sigmas[0].item() == pytest.approx(0.0292, abs=1e-4)
    assert sigmas[-1].item() == pytest.approx(14.61, abs=0.01)


def test_cosine_keeps_information_longer_than_linear():
    lin = get_alphas_cumprod(ScheduleConfig("linear"))
    cos = get_alphas_cumprod(ScheduleConfig("cosine"))
    assert cos[500] > lin[500] * 5                     # Nichol & Dhariwal Fig. 5: linear is near-pure noise early
    t = torch.arange(1001, dtype=torch.float64) / 1000
    f = torch.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    torch.testing.assert_close(cos[:900], (f[1:] / f[0])[:900], rtol=1e-9, atol=0)   # eq. 17 before clipping


def test_sigma_t_round_trip():
    sigmas = alphas_cumprod_to_sigmas(get_alphas_cumprod(ScheduleConfig("scaled_linear")))
    t = torch.tensor([0.0, 1.0, 10.5, 500.25, 999.0])
    torch.testing.assert_close(sigma_to_t(t_to_sigma(t, sigmas), sigmas), t, atol=1e-4, rtol=0)
    torch.testing.assert_close(t_to_sigma(torch.arange(1000.0), sigmas), sigmas)


def test_timestep_spacings_match_the_documented_tables():
    assert get_timesteps(10, 1000, "leading", steps_offset=1).tolist() == [901, 801, 701, 601, 501, 401, 301,
                                                                           201, 101, 1]
    assert get_timesteps(10, 1000, "trailing").tolist() == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    lin = get_timesteps(4, 1000, "linspace")
    assert lin[0] == 999 and lin[-1] == 0 and len(lin) == 4


def test_karras_and_exponential_grids():
    k = get_sigmas_karras(10, 0.03, 14.6)
    e = get_sigmas_exponential(10, 0.03, 14.6)
    for grid in (k, e):
        assert len(grid) == 11 and grid[-1] == 0
        assert grid[0].item() == pytest.approx(14.6) and grid[-2].item() == pytest.approx(0.03)
        assert (grid.diff() < 0).all()
    assert torch.allclose(e[:-1].log().diff(), e[:-1].log().diff()[0].expand(9))


@pytest.mark.parametrize("bad", [0, -3, 2.5])
def test_bad_step_counts_are_user_errors(bad):
    with pytest.raises(UserError, match="steps"):
        get_timesteps(bad, 1000)
    with pytest.raises(UserError, match="steps"):
        get_sigmas_karras(bad, 0.1, 10)


def test_unknown_schedule_lists_valid_ones():
    with pytest.raises(UserError, match="linear, scaled_linear, cosine"):
        ScheduleConfig("quadratic")


def test_schedule_config_round_trips_through_json_and_refuses_unknown_keys():
    config = ScheduleConfig(kind="cosine", num_timesteps=500)
    assert ScheduleConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(UserError, match=r"unknown ScheduleConfig keys \['steps'\]; valid keys are"):
        ScheduleConfig.from_dict({"kind": "cosine", "steps": 10})
