"""`nanodiffusion generate` and `nanodiffusion info` on a tiny diffusers folder: metadata, exact replay with
--from, one seed per image, grids, GIFs and clear errors."""

import hashlib
import json

import numpy as np
import pytest
from PIL import Image, ImageSequence

from nanodiffusion import __version__
from nanodiffusion.cli import main
from nanodiffusion.commands import generate
from nanodiffusion.images import frame_steps, read_png_text, save_png
from nanodiffusion.weights import SDComponents, save_diffusers
from fixtures import tiny_ours

FAST = ["--steps", "4", "--size", "32x32"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    pipe = tiny_ours()
    folder = tmp_path_factory.mktemp("models") / "tiny-sd"
    save_diffusers(SDComponents(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer,
                                pipe.scheduler_config), folder)
    return folder


def cli(*argv) -> None:
    assert main([str(a) for a in argv]) == 0


def cli_error(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def folder_hash(folder) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*.safetensors")):
        digest.update(file.read_bytes())
    return digest.hexdigest()[:10]


def test_png_carries_a1111_parameters_and_exact_settings(model, tmp_path):
    out = tmp_path / "cat.png"
    cli("generate", "a (red:1.2) cat, sitting", "--model", model, "--negative", "blurry", "--seed", 42,
        "--sampler", "euler_a", "--guidance", 7.5, *FAST, "--out", out)
    assert Image.open(out).size == (32, 32)
    text = read_png_text(out)
    assert text["parameters"] == (
        "a (red:1.2) cat, sitting\nNegative prompt: blurry\n"
        "Steps: 4, Sampler: Euler a, CFG scale: 7.5, Seed: 42, Size: 32x32, "
        f"Model hash: {folder_hash(model)}, Model: tiny-sd, Version: nanodiffusion {__version__}")
    settings = json.loads(text["nanodiffusion"])
    assert settings["request"]["seed"] == 42 and settings["request"]["sampler"] == "euler_a"
    assert settings["model"] == str(model) and settings["dtype"] == "fp32" and settings["device"] == "cpu"


def test_from_replays_the_image_bit_for_bit(model, tmp_path):
    first, again, other = tmp_path / "first.png", tmp_path / "again.png", tmp_path / "other.png"
    cli("generate", "an astronaut riding a horse", "--model", model, "--sampler", "dpmpp_2m", "--seed", 3,
        *FAST, "--out", first)
    cli("generate", "--from", first, "--out", again)
    assert np.array_equal(pixels(first), pixels(again))
    assert read_png_text(first) == read_png_text(again)
    cli("generate", "--from", first, "--seed", 4, "--out", other)         # a flag given with --from wins
    assert json.loads(read_png_text(other)["nanodiffusion"])["request"]["seed"] == 4
    assert not np.array_equal(pixels(first), pixels(other))


def test_each_image_gets_its_own_seed_and_replays_alone(model, tmp_path):
    folder = tmp_path / "out"
    cli("generate", "a photo of a cat", "--model", model, "--seed", 10, "-n", 3, *FAST, "--out-dir", folder,
        "--grid")
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["00000-10.png", "00001-11.png", "00002-12.png", "grid-10.png"]
    assert Image.open(folder / "grid-10.png").size == (64, 64)                # 2 x 2 cells, one empty
    assert "Seed: 11," in read_png_text(folder / "00001-11.png")["parameters"]
    alone = tmp_path / "alone.png"
    cli("generate", "--from", folder / "00001-11.png", "--out", alone)
    assert np.array_equal(pixels(alone), pixels(folder / "00001-11.png"))
    assert not np.array_equal(pixels(folder / "00000-10.png"), pixels(folder / "00001-11.png"))


def test_out_with_several_images_numbers_the_files(model, tmp_path):
    cli("generate", "a cat", "--model", model, "-n", 2, *FAST, "--out", tmp_path / "cat.png", "--grid")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat-0.png", "cat-1.png", "cat-grid.png"]


def test_gif_animates_x0_previews(model, tmp_path):
    gif = tmp_path / "steps.gif"
    cli("generate", "a cat", "--model", model, "--steps", 6, "--size", "32x32", "--seed", 1, "--out",
        tmp_path / "cat.png", "--gif", gif, "--gif-frames", 3)
    with Image.open(gif) as animation:
        frames = [np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(animation)]
    assert len(frames) == 4 and frames[0].shape == (32, 32, 3)          # 3 previews, then the image
    assert frame_steps(6, 3) == {1, 3, 5}


def test_info_prints_the_parameters(model, tmp_path, capsys):
    out = tmp_path / "cat.png"
    cli("generate", "a cat", "--model", model, "--seed", 5, *FAST, "--out", out)
    capsys.readouterr()
    cli("info", out)
    printed = capsys.readouterr().out
    assert printed.startswith("a cat\nSteps: 4, Sampler: PLMS, CFG scale: 7.5, Seed: 5, Size: 32x32")
    assert '"seed": 5' in printed
    cli("info", "--json", out)
    assert json.loads(capsys.readouterr().out)["request"]["prompt"] == "a cat"


def test_default_model_is_the_builtin_one_with_a_clear_error_if_it_is_missing(capsys, tmp_path, monkeypatch):
    from nanodiffusion.weights.models import BUILTIN_TEXT_TO_IMAGE, DEFAULT_TEXT_TO_IMAGE
    assert DEFAULT_TEXT_TO_IMAGE == "builtin" and BUILTIN_TEXT_TO_IMAGE["builtin"].is_dir()
    monkeypatch.setitem(BUILTIN_TEXT_TO_IMAGE, "builtin", tmp_path / "not-installed")
    err = cli_error(capsys, "generate", "a cat", "--out", tmp_path / "x.png")
    assert "error: the built-in text-to-image model ('builtin') is not shipped yet (or was removed)" in err


@pytest.mark.parametrize("argv, message", [
    (["--size", "30x32"], "width must be a positive multiple of 8, got 30"),
    (["--steps", "0"], "number of steps must be an integer >= 1"),
    (["--guidance", "-2"], "guidance_scale must be >= 0"),
    (["--sampler", "nope"], "unknown sampler 'nope'; valid: ddpm, ddim, plms"),
    (["-n", "0"], "the number of images must be from 1 to 100,000, got 0"),
])
def test_bad_flags_are_clear_errors(model, capsys, tmp_path, argv, message):
    err = cli_error(capsys, "generate", "a cat", "--model", model, *argv, "--out", tmp_path / "x.png")
    assert message in err and "Traceback" not in err


def test_errors_without_prompt_or_settings(capsys, tmp_path):
    assert "give a PROMPT" in cli_error(capsys, "generate", "--out", tmp_path / "x.png")
    plain = tmp_path / "plain.png"
    save_png(Image.new("RGB", (8, 8)), plain)
    assert "holds no nanodiffusion settings" in cli_error(capsys, "generate", "--from", plain)
    assert "holds no generation parameters" in cli_error(capsys, "info", plain)


def test_vae_tile_decodes_in_tiles_and_replays(model, tmp_path):
    whole, tiled, again = tmp_path / "whole.png", tmp_path / "tiled.png", tmp_path / "again.png"
    settings = ["a cat", "--model", model, "--steps", 2, "--size", "96x96", "--seed", 7]
    cli("generate", *settings, "--out", whole)
    cli("generate", *settings, "--vae-tile", 32, "--out", tiled)          # 48 latent pixels: 2 x 2 tiles
    difference = np.abs(pixels(whole).astype(int) - pixels(tiled).astype(int))
    assert 0 < difference.max() and difference.mean() < 8                 # blended tiles: close, not equal
    assert json.loads(read_png_text(tiled)["nanodiffusion"])["vae_tile"] == 32
    assert "vae_tile" not in json.loads(read_png_text(whole)["nanodiffusion"])
    cli("generate", "--from", tiled, "--out", again)                      # the tile size is replayed too
    assert np.array_equal(pixels(again), pixels(tiled))


def test_vae_tile_too_small_is_a_clear_error(model, capsys, tmp_path):
    err = cli_error(capsys, "generate", "a cat", "--model", model, "--vae-tile", 16, "--out", tmp_path / "x.png")
    assert "--vae-tile must be >= 32 latent pixels" in err and "Traceback" not in err


def test_large_fp32_models_on_a_bf16_cpu_get_a_hint(model, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(generate, "cpu_has_native_bf16", lambda: True)
    cli("generate", "a cat", "--model", model, *FAST, "--out", tmp_path / "a.png")
    assert "--dtype bf16" not in capsys.readouterr().err                  # a tiny UNet: no hint
    monkeypatch.setattr(generate, "BF16_HINT_PARAMETERS", 1)
    cli("generate", "a cat", "--model", model, *FAST, "--out", tmp_path / "b.png")
    assert "hint: this CPU computes bf16 natively: --dtype bf16" in capsys.readouterr().err
    cli("generate", "a cat", "--model", model, *FAST, "--dtype", "fp32", "--out", tmp_path / "c.png")
    assert "hint" not in capsys.readouterr().err                          # fp32 chosen: no hint
    monkeypatch.setattr(generate, "cpu_has_native_bf16", lambda: False)
    cli("generate", "a cat", "--model", model, *FAST, "--out", tmp_path / "d.png")
    assert "hint" not in capsys.readouterr().err
