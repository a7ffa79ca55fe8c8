"""ControlNet network: parity with diffusers' ControlNetModel, the UNet with residuals against
UNet2DConditionModel, config round trips, initialisation from a UNet, shapes and errors."""

import dataclasses
import json

import pytest
import torch

from nanodiffusion.errors import UserError
from nanodiffusion.nets.controlnet import SD15_CONTROLNET, TINY_CONTROLNET, ControlNet, ControlNetConfig
from nanodiffusion.nets.sd_unet import SD15_UNET, TINY_UNET, SDUNet, SDUNetConfig
from fixtures import randomize_

# Options SD v1.5 does not use: three levels, attention at the first two, per-level heads, linear
# projections, two transformer blocks, a one-channel control image with a two-stage image encoder.
VARIANT = ControlNetConfig(
    unet=SDUNetConfig(model_channels=16, channel_mult=(1, 2, 3), num_res_blocks=1, attention_levels=(0, 1),
                      num_heads=(2, 4, 8), transformer_depth=2, context_dim=24, linear_projection=True,
                      norm_groups=4, sample_size=None),
    conditioning_channels=1, embedding_channels=(8, 16))

# lllyasviel/control_v11p_sd15_canny config.json as published (diffusers 0.16.0.dev0)
SD15_CANNY_CONFIG = {
    "_class_name": "ControlNetModel", "_diffusers_version": "0.16.0.dev0", "_name_or_path": "out_canny",
    "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "class_embed_type": None, "conditioning_embedding_out_channels": [16, 32, 96, 256],
    "controlnet_conditioning_channel_order": "rgb", "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], "downsample_padding": 1,
    "flip_sin_to_cos": True, "freq_shift": 0, "global_pool_conditions": False, "in_channels": 4,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
    "num_class_embeds": None, "only_cross_attention": False, "projection_class_embeddings_input_dim": None,
    "resnet_time_scale_shift": "default", "upcast_attention": False, "use_linear_projection": False,
}


def _inputs(config: ControlNetConfig, batch: int = 2, height: int = 8, width: int = 8, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    unet = config.unet
    x = torch.randn(batch, unet.in_channels, height, width, generator=generator)
    t = torch.rand(batch, generator=generator) * 999
    context = torch.randn(batch, 7, unet.context_dim, generator=generator)
    image = torch.rand(batch, config.conditioning_channels, height * config.downscale,
                       width * config.downscale, generator=generator)
    return x, t, context, image


def _reference_and_ours(config: ControlNetConfig, seed: int = 0):
    diffusers = pytest.importorskip("diffusers")
    reference = diffusers.ControlNetModel.from_config(config.to_diffusers_config())
    randomize_(reference, seed, fresh=True)
    ours = ControlNet(ControlNetConfig.from_diffusers_config(reference.config)).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference, ours


def _max_difference(first, second) -> float:
    return max((a - b).abs().max().item() for a, b in zip(first, second))


POOLED_BGR = dataclasses.replace(TINY_CONTROLNET, global_pool=True, channel_order="bgr")


@pytest.mark.parametrize("config", [TINY_CONTROLNET, VARIANT, POOLED_BGR],
                         ids=["tiny", "variant", "pooled-bgr"])
@pytest.mark.parametrize("size", [(8, 8), (9, 13)], ids=["square", "odd"])
def test_controlnet_matches_diffusers(config, size):
    reference, ours = _reference_and_ours(config)
    x, t, context, image = _inputs(config, 2, *size)
    with torch.no_grad():
        expected = reference(x, t, context, image, return_dict=False)
        down, mid = ours(x, t, context, image)
    assert len(down) == len(expected[0]) == len(ours.controlnet_down_blocks)
    assert all(a.shape == b.shape for a, b in zip(down, expected[0]))
    assert _max_difference([*down, mid], [*expected[0], expected[1]]) <= 1e-4
    assert mid.abs().max() > 0.01                      # random zero convs: the residuals are not trivial


@pytest.mark.parametrize("unet_config", [TINY_UNET, VARIANT.unet], ids=["tiny", "variant"])
def test_unet_with_residuals_matches_diffusers(unet_config):
    diffusers = pytest.importorskip("diffusers")
    unet_config = dataclasses.replace(unet_config, sample_size=8)
    reference = diffusers.UNet2DConditionModel.from_config(unet_config.to_diffusers_config())
    randomize_(reference, 0, fresh=True)
    ours = SDUNet(unet_config).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    controlnet = randomize_(ControlNet(ControlNetConfig(unet=unet_config)), 3, fresh=True)
    x, t, context, image = _inputs(ControlNetConfig(unet=unet_config), 2, 9, 13)
    with torch.no_grad():
        down, mid = controlnet(x, t, context, image)
        expected = reference(x, t, context, down_block_additional_residuals=down,
                             mid_block_additional_residual=mid).sample
        eps = ours(x, t, context, down_residuals=down, mid_residual=mid)
        plain = ours(x, t, context)
    assert (eps - expected).abs().max() <= 1e-4
    assert (eps - plain).abs().max() > 0.01             # the residuals change the prediction


def test_zero_residuals_and_a_fresh_controlnet_leave_the_unet_unchanged():
    unet = randomize_(SDUNet(TINY_UNET), 0, fresh=True)
    controlnet = ControlNet.from_unet(unet)             # zero convolutions: residuals are exactly 0
    x, t, context, image = _inputs(TINY_CONTROLNET)
    with torch.no_grad():
        down, mid = controlnet(x, t, context, image)
        assert all(torch.count_nonzero(r) == 0 for r in [*down, mid])
        assert torch.equal(unet(x, t, context, down_residuals=down, mid_residual=mid), unet(x, t, context))


def test_from_unet_copies_the_encoder():
    unet = randomize_(SDUNet(TINY_UNET), 0, fresh=True)
    controlnet = ControlNet.from_unet(unet, embedding_channels=(8, 8, 16, 16))
    ours, theirs = controlnet.state_dict(), unet.state_dict()
    shared = [key for key in ours if not key.startswith("controlnet_")]
    assert shared and all(torch.equal(ours[key], theirs[key]) for key in shared)
    assert controlnet.config == TINY_CONTROLNET


def test_batch_of_n_equals_n_batches_of_1():
    controlnet = randomize_(ControlNet(TINY_CONTROLNET), 0, fresh=True)
    x, t, context, image = _inputs(TINY_CONTROLNET, 3)
    with torch.no_grad():
        down, mid = controlnet(x, t, context, image)
        for i in range(3):
            one = controlnet(x[i:i + 1], t[i:i + 1], context[i:i + 1], image[i:i + 1])
            assert _max_difference([*one[0], one[1]], [r[i:i + 1] for r in [*down, mid]]) <= 1e-5


@pytest.mark.parametrize("config", [SD15_CONTROLNET, TINY_CONTROLNET, VARIANT, POOLED_BGR],
                         ids=["sd15", "tiny", "variant", "pooled-bgr"])
def test_config_round_trips(config):
    assert ControlNetConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    diffusers_json = json.loads(json.dumps(config.to_diffusers_config()))
    assert ControlNetConfig.from_diffusers_config(diffusers_json) == config


def test_sd15_published_config_and_parameter_count():
    assert ControlNetConfig.from_diffusers_config(SD15_CANNY_CONFIG) == SD15_CONTROLNET
    with torch.device("meta"):
        model = ControlNet(SD15_CONTROLNET)
    assert sum(p.numel() for p in model.parameters()) == 361_279_120     # as diffusers counts it


def test_diffusers_builds_the_same_tensors_from_our_config():
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        reference = diffusers.ControlNetModel.from_config(SD15_CONTROLNET.to_diffusers_config())
        ours = ControlNet(SD15_CONTROLNET)
    assert {k: v.shape for k, v in ours.state_dict().items()} == \
        {k: v.shape for k, v in reference.state_dict().items()}


@pytest.mark.parametrize("changes, message", [
    ({"cross_attention_dim": 2048, "addition_embed_type": "text_time"}, "SDXL ControlNet"),
    ({"class_embed_type": "timestep"}, "ControlNet config: unsupported"),
    ({"some_future_option": 1}, "ControlNet config: unknown keys"),
    ({"_class_name": "UNet2DConditionModel"}, "expected a diffusers ControlNetModel"),
])
def test_unsupported_diffusers_configs_fail_clearly(changes, message):
    with pytest.raises(UserError, match=message):
        ControlNetConfig.from_diffusers_config({**SD15_CANNY_CONFIG, **changes})


@pytest.mark.parametrize("unet, message", [
    (dataclasses.replace(SD15_UNET, context_dim=1024), "made for SD v1.x .* model is SD 2.x"),
    (dataclasses.replace(SD15_UNET, num_res_blocks=1), "num_res_blocks 2 vs 1"),
])
def test_a_controlnet_for_another_model_is_named(unet, message):
    SD15_CONTROLNET.check_fits(SD15_UNET)
    with pytest.raises(UserError, match=message):
        SD15_CONTROLNET.check_fits(unet)
    sd2 = ControlNetConfig(unet=dataclasses.replace(SD15_UNET, context_dim=1024))
    with pytest.raises(UserError, match="made for SD 2.x .*model is SD v1.x"):
        sd2.check_fits(SD15_UNET)


def test_bad_inputs_fail_clearly():
    controlnet = ControlNet(TINY_CONTROLNET)
    x, t, context, image = _inputs(TINY_CONTROLNET)
    with pytest.raises(ValueError, match=r"control_image must have shape \(2, 3, 64, 64\)"):
        controlnet(x, t, context, image[:, :, :32])
    with pytest.raises(ValueError, match="context must have shape"):
        controlnet(x, t, context[..., :8], image)
    with pytest.raises(ValueError, match="one tensor per skip connection"):
        SDUNet(TINY_UNET)(x, t, context, down_residuals=[x])
    with pytest.raises(UserError, match="channel_order"):
        ControlNetConfig(channel_order="BGR")


def test_channels_last_and_bfloat16_stay_close():
    """The fast path the pipelines use for the UNet serves the ControlNet too."""
    controlnet = randomize_(ControlNet(TINY_CONTROLNET), 0, fresh=True)
    x, t, context, image = _inputs(TINY_CONTROLNET)
    with torch.no_grad():
        down, mid = controlnet(x, t, context, image)
        controlnet = controlnet.to(memory_format=torch.channels_last)
        fast = controlnet(x.to(memory_format=torch.channels_last), t, context, image)
        low = controlnet.to(torch.bfloat16)(x.bfloat16(), t, context.bfloat16(), image)
    expected = [*down, mid]
    assert _max_difference([*fast[0], fast[1]], expected) <= 1e-5
    scale = max(r.abs().max().item() for r in expected)
    assert _max_difference([r.float() for r in [*low[0], low[1]]], expected) <= 0.05 * scale
