"""Parity with diffusers' schedulers (STYLE §8.2): each sampler on its `make_sigmas` grid retraces one.

Both sides run the same toy eps-network, which depends on x and on t (so a wrong timestep shows), from the
same seed: diffusers with SD v1.5's scheduler config in the usual pipeline loop (initial noise and step noise
from one generator), ours through `Denoiser`. We compare the final latents and the timesteps fed to the net.
"""

import inspect

import pytest
import torch

from nanodiffusion.diffusion.denoisers import Denoiser, lcm_boundary_condition
from nanodiffusion.diffusion.sampler_options import schedule_inputs
from nanodiffusion.diffusion.samplers import SAMPLERS
from nanodiffusion.diffusion.sampling_plan import (
    SchedulerSettings, final_latent, initial_noise_scale, make_sigmas,
)
from nanodiffusion.diffusion.schedules import ScheduleConfig, alphas_cumprod_to_sigmas, get_alphas_cumprod

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")  # diffusers

# runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json (PNDMScheduler); unknown keys are ignored
SD15_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "steps_offset": 1, "skip_prk_steps": True, "set_alpha_to_one": False, "clip_sample": False,
    "trained_betas": None,
}
SHAPE = (2, 4, 8, 8)
TOLERANCE = 1e-4       # final latents, max-abs, float32 (achieved: 5e-6 or better)
T_TOLERANCE = 2e-3     # k-schedulers interpolate sigma linearly in t, our Denoiser inverts it in log-sigma


class ToyEpsNet:
    """A deterministic eps "UNet" of x_vp and t that records the timesteps it is called with.

    `quantize` (e.g. torch.round) is applied to t first, so that both sides feed it diffusers' integer t.
    """

    def __init__(self, quantize=None):
        self.mix = torch.randn(4, 4, generator=torch.Generator().manual_seed(0)) / 2
        self.quantize = quantize
        self.timesteps = []

    def __call__(self, x_vp, t):
        t = torch.as_tensor(t).float().reshape(-1)
        if self.quantize is not None:
            t = self.quantize(t)
        self.timesteps.append(float(t[0]))
        s = (t / 1000).reshape(-1, 1, 1, 1)                                        # (B or 1, 1, 1, 1)
        mixed = torch.einsum("oc,bchw->bohw", self.mix, x_vp)
        return x_vp * (0.5 + 0.5 * s) + 0.2 * torch.tanh(mixed + 3 * s - 1)


def run_diffusers(scheduler_class, config, num_steps, eta=None, quantize=None, seed=0):
    scheduler = getattr(diffusers, scheduler_class).from_config({**SD15_SCHEDULER_CONFIG, **config})
    scheduler.set_timesteps(num_steps)
    net = ToyEpsNet(quantize)
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(SHAPE, generator=generator) * scheduler.init_noise_sigma
    step_kwargs = {} if eta is None else {"eta": eta}
    if "generator" in inspect.signature(scheduler.step).parameters:     # as the pipelines' extra_step_kwargs
        step_kwargs["generator"] = generator
    for t in scheduler.timesteps:
        eps = net(scheduler.scale_model_input(latents, t), t)
        latents = scheduler.step(eps, t, latents, **step_kwargs).prev_sample
    return latents, net.timesteps


def run_ours(name, num_steps, plan, options, quantize=None, seed=0):
    alphas_cumprod = get_alphas_cumprod(ScheduleConfig("scaled_linear"))              # float64
    sigmas = make_sigmas(name, num_steps, alphas_cumprod, **plan)
    net = ToyEpsNet(quantize)
    model = Denoiser(net, alphas_cumprod, "epsilon")
    if name == "lcm":
        model = lcm_boundary_condition(model, alphas_cumprod)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=generator)
    x = x * initial_noise_scale(name, sigmas, spacing=plan.get("spacing"))
    function = SAMPLERS[name].function
    x = function(model, x, sigmas, generator=generator, **options,
                 **schedule_inputs(function, alphas_cumprod))
    return final_latent(name, x, sigmas), net.timesteps


# (sampler, diffusers scheduler, config on top of SD v1.5's, steps, make_sigmas options, sampler options)
CASES = [
    ("ddpm", "DDPMScheduler", {}, 20, {}, {}),
    ("ddpm", "DDPMScheduler", {"timestep_spacing": "trailing"}, 25, {"spacing": "trailing"}, {}),
    ("ddpm", "DDPMScheduler", {"timestep_spacing": "linspace"}, 15, {"spacing": "linspace"}, {}),
    ("ddim", "DDIMScheduler", {}, 20, {}, {}),
    ("ddim", "DDIMScheduler", {}, 20, {}, {"eta": 0.7}),
    ("ddim", "DDIMScheduler", {"timestep_spacing": "trailing"}, 25, {"spacing": "trailing"}, {}),
    ("plms", "PNDMScheduler", {}, 20, {}, {}),
    ("plms", "PNDMScheduler", {}, 2, {}, {}),
    ("plms", "PNDMScheduler", {}, 1, {}, {}),
    ("lms", "LMSDiscreteScheduler", {}, 20, {}, {}),
    ("lms", "LMSDiscreteScheduler", {"use_karras_sigmas": True}, 20, {"sigma_schedule": "karras"}, {}),
    ("euler", "EulerDiscreteScheduler", {}, 20, {}, {}),
    ("euler", "EulerDiscreteScheduler", {"use_karras_sigmas": True}, 20, {"sigma_schedule": "karras"}, {}),
    ("euler", "EulerDiscreteScheduler", {"use_exponential_sigmas": True}, 20,
     {"sigma_schedule": "exponential"}, {}),
    ("euler", "EulerDiscreteScheduler", {"timestep_spacing": "leading"}, 20, {"spacing": "leading"}, {}),
    ("euler", "EulerDiscreteScheduler", {"timestep_spacing": "trailing"}, 20, {"spacing": "trailing"}, {}),
    ("euler", "EulerDiscreteScheduler", {"timestep_spacing": "leading", "use_karras_sigmas": True}, 20,
     {"spacing": "leading", "sigma_schedule": "karras"}, {}),
    ("euler", "EulerDiscreteScheduler", {"final_sigmas_type": "sigma_min"}, 20,
     {"final_sigma": "sigma_min"}, {}),
    ("euler_ancestral", "EulerAncestralDiscreteScheduler", {}, 20, {}, {}),
    ("euler_ancestral", "EulerAncestralDiscreteScheduler", {"timestep_spacing": "trailing"}, 20,
     {"spacing": "trailing"}, {}),
    ("heun", "HeunDiscreteScheduler", {}, 15, {}, {}),
    ("heun", "HeunDiscreteScheduler", {"use_karras_sigmas": True}, 15, {"sigma_schedule": "karras"}, {}),
    ("dpm_2", "KDPM2DiscreteScheduler", {}, 15, {}, {}),
    ("dpm_2_ancestral", "KDPM2AncestralDiscreteScheduler", {}, 15, {}, {}),
    ("dpmpp_2m", "DPMSolverMultistepScheduler", {}, 20, {}, {}),
    ("dpmpp_2m", "DPMSolverMultistepScheduler", {}, 10, {}, {}),
    ("dpmpp_2m", "DPMSolverMultistepScheduler", {"timestep_spacing": "leading"}, 20,
     {"spacing": "leading"}, {}),
    ("dpmpp_2m", "DPMSolverMultistepScheduler", {"timestep_spacing": "trailing"}, 20,
     {"spacing": "trailing"}, {}),
    ("dpmpp_2m", "DPMSolverMultistepScheduler", {"final_sigmas_type": "sigma_min"}, 20,
     {"final_sigma": "sigma_min"}, {}),
    ("dpmpp_2m_sde", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, 20, {}, {}),
    ("dpmpp_2m_sde_heun", "DPMSolverMultistepScheduler",
     {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun"}, 20, {}, {}),
    ("unipc", "UniPCMultistepScheduler", {}, 20, {}, {}),
    ("unipc", "UniPCMultistepScheduler", {}, 5, {}, {}),
    ("unipc", "UniPCMultistepScheduler", {"solver_order": 3}, 20, {}, {"order": 3}),
    # diffusers' bh1 step to sigma = 0 computes 0·inf = NaN, so bh1 is compared on a grid ending at sigma_min
    ("unipc", "UniPCMultistepScheduler", {"solver_type": "bh1", "final_sigmas_type": "sigma_min"}, 20,
     {"final_sigma": "sigma_min"}, {"variant": "bh1"}),
    ("lcm", "LCMScheduler", {}, 4, {}, {}),
    ("lcm", "LCMScheduler", {}, 8, {}, {}),
    ("tcd", "TCDScheduler", {}, 4, {}, {"eta": 0.3}),            # TCD's recommended gamma
    ("tcd", "TCDScheduler", {}, 8, {}, {"eta": 0.3}),
    ("tcd", "TCDScheduler", {}, 4, {}, {"eta": 0.0}),            # diffusers' pipelines pass eta = 0
    ("tcd", "TCDScheduler", {}, 6, {}, {"eta": 1.0}),
]

# Karras grids where diffusers feeds the network round(t(sigma)) while stepping with the unrounded sigma
# (KDPM2, KDPM2Ancestral, DPMSolverMultistep, UniPCMultistep); our Denoiser feeds t(sigma) itself.
ROUNDED_T_CASES = [
    ("dpm_2", "KDPM2DiscreteScheduler", 15, {}),
    ("dpm_2_ancestral", "KDPM2AncestralDiscreteScheduler", 15, {}),
    ("dpmpp_2m", "DPMSolverMultistepScheduler", 20, {}),
    ("dpmpp_2m_sde", "DPMSolverMultistepScheduler", 20, {"algorithm_type": "sde-dpmsolver++"}),
    ("unipc", "UniPCMultistepScheduler", 20, {}),
]


def _case_id(case):
    name, _, config, steps, _, options = case
    extras = [f"{k}={v}" for k, v in {**config, **options}.items()]
    return "-".join([name, str(steps), *extras])


def _max_dt(ours, reference):
    assert len(ours) == len(reference), "different number of network calls"
    return max(abs(a - b) for a, b in zip(ours, reference))


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_sampler_retraces_the_diffusers_scheduler(case):
    name, scheduler_class, config, num_steps, plan, options = case
    reference, reference_t = run_diffusers(scheduler_class, config, num_steps, eta=options.get("eta"))
    ours, our_t = run_ours(name, num_steps, plan, options)
    assert _max_dt(our_t, reference_t) < T_TOLERANCE
    assert (ours - reference).abs().max().item() < TOLERANCE


@pytest.mark.parametrize("name, scheduler_class, num_steps, config", ROUNDED_T_CASES,
                         ids=[c[0] for c in ROUNDED_T_CASES])
def test_karras_grids_match_up_to_the_rounded_timesteps_diffusers_feeds(name, scheduler_class, num_steps,
                                                                        config):
    config = {**config, "use_karras_sigmas": True}
    plan = {"sigma_schedule": "karras"}
    reference, reference_t = run_diffusers(scheduler_class, config, num_steps)
    ours, our_t = run_ours(name, num_steps, plan, {})
    assert _max_dt(our_t, reference_t) <= 0.5 + T_TOLERANCE
    assert (ours - reference).abs().max().item() < 1e-3     # achieved 7e-5..7e-4 with this t-sensitive net
    # a network that rounds t itself sees the same inputs on both sides: then the rest matches to 1e-4
    reference, reference_t = run_diffusers(scheduler_class, config, num_steps, quantize=torch.round)
    ours, our_t = run_ours(name, num_steps, plan, {}, quantize=torch.round)
    assert _max_dt(our_t, reference_t) == 0
    assert (ours - reference).abs().max().item() < TOLERANCE


def test_dpm_solver_exponential_grid_matches_up_to_the_truncated_timesteps():
    """DPMSolverMultistep casts its exponential-grid timesteps to int64, flooring t(sigma) by up to 1."""
    config, plan = {"use_exponential_sigmas": True}, {"sigma_schedule": "exponential"}
    reference, reference_t = run_diffusers("DPMSolverMultistepScheduler", config, 20)
    ours, our_t = run_ours("dpmpp_2m", 20, plan, {})
    assert _max_dt(our_t, reference_t) < 1 + T_TOLERANCE
    assert (ours - reference).abs().max().item() < 1e-2     # achieved 5e-3 with this t-sensitive net
    reference, _ = run_diffusers("EulerDiscreteScheduler", config, 20)
    ours, _ = run_ours("euler", 20, plan, {})              # the same grid, fed unquantised, matches exactly
    assert (ours - reference).abs().max().item() < TOLERANCE


@pytest.mark.parametrize("name, scheduler_class, config", [
    ("ddim", "DDIMScheduler", {}), ("plms", "PNDMScheduler", {}), ("lcm", "LCMScheduler", {}),
    ("tcd", "TCDScheduler", {}), ("euler", "EulerDiscreteScheduler", {}),
    ("euler", "EulerDiscreteScheduler", {"timestep_spacing": "leading"}),
    ("dpmpp_2m", "DPMSolverMultistepScheduler", {}), ("unipc", "UniPCMultistepScheduler", {}),
])
def test_grid_and_initial_noise_match_the_scheduler(name, scheduler_class, config):
    scheduler = getattr(diffusers, scheduler_class).from_config({**SD15_SCHEDULER_CONFIG, **config})
    scheduler.set_timesteps(10)
    plan = {"spacing": config["timestep_spacing"]} if config else {}
    alphas_cumprod = get_alphas_cumprod(ScheduleConfig("scaled_linear"))
    sigmas = make_sigmas(name, 10, alphas_cumprod, **plan)
    if name in ("ddim", "plms", "lcm", "tcd"):    # these keep no sigmas: compare at their (unique) timesteps
        table = alphas_cumprod_to_sigmas(alphas_cumprod)
        torch.testing.assert_close(sigmas[:-1], table[scheduler.timesteps.unique_consecutive()])
    else:
        # diffusers' alphas_cumprod is a float32 cumprod: 1.3e-5 relative off near t = 0
        torch.testing.assert_close(sigmas.float(), scheduler.sigmas.float(), rtol=2e-5, atol=0)
    vp_style = float(scheduler.init_noise_sigma) == 1.0
    expected = (1 + sigmas[0] ** 2) ** 0.5 if vp_style else float(scheduler.init_noise_sigma)
    assert initial_noise_scale(name, sigmas, **plan) == pytest.approx(float(expected), rel=1e-6)


@pytest.mark.parametrize("name, scheduler_class", [("lcm", "LCMScheduler"), ("tcd", "TCDScheduler")])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_lcm_and_tcd_ignore_the_timestep_spacing_a_model_folder_sets(name, scheduler_class, spacing):
    """Every standard SD folder sets timestep_spacing; LCM/TCDScheduler ignore it, and so do we (issue 18)."""
    config = {**SD15_SCHEDULER_CONFIG, "timestep_spacing": spacing}
    scheduler = getattr(diffusers, scheduler_class).from_config(config)
    scheduler.set_timesteps(4)
    sigmas = SchedulerSettings.from_diffusers_config(config).sigmas(name, 4)
    table = alphas_cumprod_to_sigmas(get_alphas_cumprod(ScheduleConfig("scaled_linear")))
    torch.testing.assert_close(sigmas[:-1], table[scheduler.timesteps])
