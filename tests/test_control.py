"""The ControlNet schedule: diffusers' keep rule, guess-mode scales, sigma -> step, the denoiser wrappers with
stand-in networks, and two ControlNets with scales and guess mode against diffusers' MultiControlNetModel."""

import math

import pytest
import torch

from nanodiffusion.diffusion.denoisers import (
    ControlUnit, Denoiser, active_steps, cfg_denoiser, control_denoiser, controlled_unet, guess_mode_scales,
    soft_injection_scales, step_index,
)
from nanodiffusion.diffusion.samplers import SAMPLERS
from nanodiffusion.diffusion.schedules import ScheduleConfig, get_alphas_cumprod
from nanodiffusion.errors import UserError
from nanodiffusion.nets.controlnet import TINY_CONTROLNET, ControlNet, ControlNetConfig
from nanodiffusion.nets.sd_unet import TINY_UNET, SDUNet
from fixtures import randomize_

SIGMAS = torch.cat([torch.logspace(math.log10(14.6), math.log10(0.03), 10, dtype=torch.float64),
                    torch.zeros(1, dtype=torch.float64)])          # 10 steps, geometric, ending at 0


@pytest.mark.parametrize("num_steps, start, end, active", [
    (10, 0.0, 1.0, list(range(10))),
    (10, 0.2, 0.8, [2, 3, 4, 5, 6, 7]),          # i/N >= start and (i+1)/N <= end
    (3, 0.0, 0.5, [0]),                           # 2/3 > 0.5: the second step is already off
    (4, 0.5, 1.0, [2, 3]),
    (7, 0.1, 0.9, [1, 2, 3, 4, 5]),
])
def test_active_steps_follow_diffusers_keep_rule(num_steps, start, end, active):
    assert [i for i, on in enumerate(active_steps(num_steps, start, end)) if on] == active


def test_guess_mode_scales_run_geometrically_from_a_tenth_to_one():
    scales = guess_mode_scales(13)                               # SD: 12 skip connections and the middle
    assert scales[0] == pytest.approx(0.1) and scales[-1] == pytest.approx(1.0)
    ratios = scales[1:] / scales[:-1]
    assert torch.allclose(ratios, torch.full_like(ratios, 10 ** (1 / 12)))


def test_step_index_finds_grid_points_midpoints_and_heun_evaluations():
    steps = torch.arange(10)
    assert torch.equal(step_index(SIGMAS[:-1], SIGMAS), steps)
    assert torch.equal(step_index(SIGMAS[:-1].float(), SIGMAS), steps)          # float32 sigmas too
    assert torch.equal(step_index(SIGMAS[:-1].half().float(), SIGMAS), steps)   # and half-precision ones
    midpoints = (SIGMAS[:-2] * SIGMAS[1:-1]).sqrt()                             # DPM2's second evaluation
    assert torch.equal(step_index(midpoints, SIGMAS), steps[:-1])
    assert step_index(torch.tensor(SIGMAS[4].item()), SIGMAS).tolist() == [4]  # a Python float as a sampler


class StandIn:
    """A ControlNet whose residuals are ones (two skips and the middle), recording the rows it sees."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, context, image):
        self.calls.append(x.shape[0])
        ones = torch.ones(x.shape[0], 1, 1, 1, dtype=x.dtype)
        return [ones, 2 * ones], 3 * ones


def stand_in_unet(x, t, context, down_residuals=None, mid_residual=None):
    """Returns the weight its mid residual carries per row (0 without residuals): one value per row."""
    if down_residuals is None:
        return torch.zeros(x.shape[0], 1, 1, 1)
    return mid_residual / 3


def _denoiser(units):
    net = controlled_unet(stand_in_unet, units)
    return control_denoiser(lambda x, sigma, **cond: net(x, torch.zeros(x.shape[0]), **cond), units, SIGMAS)


def test_scale_applies_on_the_active_steps_only():
    unit = ControlUnit(StandIn(), torch.zeros(1, 3, 8, 8), scale=0.7, start=0.2, end=0.8)
    model = _denoiser([unit])
    x, context = torch.zeros(2, 4, 1, 1), torch.zeros(2, 5, 8)
    weights = [model(x, sigma, context=context)[:, 0, 0, 0].tolist() for sigma in SIGMAS[:-1]]
    assert weights == [pytest.approx([0.7, 0.7] if on else [0.0, 0.0]) for on in active_steps(10, 0.2, 0.8)]
    assert unit.controlnet.calls == [2] * 6                # never run where its weight is 0


def test_several_units_sum_their_weighted_residuals():
    first = ControlUnit(StandIn(), torch.zeros(1, 3, 8, 8), scale=0.5, end=0.5)
    second = ControlUnit(StandIn(), torch.zeros(1, 3, 8, 8), scale=2.0, start=0.3)
    model = _denoiser([first, second])
    x, context = torch.zeros(1, 4, 1, 1), torch.zeros(1, 5, 8)
    weights = [model(x, sigma, context=context).item() for sigma in SIGMAS[:-1]]
    assert weights == pytest.approx([0.5 * (i < 5) + 2.0 * (i >= 3) for i in range(10)])


@pytest.mark.parametrize("guess_mode, pooled", [(False, False), (True, False), (False, True)])
def test_guess_mode_and_pooled_units_skip_the_unconditional_rows(guess_mode, pooled):
    unit = ControlUnit(StandIn(), torch.zeros(1, 3, 8, 8), guess_mode=guess_mode, pooled=pooled)
    model = _denoiser([unit])
    x, context = torch.zeros(4, 4, 1, 1), torch.zeros(4, 5, 8)
    conditional = torch.tensor([0.0, 0.0, 1.0, 1.0])            # classifier-free guidance: [uncond, cond]
    mid_weight = model(x, SIGMAS[0], context=context, conditional=conditional)[:, 0, 0, 0]
    expected_rows = 4 if not (guess_mode or pooled) else 2
    assert unit.controlnet.calls == [expected_rows]
    assert mid_weight.tolist() == ([1.0] * 4 if expected_rows == 4 else [0.0, 0.0, 1.0, 1.0])


def test_guess_mode_scales_each_level():
    seen = {}

    def unet(x, t, context, down_residuals=None, mid_residual=None):
        seen["down"], seen["mid"] = down_residuals, mid_residual
        return x

    unit = ControlUnit(StandIn(), torch.zeros(1, 3, 8, 8), scale=2.0, guess_mode=True)
    controlled_unet(unet, [unit])(torch.zeros(1, 4, 1, 1), torch.zeros(1), torch.zeros(1, 5, 8))
    scales = guess_mode_scales(3)                            # two skips and the middle
    assert seen["down"][0].item() == pytest.approx(2 * scales[0].item())
    assert seen["down"][1].item() == pytest.approx(2 * 2 * scales[1].item())
    assert seen["mid"].item() == pytest.approx(2 * 3 * 1.0)


@pytest.mark.parametrize("control_mode, rows", [("balanced", 4), ("prompt", 4), ("controlnet", 2)])
def test_a1111_control_modes_scale_the_levels_and_pick_the_rows(control_mode, rows):
    """A1111's "My prompt is more important" scales residual k of 13 by 0.825^(12-k) on every row;
    "ControlNet is more important" does that on the conditional rows only."""
    seen = {}

    def unet(x, t, context, down_residuals=None, mid_residual=None):
        seen["down"], seen["mid"] = down_residuals, mid_residual
        return x

    unit = ControlUnit(StandIn(), torch.zeros(1, 3, 8, 8), scale=2.0, control_mode=control_mode)
    net = controlled_unet(unet, [unit])
    model = control_denoiser(lambda x, sigma, **cond: net(x, torch.zeros(x.shape[0]), **cond), [unit], SIGMAS)
    model(torch.zeros(4, 4, 1, 1), SIGMAS[0], context=torch.zeros(4, 5, 8),
          conditional=torch.tensor([0.0, 0.0, 1.0, 1.0]))
    levels = [1.0, 1.0, 1.0] if control_mode == "balanced" else [0.825**2, 0.825, 1.0]
    weights = torch.tensor([0.0] * (4 - rows) + [2.0] * rows)[:, None, None, None]
    assert unit.controlnet.calls == [rows]
    for residual, level, value in zip([*seen["down"], seen["mid"]], levels, (1, 2, 3)):
        assert torch.allclose(residual, weights * level * value)
    assert soft_injection_scales(13)[0].item() == pytest.approx(0.825**12)


@pytest.mark.parametrize("sampler, calls", [("euler", 6), ("heun", 12)])
def test_samplers_see_the_control_on_the_fraction_of_their_steps(sampler, calls):
    """Heun evaluates at sigmas[i] (step i) and at sigmas[i+1] (step i+1): 6 + 6 of its 19 evaluations."""
    unit = ControlUnit(StandIn(), torch.zeros(1, 3, 8, 8), start=0.2, end=0.8)
    model = _denoiser([unit])
    x, context = torch.ones(1, 4, 1, 1), torch.zeros(1, 5, 8)
    SAMPLERS[sampler].function(lambda x, sigma: x - model(x, sigma, context=context), x, SIGMAS)
    assert len(unit.controlnet.calls) == calls


def test_invalid_units_and_images_fail_clearly():
    with pytest.raises(UserError, match="0 <= start < end <= 1"):
        ControlUnit(StandIn(), torch.zeros(1, 3, 8, 8), start=0.6, end=0.4)
    with pytest.raises(UserError, match="0 <= start < end <= 1"):
        ControlUnit(StandIn(), torch.zeros(1, 3, 8, 8), end=1.5)
    with pytest.raises(UserError, match=r"\(B, C, H, W\)"):
        ControlUnit(StandIn(), torch.zeros(3, 8, 8))
    with pytest.raises(UserError, match="unknown control mode 'strong'; valid: balanced, prompt, controlnet"):
        ControlUnit(StandIn(), torch.zeros(1, 3, 8, 8), control_mode="strong")
    with pytest.raises(UserError, match="choose one"):
        ControlUnit(StandIn(), torch.zeros(1, 3, 8, 8), guess_mode=True, control_mode="prompt")
    unit = ControlUnit(StandIn(), torch.zeros(2, 3, 8, 8))
    with pytest.raises(UserError, match="must be 1 or divide the batch"):
        controlled_unet(stand_in_unet, [unit])(torch.zeros(3, 4, 1, 1), torch.zeros(3), torch.zeros(3, 5, 8))


@pytest.mark.parametrize("guess_mode", [False, True])
def test_two_controlnets_with_cfg_match_diffusers(guess_mode):
    """One step of diffusers' StableDiffusionControlNetPipeline loop with a MultiControlNetModel (scales
    0.7 and 1.3; guess mode runs the ControlNets on the conditional half only) against our wrappers."""
    diffusers = pytest.importorskip("diffusers")
    # the module itself: diffusers.MultiControlNetModel would import every pipeline (a minute here)
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
    unet_config = TINY_UNET
    reference_unet = diffusers.UNet2DConditionModel.from_config(unet_config.to_diffusers_config())
    reference_unet = randomize_(reference_unet, 0, fresh=True)
    unet = SDUNet(unet_config).eval()
    unet.load_state_dict(reference_unet.state_dict())
    references, controlnets = [], []
    for seed in (1, 2):
        reference = diffusers.ControlNetModel.from_config(TINY_CONTROLNET.to_diffusers_config())
        reference = randomize_(reference, seed, fresh=True)
        ours = ControlNet(ControlNetConfig.from_diffusers_config(reference.config)).eval()
        ours.load_state_dict(reference.state_dict())
        references.append(reference)
        controlnets.append(ours)
    generator = torch.Generator().manual_seed(3)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    prompt, negative = torch.randn(2, 2, 7, 32, generator=generator)
    images = [torch.rand(1, 3, 64, 64, generator=generator) for _ in range(2)]
    t = torch.tensor(500.0)
    with torch.no_grad():
        multi = MultiControlNetModel(references)
        both = torch.cat([latents] * 2), torch.cat([negative, prompt])            # CFG: [uncond, cond]
        inputs, embeds = (latents, prompt) if guess_mode else both
        repeat = 2 if guess_mode else 4
        down, mid = multi(inputs, t, embeds, [image.repeat(repeat, 1, 1, 1) for image in images], [0.7, 1.3],
                          guess_mode=guess_mode, return_dict=False)
        if guess_mode:
            down = [torch.cat([torch.zeros_like(d), d]) for d in down]
            mid = torch.cat([torch.zeros_like(mid), mid])
        expected = reference_unet(*both[:1], t, both[1], down_block_additional_residuals=down,
                                  mid_block_additional_residual=mid).sample
        units = [ControlUnit(net, image, scale=scale, guess_mode=guess_mode)
                 for net, image, scale in zip(controlnets, images, (0.7, 1.3))]
        net = controlled_unet(unet, units)
        model = control_denoiser(lambda x, sigma, **cond: net(x, t.expand(x.shape[0]), **cond), units, SIGMAS)
        eps = model(torch.cat([latents] * 2), SIGMAS[0], context=torch.cat([negative, prompt]),
                    conditional=torch.tensor([0.0, 0.0, 1.0, 1.0]))
    assert (eps - expected).abs().max() <= 1e-4


def test_with_cfg_and_a_sampler_a_fresh_controlnet_changes_nothing_and_a_trained_one_does():
    """The whole stack (sampler, CFG, our wrappers, Denoiser, UNet): a ControlNet just made from the UNet
    adds exact zeros (zero convolutions), so the sample equals the plain model's; random weights do not."""
    unet = randomize_(SDUNet(TINY_UNET), 0, fresh=True)
    alphas_cumprod = get_alphas_cumprod(ScheduleConfig(kind="scaled_linear"))
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=generator) * SIGMAS[0]
    prompt, negative = torch.randn(2, 2, 7, 32, generator=generator)
    image = torch.rand(1, 3, 64, 64, generator=generator)

    def sample(controlnet, guess_mode=False):
        units = [ControlUnit(controlnet, image, scale=1.5, end=0.6, guess_mode=guess_mode)] \
            if controlnet else []
        denoiser = control_denoiser(Denoiser(controlled_unet(unet, units), alphas_cumprod), units, SIGMAS)
        guided = cfg_denoiser(denoiser, {"context": prompt, "conditional": torch.ones(2)},
                              {"context": negative, "conditional": torch.zeros(2)}, 7.5)
        with torch.no_grad():
            return SAMPLERS["euler"].function(guided, x, SIGMAS)

    plain = sample(None)
    assert torch.equal(sample(ControlNet.from_unet(unet)), plain)
    trained = randomize_(ControlNet.from_unet(unet), 1, fresh=True)
    assert (sample(trained) - plain).abs().max() > 1e-3
    assert (sample(trained, guess_mode=True) - sample(trained)).abs().max() > 1e-3
