"""Original single-file layout: rename table against diffusers' converter, config inference, round trips."""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from nanodiffusion.cli import main
from nanodiffusion.errors import UserError
from nanodiffusion.nets.sd_unet import SD15_UNET, TINY_UNET, SDUNetConfig
from nanodiffusion.nets.vae import SD15_VAE, TINY_VAE, VAEConfig
from nanodiffusion.weights import load_sd, save_diffusers, save_single_file
from nanodiffusion.weights.components import SDComponents, build_on_meta, expected_shapes
from nanodiffusion.weights.original_keys import rename_table
from nanodiffusion.weights.single_file import infer_unet_config, infer_vae_config, to_original
from fixtures import tiny_ours
from fixtures import assert_same_weights, random_components, tiny_text_config, tiny_tokenizer

# Layouts beyond TINY_UNET: three levels, attention at the first two and not the last (as SD), one resnet per
# level, two transformer blocks; and one with attention everywhere and linear projections.
THREE_LEVELS = SDUNetConfig(model_channels=32, channel_mult=(1, 2, 3), num_res_blocks=1,
                            attention_levels=(0, 1), transformer_depth=2, context_dim=32, num_heads=8,
                            sample_size=8)
ALL_ATTENTION = SDUNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=3,
                             attention_levels=(0, 1), linear_projection=True, context_dim=32, num_heads=8,
                             sample_size=8)
THREE_LEVEL_VAE = VAEConfig(block_channels=(32, 32, 64), layers_per_block=2, sample_size=32)


def _original(components) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in to_original(components).items()}


@pytest.mark.parametrize("unet", [TINY_UNET, THREE_LEVELS, ALL_ATTENTION], ids=["tiny", "three", "all-attn"])
def test_unet_keys_match_diffusers_converter(unet):
    utils = pytest.importorskip("diffusers.loaders.single_file_utils")
    components = random_components(unet=unet)
    converted = utils.convert_ldm_unet_checkpoint(_original(components), unet.to_diffusers_config())
    ours = components.unet.state_dict()
    assert converted.keys() == ours.keys()
    assert all(torch.equal(converted[key], ours[key]) for key in ours)


@pytest.mark.parametrize("vae", [TINY_VAE, THREE_LEVEL_VAE], ids=["tiny", "three"])
def test_vae_keys_match_diffusers_converter(vae):
    utils = pytest.importorskip("diffusers.loaders.single_file_utils")
    components = random_components(vae=vae)
    original = _original(components)
    assert original["first_stage_model.encoder.mid.attn_1.q.weight"].shape[2:] == (1, 1)   # 1x1 conv there
    converted = utils.convert_ldm_vae_checkpoint(original, vae.to_diffusers_config())
    ours = components.vae.state_dict()
    assert converted.keys() == ours.keys()
    assert all(torch.equal(converted[key].reshape(ours[key].shape), ours[key]) for key in ours)


def test_text_keys_match_diffusers_converter():
    utils = pytest.importorskip("diffusers.loaders.single_file_utils")
    components = random_components()
    converted = utils.convert_ldm_clip_checkpoint(_original(components))
    ours = components.text_encoder.state_dict()
    assert converted.keys() == ours.keys()
    assert all(torch.equal(converted[key], ours[key]) for key in ours)


def test_sd15_table_has_the_well_known_names():
    table = rename_table("unet", SD15_UNET, expected_shapes(build_on_meta("unet", SD15_UNET)))
    prefix = "model.diffusion_model."
    assert table["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"] == \
        prefix + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
    assert table["down_blocks.2.downsamplers.0.conv.weight"] == prefix + "input_blocks.9.0.op.weight"
    assert table["up_blocks.0.upsamplers.0.conv.weight"] == prefix + "output_blocks.2.1.conv.weight"
    assert table["up_blocks.1.upsamplers.0.conv.weight"] == prefix + "output_blocks.5.2.conv.weight"
    assert table["mid_block.resnets.1.time_emb_proj.weight"] == prefix + "middle_block.2.emb_layers.1.weight"
    assert len(set(table.values())) == len(table) == 686          # SD v1.5's UNet has 686 tensors
    vae = rename_table("vae", SD15_VAE, expected_shapes(build_on_meta("vae", SD15_VAE)))
    assert vae["decoder.up_blocks.0.resnets.2.conv1.weight"] == \
        "first_stage_model.decoder.up.3.block.2.conv1.weight"
    assert vae["encoder.down_blocks.1.resnets.0.conv_shortcut.weight"] == \
        "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight"
    assert len(vae) == 248


@pytest.mark.parametrize("unet", [SD15_UNET, TINY_UNET, THREE_LEVELS, ALL_ATTENTION])
def test_unet_config_inferred_from_shapes(unet):
    table = rename_table("unet", unet, shapes := expected_shapes(build_on_meta("unet", unet)))
    original = {table[key][len("model.diffusion_model."):]: shape for key, shape in shapes.items()}
    inferred = infer_unet_config(original)
    assert inferred == dataclasses.replace(unet, num_heads=8, norm_groups=32, sample_size=64)


@pytest.mark.parametrize("vae", [SD15_VAE, THREE_LEVEL_VAE])
def test_vae_config_inferred_from_shapes(vae):
    table = rename_table("vae", vae, shapes := expected_shapes(build_on_meta("vae", vae)))
    original = {table[key][len("first_stage_model."):]: shape for key, shape in shapes.items()}
    assert infer_vae_config(original) == VAEConfig(block_channels=vae.block_channels,
                                                   layers_per_block=vae.layers_per_block)


def test_safetensors_round_trip_keeps_configs_and_tensors(tmp_path):
    components = random_components()
    save_single_file(components, tmp_path / "model.safetensors")
    loaded = load_sd(tmp_path / "model.safetensors", tokenizer=components.tokenizer)
    assert_same_weights(components, loaded)
    assert loaded.scheduler_config == components.scheduler_config


def test_file_without_metadata_infers_sd_configs_and_ignores_extras(tmp_path):
    """A foreign file (no metadata, training leftovers, a .ckpt): configs from shapes, SD v1.x's defaults."""
    # tiny networks whose unstored options are SD v1.x's: 8 heads, 32 groups, 64-wide text heads
    unet = dataclasses.replace(TINY_UNET, num_heads=8, norm_groups=32, sample_size=64)
    vae = VAEConfig(block_channels=(32, 64), layers_per_block=1)
    text = dataclasses.replace(tiny_text_config(), hidden_size=64, num_heads=1)
    components = random_components(unet=unet, vae=vae, text=text)
    state = dict(to_original(components))
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    state.update({"betas": betas.float(), "alphas_cumprod": torch.cumprod(1 - betas, 0).float(),
                  "model_ema.decay": torch.tensor(0.9999),
                  "model_ema.diffusion_modelconv_inweight": torch.zeros(1),
                  "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None],
                  "loss.discriminator.main.0.weight": torch.zeros(2), "lvlb_weights": torch.zeros(1000)})
    torch.save({"state_dict": state, "global_step": 470000}, tmp_path / "foreign.ckpt")
    loaded = load_sd(tmp_path / "foreign.ckpt", trust_pickle=True)
    assert_same_weights(components, loaded)
    assert loaded.scheduler_config["beta_start"] == pytest.approx(0.00085)
    assert loaded.scheduler_config["beta_end"] == pytest.approx(0.012)
    assert loaded.tokenizer is None


def test_fp16_single_file_loads_as_fp32_and_bf16(tmp_path):
    components = random_components()
    save_single_file(components, tmp_path / "full.safetensors")
    save_single_file(load_sd(tmp_path / "full.safetensors", dtype="fp16"), tmp_path / "half.safetensors")
    for dtype in (torch.float32, torch.bfloat16):
        loaded = load_sd(tmp_path / "half.safetensors", dtype=dtype)
        weight = loaded.unet.conv_in.weight
        assert weight.dtype == dtype
        assert torch.equal(weight, components.unet.conv_in.weight.half().to(dtype))


def test_convert_cli_diffusers_to_single_file_and_back(tmp_path, capsys):
    components = random_components()
    save_diffusers(components, tmp_path / "folder")
    tokenizer_folder = tmp_path / "folder" / "tokenizer"
    assert main(["convert", str(tmp_path / "folder"), str(tmp_path / "one.safetensors")]) == 0
    assert main(["convert", str(tmp_path / "one.safetensors"), str(tmp_path / "back"),
                 "--tokenizer", str(tokenizer_folder)]) == 0
    assert main(["convert", str(tmp_path / "back"), str(tmp_path / "one.ckpt"), "--to", "single-file"]) == 0
    assert "wrote" in capsys.readouterr().out
    back = load_sd(tmp_path / "back")
    assert_same_weights(components, back)
    assert back.tokenizer.vocab == tiny_tokenizer().vocab
    for file in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        assert (tmp_path / "folder" / file).read_bytes() == (tmp_path / "back" / file).read_bytes()
    # the .ckpt carries no configs (tiny ones are not inferable from shapes): check its plain tensors
    stored = torch.load(tmp_path / "one.ckpt", weights_only=True)["state_dict"]
    expected = to_original(components)
    assert stored.keys() == expected.keys()
    assert all(torch.equal(stored[key], expected[key]) for key in expected)


def test_convert_cli_half_precision_and_errors(tmp_path, capsys):
    components = random_components()
    save_single_file(components, tmp_path / "one.safetensors")
    assert main(["convert", str(tmp_path / "one.safetensors"), str(tmp_path / "half.safetensors"),
                 "--dtype", "fp16"]) == 0
    with safe_open(tmp_path / "half.safetensors", "pt") as file:
        assert {file.get_slice(key).get_dtype() for key in file.keys()} == {"F16"}
    for argv, message in [
        ([str(tmp_path / "one.safetensors"), str(tmp_path / "folder")], "no tokenizer"),
        ([str(tmp_path / "one.safetensors"), str(tmp_path / "x.safetensors"), "--to", "diffusers"],
         "disagrees"),
        ([str(tmp_path / "missing.safetensors"), str(tmp_path / "y.safetensors")], "no such model file"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(["convert", *argv])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    with pytest.raises(UserError, match="must end with"):
        save_single_file(components, tmp_path / "model.bin")


def test_a_single_file_gets_clips_tokenizer_and_generates_from_the_command_line(tmp_path):
    pipe = tiny_ours(seed=0)                            # a CLIP-vocabulary text encoder, CLIP's tokenizer
    components = SDComponents(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler_config)
    save_single_file(components, tmp_path / "model.safetensors")
    save_diffusers(components, tmp_path / "folder")
    loaded = load_sd(tmp_path / "model.safetensors")
    assert loaded.tokenizer.vocab_size == 49408
    assert loaded.tokenizer("a photo of a cat")[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    settings = ["a photo of a cat", "--steps", 2, "--size", "32x32", "--seed", 3]
    assert main(["generate", *map(str, settings), "--model", str(tmp_path / "model.safetensors"),
                 "--out", str(tmp_path / "file.png")]) == 0
    assert main(["generate", *map(str, settings), "--model", str(tmp_path / "folder"),
                 "--out", str(tmp_path / "folder.png")]) == 0
    with Image.open(tmp_path / "file.png") as file, Image.open(tmp_path / "folder.png") as folder:
        assert np.array_equal(np.asarray(file), np.asarray(folder))


def test_generate_from_a_single_file_without_clips_text_encoder_is_a_clear_error(tmp_path, capsys):
    save_single_file(random_components(), tmp_path / "odd.safetensors")     # a tiny vocabulary, not CLIP's
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "a cat", "--model", str(tmp_path / "odd.safetensors"), "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert "holds no tokenizer and its text encoder is not CLIP's (SD v1.x's)" in err
