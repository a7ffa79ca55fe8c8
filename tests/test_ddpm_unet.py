import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from nanodiffusion.errors import UserError
from nanodiffusion.nets.ddpm_unet import (DEFAULT_UNET, TINY_UNET, TUTORIAL_UNET, UNET_PRESETS, DDPMUNet,
                                          DDPMUNetConfig)

RGB_32 = dataclasses.replace(TINY_UNET, in_channels=3, out_channels=3, image_size=32, channel_mult=(1, 2, 2),
                             attention_levels=(2,))
FOUR_LEVELS_28 = dataclasses.replace(TINY_UNET, image_size=28, channel_mult=(1, 1, 2, 2),
                                     attention_levels=(3,))


def random_unet(config: DDPMUNetConfig, seed: int = 0) -> DDPMUNet:
    """An eval-mode net whose zero-initialised layers are perturbed, so that every path affects the output."""
    torch.manual_seed(seed)
    model = DDPMUNet(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def inputs(config: DDPMUNetConfig, batch: int, size: int | None = None, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    size = size or config.image_size
    x = torch.randn(batch, config.in_channels, size, size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g).float()
    labels = torch.randint(0, config.num_classes + 1, (batch,), generator=g) if config.num_classes else None
    return x, t, labels


@pytest.mark.parametrize("config, size", [
    *[(c, None) for c in UNET_PRESETS.values()],
    (TINY_UNET, 28),              # 28 → 14: the resnet UNet runs at any size, not only image_size
    (TINY_UNET, 13),              # 13 → 7 → 13: the upsample takes the skip's size
    (FOUR_LEVELS_28, None),       # 28 → 14 → 7 → 4 → 7 → 14 → 28
    (RGB_32, None),
    (dataclasses.replace(TUTORIAL_UNET, image_size=32), None),
])
def test_output_shape_equals_input_shape(config, size):
    x, t, labels = inputs(config, batch=2, size=size)
    with torch.no_grad():
        assert random_unet(config)(x, t, labels).shape == x.shape


def test_tutorial_preset_has_the_tutorial_layout():
    """Widths 10/20/40 at 28/14/7, a 3×3 bottleneck of width 40, 28×28 output (7 → 6 → 3 and back)."""
    model = random_unet(TUTORIAL_UNET)
    shapes = []
    stages = [*model.tutorial.down_stages, model.tutorial.mid_stage, *model.tutorial.up_stages]
    for stage in stages:
        stage.register_forward_hook(lambda module, args, out: shapes.append(tuple(out.shape[1:])))
    x, t, _ = inputs(TUTORIAL_UNET, batch=1)
    with torch.no_grad():
        model(x, t)
    assert shapes == [(10, 28, 28), (20, 14, 14), (40, 7, 7),            # down stages
                      (40, 3, 3),                                         # bottleneck
                      (20, 7, 7), (10, 14, 14), (10, 28, 28)]             # up stages
    assert isinstance(model.tutorial.up_stages[-1].blocks[-1].norm, torch.nn.Identity)   # last block: no norm
    with pytest.raises(UserError, match="only runs at its image_size 28"):
        model(torch.randn(1, 1, 32, 32), t)


def test_fresh_resnet_unet_predicts_zero():
    """Zero-initialised output conv (and last convs of the blocks): the untrained net starts at 0."""
    x, t, labels = inputs(TINY_UNET, batch=2)
    assert torch.equal(DDPMUNet(TINY_UNET)(x, t, labels), torch.zeros_like(x))


@pytest.mark.parametrize("config", [TINY_UNET, TUTORIAL_UNET, RGB_32])
def test_batch_of_n_equals_n_batches_of_one(config):
    model = random_unet(config)
    x, t, labels = inputs(config, batch=3)
    with torch.no_grad():
        batched = model(x, t, labels)
        single = torch.cat([model(x[i:i + 1], t[i:i + 1], None if labels is None else labels[i:i + 1])
                            for i in range(3)])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)


def test_scalar_timestep_is_broadcast():
    model = random_unet(TINY_UNET)
    x, _, labels = inputs(TINY_UNET, batch=2)
    with torch.no_grad():
        broadcast = model(x, torch.tensor(250.0), labels)
        torch.testing.assert_close(broadcast, model(x, torch.full((2,), 250.0), labels))


def test_class_labels_change_the_output_and_none_is_the_null_class():
    model = random_unet(TINY_UNET)
    x, t, _ = inputs(TINY_UNET, batch=2)
    assert model.null_class == TINY_UNET.num_classes == 3
    with torch.no_grad():
        out_0 = model(x, t, torch.tensor([0, 0]))
        out_1 = model(x, t, torch.tensor([1, 1]))
        out_null = model(x, t, torch.full((2,), model.null_class))
        out_none = model(x, t, None)
    assert (out_0 - out_1).abs().max() > 1e-3
    assert torch.equal(out_null, out_none)
    assert model.class_embedding.num_embeddings == TINY_UNET.num_classes + 1


def test_bad_forward_inputs_raise_clear_errors():
    model = random_unet(TINY_UNET)
    x, t, _ = inputs(TINY_UNET, batch=2)
    with pytest.raises(UserError, match=r"class_labels must be in 0\.\.3"):
        model(x, t, torch.tensor([0, 4]))
    with pytest.raises(UserError, match="class_labels must be int64"):
        model(x, t, torch.tensor([0.0, 1.0]))
    with pytest.raises(UserError, match=r"t must be a scalar or of shape \(2,\)"):
        model(x, torch.zeros(3), None)
    unconditional = random_unet(dataclasses.replace(TINY_UNET, num_classes=None))
    assert unconditional.null_class is None
    with pytest.raises(UserError, match="unconditional"):
        unconditional(x, t, torch.tensor([0, 1]))


@pytest.mark.parametrize("config", [*UNET_PRESETS.values(), RGB_32])
def test_config_round_trips_through_json(config):
    data = json.loads(json.dumps(config.to_dict()))
    assert isinstance(data["channel_mult"], list)
    assert DDPMUNetConfig.from_dict(data) == config


def test_default_preset_is_the_default_config_and_fits_20_mb():
    assert DEFAULT_UNET == DDPMUNetConfig()
    assert sum(p.numel() for p in DDPMUNet(DEFAULT_UNET).parameters()) * 4 <= 20e6


@pytest.mark.parametrize("changes, message", [
    (dict(model_channels=20), "divisible by norm_groups=8"),
    (dict(num_heads=3), "divisible by num_heads=3"),
    (dict(attention_levels=(2,)), r"attention_levels must be distinct levels in 0\.\.1"),
    (dict(channel_mult=[1, 2]), "channel_mult must be a tuple"),
    (dict(channel_mult=()), "channel_mult must be non-empty"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
    (dict(num_classes=0), "num_classes must be None or a positive integer"),
    (dict(model_channels=0), "model_channels must be a positive integer"),
    (dict(arch="transformer"), "unknown arch 'transformer'; valid: resnet, tutorial"),
])
def test_invalid_resnet_configs_raise(changes, message):
    with pytest.raises(UserError, match=message):
        dataclasses.replace(TINY_UNET, **changes)


@pytest.mark.parametrize("changes, message", [
    (dict(num_classes=10), "num_classes must be None"),
    (dict(attention_levels=(2,)), r"attention_levels must be \(\)"),
    (dict(dropout=0.1), "dropout must be 0"),
    (dict(num_res_blocks=1), "num_res_blocks must be at least 2"),
    (dict(model_channels=5, channel_mult=(1, 2, 3)), "must be even"),
    (dict(image_size=6), "image_size 6 is too small"),
])
def test_invalid_tutorial_configs_raise(changes, message):
    with pytest.raises(UserError, match=message):
        dataclasses.replace(TUTORIAL_UNET, **changes)


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(UserError, match=r"unknown DDPMUNetConfig keys \['heads'\]"):
        DDPMUNetConfig.from_dict({**TINY_UNET.to_dict(), "heads": 2})


@pytest.mark.parametrize("config", [TINY_UNET, TUTORIAL_UNET])
def test_adamw_steps_lower_the_denoising_loss_on_a_fixed_batch(config):
    torch.manual_seed(0)
    model = DDPMUNet(config).train()
    x0, t, labels = inputs(config, batch=4)
    x0 = x0.sign()                                           # crude "images" in {-1, 1}
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    x_t = 0.6 * x0 + 0.8 * eps                               # a noisy sample with alpha_bar = 0.36
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(15):
        loss = F.mse_loss(model(x_t, t, labels), eps)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0]


@pytest.mark.parametrize("config", [TINY_UNET, TUTORIAL_UNET])
def test_bf16_autocast_channels_last_is_finite_and_close_to_fp32(config):
    model = random_unet(config)
    x, t, labels = inputs(config, batch=2)
    with torch.no_grad():
        reference = model(x, t, labels)
        model = model.to(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x.to(memory_format=torch.channels_last), t, labels)
    assert out.shape == x.shape and torch.isfinite(out).all()
    if config.arch == "resnet":                             # no layout flip inside the resnet net
        assert out.is_contiguous(memory_format=torch.channels_last)
    assert ((out.float() - reference).norm() / reference.norm()).item() < 0.05


@pytest.mark.parametrize("scale_shift", [False, True])
def test_resnet_unet_matches_diffusers_unet2dmodel(scale_shift):
    """Same keys and, with the same random weights, the same output as diffusers' UNet2DModel (fp32)."""
    diffusers = pytest.importorskip("diffusers")
    config = dataclasses.replace(RGB_32, image_size=16, use_scale_shift_norm=scale_shift,
                                 attention_levels=(1,))
    ours = random_unet(config)
    reference = diffusers.UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=16, norm_num_groups=8,
        attn_norm_num_groups=8, num_class_embeds=4, time_embedding_dim=32,
        resnet_time_scale_shift="scale_shift" if scale_shift else "default").eval()
    assert set(reference.state_dict()) == set(ours.state_dict())
    reference.load_state_dict(ours.state_dict())
    x, t, labels = inputs(config, batch=2)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, labels), reference(x, t, labels).sample, atol=1e-5, rtol=1e-5)
