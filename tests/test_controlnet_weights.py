"""ControlNet weights: the original key layout against diffusers' converter, config inference from shapes,
the same weights loaded from a diffusers folder and from single files, and the errors for other files."""

import dataclasses

import pytest
import torch
from safetensors.torch import save_file

from nanodiffusion.errors import UserError
from nanodiffusion.nets.controlnet import SD15_CONTROLNET, TINY_CONTROLNET, ControlNet, ControlNetConfig
from nanodiffusion.nets.sd_unet import TINY_UNET, SDUNetConfig
from nanodiffusion.weights.components import build_on_meta, expected_shapes
from nanodiffusion.weights.controlnet import (infer_controlnet_config, load_controlnet, save_controlnet,
                                              to_original)
from nanodiffusion.weights.controlnet_keys import original_names
from fixtures import randomize_

# Three levels with attention at the first two, one resnet per level, two transformer blocks.
THREE_LEVELS = ControlNetConfig(
    unet=SDUNetConfig(model_channels=32, channel_mult=(1, 2, 3), num_res_blocks=1, attention_levels=(0, 1),
                      transformer_depth=2, context_dim=32, sample_size=None),
    embedding_channels=(8, 8, 16, 32))
# What shapes cannot tell takes SD v1.x's values without a UNet config: 8 heads, 32 GroupNorm groups.
TINY_SD_DEFAULTS = dataclasses.replace(
    TINY_CONTROLNET, unet=dataclasses.replace(TINY_CONTROLNET.unet, num_heads=8, norm_groups=32))


def _random(config: ControlNetConfig = TINY_CONTROLNET, seed: int = 0) -> ControlNet:
    return randomize_(ControlNet(config), seed, fresh=True)


def _original(controlnet: ControlNet, prefix: str = "control_model.") -> dict[str, torch.Tensor]:
    return {key: value.clone().contiguous() for key, value in to_original(controlnet, prefix).items()}


def _assert_same(first: ControlNet, second: ControlNet) -> None:
    assert first.config == second.config
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


@pytest.mark.parametrize("config", [TINY_CONTROLNET, THREE_LEVELS], ids=["tiny", "three"])
def test_keys_match_diffusers_converter(config):
    utils = pytest.importorskip("diffusers.loaders.single_file_utils")
    controlnet = _random(config)
    converted = utils.convert_controlnet_checkpoint(_original(controlnet), config.to_diffusers_config())
    ours = controlnet.state_dict()
    assert {key for key, value in converted.items() if value is not None} == ours.keys()
    assert all(torch.equal(converted[key], ours[key]) for key in ours)


def test_sd15_table_has_the_well_known_names():
    table = original_names(SD15_CONTROLNET, expected_shapes(build_on_meta("controlnet", SD15_CONTROLNET)))
    assert table["controlnet_cond_embedding.conv_in.weight"] == "control_model.input_hint_block.0.weight"
    assert table["controlnet_cond_embedding.blocks.5.bias"] == "control_model.input_hint_block.12.bias"
    assert table["controlnet_cond_embedding.conv_out.weight"] == "control_model.input_hint_block.14.weight"
    assert table["controlnet_down_blocks.11.weight"] == "control_model.zero_convs.11.0.weight"
    assert table["controlnet_mid_block.bias"] == "control_model.middle_block_out.0.bias"
    assert table["down_blocks.2.downsamplers.0.conv.weight"] == "control_model.input_blocks.9.0.op.weight"
    assert table["mid_block.attentions.0.proj_in.weight"] == "control_model.middle_block.1.proj_in.weight"
    assert len(set(table.values())) == len(table) == 340    # the tensors of control_v11p_sd15_canny.pth


@pytest.mark.parametrize("config, unet", [
    (SD15_CONTROLNET, None), (TINY_SD_DEFAULTS, None), (TINY_CONTROLNET, TINY_UNET),
    (dataclasses.replace(THREE_LEVELS, unet=dataclasses.replace(THREE_LEVELS.unet, norm_groups=32)), None),
], ids=["sd15", "tiny-sd-defaults", "tiny-from-unet", "three"])
def test_config_inferred_from_shapes(config, unet):
    shapes = expected_shapes(build_on_meta("controlnet", config))
    table = original_names(config, shapes, prefix="")
    assert infer_controlnet_config({table[key]: shape for key, shape in shapes.items()}, unet) == config


def test_safetensors_round_trip_keeps_the_config(tmp_path):
    controlnet = _random(TINY_CONTROLNET)
    save_controlnet(controlnet, tmp_path / "control.safetensors")
    _assert_same(load_controlnet(tmp_path / "control.safetensors"), controlnet)


@pytest.mark.parametrize("prefix", ["control_model.", ""], ids=["prefixed", "bare"])
def test_original_file_without_metadata_loads_with_the_unet_config(tmp_path, prefix):
    controlnet = _random(TINY_CONTROLNET)
    save_file(_original(controlnet, prefix), tmp_path / "control_tiny.safetensors")
    _assert_same(load_controlnet(tmp_path / "control_tiny.safetensors", unet=TINY_UNET), controlnet)
    assert load_controlnet(tmp_path / "control_tiny.safetensors").config == TINY_SD_DEFAULTS
    (tmp_path / "control_tiny.safetensors").rename(tmp_path / "control_v11e_tiny_shuffle.safetensors")
    assert load_controlnet(tmp_path / "control_v11e_tiny_shuffle.safetensors").config.global_pool  # as A1111


def test_pth_needs_trust_pickle_and_v10_files_skip_their_sd_model(tmp_path):
    """A v1.0-style .pth: {"state_dict": ...} holding an SD model and training leftovers besides the
    ControlNet; only `control_model.*` is read, and only with trust_pickle."""
    controlnet = _random(TINY_CONTROLNET)
    state = {**_original(controlnet), "model.diffusion_model.conv_in.weight": torch.zeros(4, 4, 3, 3),
             "first_stage_model.decoder.conv_out.bias": torch.zeros(3), "lvlb_weights": torch.zeros(10)}
    torch.save({"state_dict": state}, tmp_path / "control_sd15_tiny.pth")
    with pytest.raises(UserError, match="pickle checkpoint"):
        load_controlnet(tmp_path / "control_sd15_tiny.pth")
    loaded = load_controlnet(tmp_path / "control_sd15_tiny.pth", trust_pickle=True, unet=TINY_UNET)
    _assert_same(loaded, controlnet)


def test_same_weights_from_a_folder_and_a_single_file_give_the_same_residuals(tmp_path):
    controlnet = _random(TINY_CONTROLNET)
    save_controlnet(controlnet, tmp_path / "folder")
    save_file(_original(controlnet), tmp_path / "control.safetensors")
    from_folder = load_controlnet(tmp_path / "folder", dtype="bf16")
    from_file = load_controlnet(tmp_path / "control.safetensors", dtype="bf16", unet=TINY_UNET)
    assert from_folder.conv_in.weight.dtype == torch.bfloat16
    generator = torch.Generator().manual_seed(0)
    x, context = torch.randn(1, 4, 8, 8, generator=generator), torch.randn(1, 5, 32, generator=generator)
    image = torch.rand(1, 3, 64, 64, generator=generator)
    with torch.no_grad():
        first = from_folder(x.bfloat16(), 500.0, context.bfloat16(), image)
        second = from_file(x.bfloat16(), 500.0, context.bfloat16(), image)
    assert all(torch.equal(a, b) for a, b in zip([*first[0], first[1]], [*second[0], second[1]]))


def test_diffusers_reads_our_folder_and_we_read_theirs(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    controlnet = _random(TINY_CONTROLNET)
    save_controlnet(controlnet, tmp_path / "ours")
    theirs = diffusers.ControlNetModel.from_pretrained(tmp_path / "ours")
    assert all(torch.equal(theirs.state_dict()[key], value) for key, value in controlnet.state_dict().items())
    theirs.save_pretrained(tmp_path / "theirs", safe_serialization=True)
    _assert_same(load_controlnet(tmp_path / "theirs"), controlnet)


def _single_file(tmp_path, state: dict, name: str = "control.safetensors"):
    save_file({key: value.contiguous() for key, value in state.items()}, tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize("change, message", [
    (lambda s: {**s, "control_model.label_emb.0.0.weight": torch.zeros(4, 4)}, "is an SDXL ControlNet"),
    (lambda s: {k.replace("control_model.", "model.diffusion_model."): v for k, v in s.items()},
     "is a Stable Diffusion model, not a ControlNet"),
    (lambda s: {**s, "difference": torch.zeros(1)}, "'difference' ControlNet"),
    (lambda s: {"lora_unet_down.weight": torch.zeros(2)}, "looks like a LoRA"),
    (lambda s: {k: v for k, v in s.items() if "zero_convs.3." not in k},
     "2 missing: control_model.zero_convs.3"),
    (lambda s: {**s, "control_model.extra.weight": torch.zeros(1)}, "1 unexpected: control_model.extra"),
])
def test_other_files_are_named(tmp_path, change, message):
    path = _single_file(tmp_path, change(_original(_random(TINY_CONTROLNET))))
    with pytest.raises(UserError, match=message):
        load_controlnet(path, unet=TINY_UNET)


def test_diffusers_weights_file_points_to_its_folder(tmp_path):
    controlnet = _random(TINY_CONTROLNET)
    path = _single_file(tmp_path, controlnet.state_dict(), "diffusion_pytorch_model.safetensors")
    with pytest.raises(UserError, match="weights of a diffusers ControlNet: pass the folder"):
        load_controlnet(path)
    sdxl = {**controlnet.state_dict(), "add_embedding.linear_1.weight": torch.zeros(2, 2)}
    with pytest.raises(UserError, match="SDXL ControlNet in diffusers' layout"):
        load_controlnet(_single_file(tmp_path, sdxl, "sdxl.safetensors"))


def test_sd2_controlnet_for_an_sd15_model_fails_clearly(tmp_path):
    """Caught from shapes (a 1024-wide context) when loading for the model, in both layouts."""
    sd2 = ControlNetConfig(unet=dataclasses.replace(TINY_UNET, context_dim=1024, sample_size=None),
                           embedding_channels=TINY_CONTROLNET.embedding_channels)
    controlnet = _random(sd2)
    path = _single_file(tmp_path, _original(controlnet), "control_sd21.safetensors")
    save_controlnet(controlnet, tmp_path / "folder")
    sd15 = dataclasses.replace(TINY_UNET, context_dim=768)
    for source in (path, tmp_path / "folder"):
        with pytest.raises(UserError, match="made for SD 2.x .* the model is SD v1.x"):
            load_controlnet(source, unet=sd15)


def test_missing_paths_and_bad_folders_fail_clearly(tmp_path):
    with pytest.raises(UserError, match="no such ControlNet"):
        load_controlnet(tmp_path / "nowhere.safetensors")
    (tmp_path / "pipeline" / "controlnet").mkdir(parents=True)
    (tmp_path / "pipeline" / "controlnet" / "config.json").write_text("{}")
    with pytest.raises(UserError, match="pass its controlnet/ subfolder"):
        load_controlnet(tmp_path / "pipeline")
    with pytest.raises(UserError, match="folder or a .safetensors"):
        save_controlnet(_random(), tmp_path / "control.pth")
