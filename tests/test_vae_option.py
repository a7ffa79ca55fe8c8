"""Replacing a model's autoencoder: standalone VAE files (original and diffusers layouts), `generate --vae`
(recorded in the PNG, replayed by --from) and `--preview-vae` (a TAESD decoding only the GIF frames)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence

from nanodiffusion.cli import main
from nanodiffusion.errors import UserError
from nanodiffusion.images import read_png_text
from nanodiffusion.nets.taesd import AutoencoderTiny, AutoencoderTinyConfig
from nanodiffusion.nets.vae import AutoencoderKL, VAEConfig
from nanodiffusion.weights import SDComponents, load_vae, save_diffusers
from nanodiffusion.weights.original_keys import is_conv_as_linear, rename_table
from nanodiffusion.weights.safe_load import write_safetensors
from nanodiffusion.weights.single_file import METADATA_KEY
from fixtures import randomize_, tiny_ours

# 32 GroupNorm groups, as every released SD VAE: a file without our metadata infers this config from shapes.
SMALL_VAE = VAEConfig(block_channels=(32, 32), layers_per_block=1)
# A TAESD that, like the tiny model's VAE, works 2x (the real one is 8x, as SD's VAE).
TAESD_2X = AutoencoderTinyConfig(encoder_channels=8, decoder_channels=8, encoder_blocks=(1, 1),
                                 decoder_blocks=(1, 1))
SETTINGS = ["--steps", 3, "--size", "32x32", "--seed", 5, "--sampler", "euler"]


def original_layout(vae: AutoencoderKL, prefix: str = "") -> dict[str, torch.Tensor]:
    """The VAE's tensors under ldm's names, as A1111's VAE files store them (attention as 1x1 convs)."""
    state = vae.state_dict()
    table = rename_table("vae", vae.config, state)
    return {prefix + original.removeprefix("first_stage_model."):
            state[key][:, :, None, None] if is_conv_as_linear("vae", key) else state[key]
            for key, original in table.items()}


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(value, b.state_dict()[key]) for key, value in a.state_dict().items())


@pytest.mark.parametrize("layout", ["original", "checkpoint-prefix", "diffusers"])
def test_a_vae_file_loads_in_each_layout_with_its_config_from_shapes(tmp_path, layout):
    vae = randomize_(AutoencoderKL(SMALL_VAE), 0)
    tensors = {"original": lambda: original_layout(vae),
               "checkpoint-prefix": lambda: {**original_layout(vae, "first_stage_model."),
                                             "model_ema.decay": torch.tensor(0.9999)},
               "diffusers": vae.state_dict}[layout]()
    write_safetensors(tensors, tmp_path / "vae.safetensors", metadata={"format": "pt"})
    loaded = load_vae(tmp_path / "vae.safetensors")
    assert isinstance(loaded, AutoencoderKL) and loaded.config == SMALL_VAE and same_weights(loaded, vae)


def test_a_vae_file_with_our_metadata_keeps_what_shapes_cannot_tell(tmp_path):
    vae = tiny_ours().vae                                                   # 8 GroupNorm groups
    write_safetensors(original_layout(vae), tmp_path / "vae.safetensors",
                      metadata={METADATA_KEY: json.dumps({"vae": vae.config.to_dict()})})
    loaded = load_vae(tmp_path / "vae.safetensors", dtype="bf16")
    assert loaded.config == vae.config and loaded.decoder.conv_in.weight.dtype == torch.bfloat16


def test_files_that_are_no_vae_or_pickles_are_clear_errors(tmp_path):
    write_safetensors({"conv_in.weight": torch.zeros(1)}, tmp_path / "other.safetensors", metadata={})
    with pytest.raises(UserError, match="is not an autoencoder file"):
        load_vae(tmp_path / "other.safetensors")
    torch.save({"state_dict": original_layout(AutoencoderKL(SMALL_VAE))}, tmp_path / "vae.ckpt")
    with pytest.raises(UserError, match="pickle"):
        load_vae(tmp_path / "vae.ckpt")
    assert load_vae(tmp_path / "vae.ckpt", trust_pickle=True).config == SMALL_VAE


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The tiny model, its own VAE as an A1111-style file, and a 2x TAESD folder."""
    root = tmp_path_factory.mktemp("vae-option")
    pipe = tiny_ours()
    save_diffusers(SDComponents(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer,
                                pipe.scheduler_config), root / "tiny-sd")
    write_safetensors(original_layout(pipe.vae), root / "own-vae.safetensors",
                      metadata={METADATA_KEY: json.dumps({"vae": pipe.vae.config.to_dict()})})
    taesd = randomize_(AutoencoderTiny(TAESD_2X), 1, fresh=True)
    (root / "taesd").mkdir()
    (root / "taesd" / "config.json").write_text(json.dumps(TAESD_2X.to_diffusers_config()))
    write_safetensors(taesd.state_dict(), root / "taesd" / "diffusion_pytorch_model.safetensors",
                      metadata={"format": "pt"})
    return root


def cli(*argv) -> None:
    assert main([str(a) for a in argv]) == 0


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(int)


def test_vae_is_used_recorded_and_replayed(folders, tmp_path):
    model, out = folders / "tiny-sd", tmp_path
    cli("generate", "a cat", "--model", model, *SETTINGS, "--out", out / "plain.png")
    cli("generate", "a cat", "--model", model, *SETTINGS, "--vae", folders / "own-vae.safetensors",
        "--out", out / "own.png")
    assert np.array_equal(pixels(out / "plain.png"), pixels(out / "own.png"))     # the same VAE, from a file
    cli("generate", "a cat", "--model", model, *SETTINGS, "--vae", folders / "taesd", "--out", out / "tiny.png")
    assert not np.array_equal(pixels(out / "plain.png"), pixels(out / "tiny.png"))
    text = read_png_text(out / "tiny.png")
    assert ", VAE hash: " in text["parameters"] and ", VAE: taesd, " in text["parameters"]
    assert json.loads(text["nanodiffusion"])["vae"] == str(folders / "taesd")
    assert "VAE" not in read_png_text(out / "plain.png")["parameters"]
    cli("generate", "--from", out / "tiny.png", "--out", out / "again.png")
    assert np.array_equal(pixels(out / "tiny.png"), pixels(out / "again.png"))
    assert read_png_text(out / "again.png") == text


def gif_frames(path) -> list[np.ndarray]:
    with Image.open(path) as animation:
        return [np.asarray(frame.convert("RGB")).astype(int) for frame in ImageSequence.Iterator(animation)]


def test_preview_vae_decodes_only_the_gif_frames(folders, tmp_path):
    model, out = folders / "tiny-sd", tmp_path
    argv = ["generate", "a cat", "--model", model, *SETTINGS, "--gif-frames", 2]
    cli(*argv, "--out", out / "vae.png", "--gif", out / "vae.gif")
    cli(*argv, "--out", out / "taesd.png", "--gif", out / "taesd.gif", "--preview-vae", folders / "taesd")
    assert np.array_equal(pixels(out / "vae.png"), pixels(out / "taesd.png"))
    assert read_png_text(out / "vae.png") == read_png_text(out / "taesd.png")     # no trace in the PNG
    with_vae, with_taesd = gif_frames(out / "vae.gif"), gif_frames(out / "taesd.gif")
    assert len(with_vae) == len(with_taesd) == 3
    assert not np.array_equal(with_vae[0], with_taesd[0])                        # previews: TAESD's
    assert np.array_equal(with_vae[-1], with_taesd[-1])                          # the image: the VAE's


def test_vae_flag_errors_are_clear(folders, tmp_path, capsys):
    model = folders / "tiny-sd"
    for argv, message in [(["--preview-vae", folders / "taesd"], "--preview-vae decodes the --gif frames"),
                          (["--vae", tmp_path / "missing.safetensors"], "missing.safetensors: no such file or folder"),
                          (["--gif", tmp_path / "x.gif", "--preview-vae", folders / "own-vae.safetensors",
                            "--size", "16x16"], None)]:
        if message is None:                                  # the model's own VAE as a preview VAE is valid
            cli("generate", "a cat", "--model", model, "--steps", 2, *argv, "--out", tmp_path / "ok.png")
            continue
        with pytest.raises(SystemExit):
            main([str(a) for a in ["generate", "a cat", "--model", model, *argv, "--out", tmp_path / "x.png"]])
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
