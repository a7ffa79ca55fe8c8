"""SD UNet: parity with diffusers' UNet2DConditionModel, config round trips, shapes and invariants."""

import dataclasses
import json

import pytest
import torch

from nanodiffusion.errors import UserError
from nanodiffusion.nets.sd_unet import SD15_UNET, TINY_UNET, SDUNet, SDUNetConfig

# A second tiny layout covering the options SD v1.5 does not use: attention at level 0 but not at the last
# level (as in SD), per-level head counts, linear projections, two transformer blocks, fp32 upcast.
VARIANT_UNET = SDUNetConfig(model_channels=16, channel_mult=(1, 2, 3), num_res_blocks=1,
                            attention_levels=(0, 1), num_heads=(2, 4, 8), transformer_depth=2, context_dim=24,
                            linear_projection=True, upcast_attention=True, norm_groups=4, sample_size=8)

# runwayml/stable-diffusion-v1-5 unet/config.json (written by diffusers 0.6.0: later keys absent)
SD15_DIFFUSERS_CONFIG = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu",
    "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
    "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
}


def _random_weights_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter (norms and biases included) random values, so no path hides behind a zero."""
    generator = torch.Generator().manual_seed(seed)
    for parameter in model.parameters():
        parameter.data = torch.randn(parameter.shape, generator=generator) * 0.1
    return model.eval()


def _inputs(config: SDUNetConfig, batch: int, height: int, width: int, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, height, width, generator=generator)
    t = torch.rand(batch, generator=generator) * 999
    context = torch.randn(batch, 7, config.context_dim, generator=generator)
    return x, t, context


def _reference_and_ours(config: SDUNetConfig):
    diffusers = pytest.importorskip("diffusers")
    reference = _random_weights_(diffusers.UNet2DConditionModel.from_config(config.to_diffusers_config()))
    ours = SDUNet(SDUNetConfig.from_diffusers_config(reference.config)).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference, ours


@pytest.mark.parametrize("config", [TINY_UNET, VARIANT_UNET], ids=["tiny", "variant"])
@pytest.mark.parametrize("size", [(8, 8), (8, 12), (9, 13)], ids=["square", "non-square", "odd"])
def test_unet_matches_diffusers(config, size):
    reference, ours = _reference_and_ours(config)
    x, t, context = _inputs(config, 2, *size)
    with torch.no_grad():
        expected = reference(x, t, context).sample   # diffusers follows the skip sizes for odd latents too
        eps = ours(x, t, context)
    assert eps.shape == x.shape
    assert (eps - expected).abs().max() <= 1e-5


def test_batch_of_n_equals_n_batches_of_1():
    model = _random_weights_(SDUNet(TINY_UNET))
    x, t, context = _inputs(TINY_UNET, 3, 8, 8)
    with torch.no_grad():
        batched = model(x, t, context)
        single = torch.cat([model(x[i:i + 1], t[i:i + 1], context[i:i + 1]) for i in range(3)])
    assert (batched - single).abs().max() <= 1e-5


def test_scalar_timestep_broadcasts_over_the_batch():
    model = _random_weights_(SDUNet(TINY_UNET))
    x, _, context = _inputs(TINY_UNET, 2, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x, 250.0, context), model(x, torch.tensor([250.0, 250.0]), context))


def test_channels_last_and_bfloat16_stay_close():
    model = _random_weights_(SDUNet(TINY_UNET))
    x, t, context = _inputs(TINY_UNET, 2, 8, 8)
    with torch.no_grad():
        expected = model(x, t, context)
        model = model.to(memory_format=torch.channels_last)
        channels_last = model(x.to(memory_format=torch.channels_last), t, context)
        low = model.to(torch.bfloat16)(x.bfloat16(), t, context.bfloat16()).float()
    assert (channels_last - expected).abs().max() <= 1e-5
    assert (low - expected).abs().max() <= 0.05 * expected.abs().max()


@pytest.mark.parametrize("config", [SD15_UNET, TINY_UNET, VARIANT_UNET], ids=["sd15", "tiny", "variant"])
def test_config_round_trips(config):
    assert SDUNetConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert SDUNetConfig.from_diffusers_config(json.loads(json.dumps(config.to_diffusers_config()))) == config


@pytest.mark.parametrize("config", [SD15_UNET, VARIANT_UNET], ids=["sd15", "variant"])
def test_diffusers_builds_the_same_tensors_from_our_config(config):
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):                      # shapes only: instant even at full size
        reference = diffusers.UNet2DConditionModel.from_config(config.to_diffusers_config())
        ours = SDUNet(config)
    expected = {name: tensor.shape for name, tensor in reference.state_dict().items()}
    assert {name: tensor.shape for name, tensor in ours.state_dict().items()} == expected


def test_sd15_parameter_count_and_published_config():
    assert SDUNetConfig.from_diffusers_config(SD15_DIFFUSERS_CONFIG) == SD15_UNET
    with torch.device("meta"):
        model = SDUNet(SD15_UNET)
    assert sum(p.numel() for p in model.parameters()) == 859_520_964


def test_sd21_config_reads_head_counts_per_level():
    config = SDUNetConfig.from_diffusers_config({
        **SD15_DIFFUSERS_CONFIG, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024,
        "use_linear_projection": True, "upcast_attention": True, "sample_size": 96})
    assert config.num_heads == (5, 10, 20, 20) and config.heads(3) == 20
    assert config.linear_projection and config.upcast_attention and config.context_dim == 1024


@pytest.mark.parametrize("changes, message", [
    ({"num_heads": 3}, "not divisible by its num_heads"),
    ({"norm_groups": 12}, "not divisible by norm_groups"),
    ({"attention_levels": (2, 1)}, "attention_levels"),
    ({"attention_levels": (4,)}, "attention_levels"),
    ({"num_heads": (8, 8)}, "one per level"),
    ({"channel_mult": ()}, "channel_mult"),
])
def test_invalid_configs_fail_clearly(changes, message):
    with pytest.raises(UserError, match=message):
        dataclasses.replace(SD15_UNET, **changes)


@pytest.mark.parametrize("changes, message", [
    ({"class_embed_type": "timestep"}, "unsupported UNet2DConditionModel options: class_embed_type"),
    ({"some_future_option": 1}, "unknown keys .*some_future_option"),
    ({"up_block_types": ["UpBlock2D"] * 4}, "do not mirror"),
    ({"layers_per_block": [2, 2, 1, 1]}, "per level"),
    ({"_class_name": "AutoencoderKL"}, "expected a diffusers UNet2DConditionModel"),
])
def test_unsupported_diffusers_configs_fail_clearly(changes, message):
    with pytest.raises(UserError, match=message):
        SDUNetConfig.from_diffusers_config({**SD15_DIFFUSERS_CONFIG, **changes})


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(UserError, match="unknown SDUNetConfig keys"):
        SDUNetConfig.from_dict({"attention_head_dim": 8})


def test_bad_input_shapes_fail_clearly():
    model = SDUNet(TINY_UNET)
    x, t, context = _inputs(TINY_UNET, 2, 8, 8)
    with pytest.raises(ValueError, match="context must have shape"):
        model(x, t, context[:, :, :16])
    with pytest.raises(ValueError, match="t must be"):
        model(x, torch.zeros(3), context)
