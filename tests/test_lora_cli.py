"""LoRAs and embeddings from the command line: `generate --lora PATH[:WEIGHT]`, A1111's `<lora:NAME:WEIGHT>`
with `--lora-dir`, `--embeddings-dir`; the PNG records them (A1111's "Lora hashes") and `--from` replays
them; every mistake is a one-line error."""

import hashlib
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from server_fakes import save_tiny_model
from test_generate_cli import cli, pixels
from test_generate_cli import cli_error as generate_cli_error
from lora_fixtures import lora_layers, write_kohya
from nanodiffusion.adapters.prompt_loras import split_lora_tags
from nanodiffusion.cli import main
from nanodiffusion.errors import UserError
from nanodiffusion.images import read_png_text
from nanodiffusion.pipelines.text_to_image import TextToImage

FAST = ["--steps", "3", "--size", "32x32", "--seed", "5", "--sampler", "euler"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="module")
def loras(model, tmp_path_factory):
    """A LoRA folder: style.safetensors (UNet and text encoder) and sub/ink.safetensors (UNet only)."""
    folder = tmp_path_factory.mktemp("loras")
    pipe = TextToImage.from_pretrained(model)
    networks = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    write_kohya(folder / "style.safetensors", lora_layers(networks, seed=1), alpha=2.0,
                metadata={"ss_network_dim": "4"})
    (folder / "sub").mkdir()
    write_kohya(folder / "sub" / "ink.safetensors", lora_layers(networks, text_encoder=(), seed=2))
    return folder


def cli_error(capsys, *argv) -> str:
    """The error line of a refused command: one line, no traceback."""
    err = generate_cli_error(capsys, *argv).strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def addnet_hash(path) -> str:
    """sha256 of the bytes after the safetensors header, first 12 hex digits (kohya's / A1111's)."""
    data = path.read_bytes()
    return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()[:12]


def test_lora_flag_matches_the_python_api_and_is_recorded(model, loras, tmp_path):
    out = tmp_path / "style.png"
    cli("generate", "a cat", "--model", model, *FAST, "--lora", f"{loras / 'style.safetensors'}:0.7",
        "--out", out)
    cli("generate", "a cat", "--model", model, *FAST, "--out", tmp_path / "plain.png")
    pipe = TextToImage.from_pretrained(model)
    pipe.show_progress = False
    pipe.load_lora_weights(loras / "style.safetensors")
    pipe.set_adapters("style", 0.7)
    expected = pipe("a cat", num_steps=3, height=32, width=32, seed=5, sampler="euler").images[0]
    assert np.array_equal(pixels(out), np.asarray(expected))
    assert not np.array_equal(pixels(out), pixels(tmp_path / "plain.png"))
    parameters = read_png_text(out)["parameters"]
    assert f'Lora hashes: "style: {addnet_hash(loras / "style.safetensors")}"' in parameters
    assert "Lora hashes" not in read_png_text(tmp_path / "plain.png")["parameters"]


def test_prompt_tags_equal_the_flag_and_replay_with_from(model, loras, tmp_path):
    flagged, tagged, again = tmp_path / "flag.png", tmp_path / "tag.png", tmp_path / "again.png"
    cli("generate", "a cat", "--model", model, *FAST, "--lora", loras / "style.safetensors:0.5",
        "--lora", loras / "sub" / "ink.safetensors", "--out", flagged)
    cli("generate", "a cat <lora:style:0.5> <lora:ink>", "--model", model, *FAST, "--lora-dir", loras,
        "--out", tagged)
    assert np.array_equal(pixels(flagged), pixels(tagged))              # the tags are cut from the text
    parameters = read_png_text(tagged)["parameters"]
    assert parameters.startswith("a cat <lora:style:0.5> <lora:ink>\n")   # A1111 keeps them in the prompt
    assert "Lora hashes: \"style: " in parameters and ", ink: " in parameters
    for image in (flagged, tagged):
        cli("generate", "--from", image, "--out", again)
        assert np.array_equal(pixels(again), pixels(image))
        assert read_png_text(again) == read_png_text(image)


def test_embeddings_dir_adds_each_file_as_a_word(model, tmp_path, capsys):
    folder = tmp_path / "embeddings"
    folder.mkdir()
    vectors = torch.randn(2, 32, generator=torch.Generator().manual_seed(0))
    save_file({"emb_params": vectors}, str(folder / "sparkle.safetensors"))
    save_file({"emb_params": torch.zeros(1, 768)}, str(folder / "wide.safetensors"))   # an SD 1.x one
    out = tmp_path / "sparkle.png"
    cli("generate", "a sparkle cat", "--model", model, *FAST, "--embeddings-dir", folder, "--out", out)
    assert "warning: embedding wide skipped" in capsys.readouterr().err
    pipe = TextToImage.from_pretrained(model)
    pipe.show_progress = False
    pipe.load_textual_inversion(folder / "sparkle.safetensors")
    expected = pipe("a sparkle cat", num_steps=3, height=32, width=32, seed=5, sampler="euler").images[0]
    assert np.array_equal(pixels(out), np.asarray(expected))
    again = tmp_path / "again.png"
    cli("generate", "--from", out, "--out", again)
    assert np.array_equal(pixels(again), pixels(out))


def test_an_lcm_lora_gets_a_hint_not_a_change(model, loras, tmp_path, capsys):
    lcm = tmp_path / "lcm-lora-sdv1-5.safetensors"
    lcm.write_bytes((loras / "sub" / "ink.safetensors").read_bytes())
    cli("generate", "a cat", "--model", model, *FAST, "--lora", lcm, "--out", tmp_path / "a.png")
    assert "hint: lcm-lora-sdv1-5 is an LCM-LoRA" in capsys.readouterr().err
    cli("generate", "a cat", "--model", model, "--size", "32", "--sampler", "lcm", "--steps", 4,
        "--guidance", 1, "--lora", lcm, "--out", tmp_path / "b.png")
    assert "hint" not in capsys.readouterr().err


@pytest.mark.parametrize("prompt, extra, message", [
    ("a cat <lora:nope:1>", ["--lora-dir", "LORAS"], "no LoRA 'nope' in the LoRA folder"),
    ("a cat <lora:style:1>", [], "no LoRA folder is set (--lora-dir"),
    ("a cat <lora:style:heavy>", ["--lora-dir", "LORAS"], "the weight must be a number, got 'heavy'"),
    ("a cat <hypernet:x:1>", ["--lora-dir", "LORAS"], "extra networks of kind 'hypernet' are not supported"),
    ("a cat", ["--lora", "missing.safetensors"], "missing.safetensors"),
    ("a cat", ["--lora", "PICKLE"], "is a pickle file"),
    ("a cat", ["--lora-dir", "missing-dir"], "--lora-dir missing-dir is not a folder"),
    ("a cat", ["--embeddings-dir", "missing-dir"], "--embeddings-dir missing-dir is not a folder"),
])
def test_mistakes_are_one_line_errors(model, loras, tmp_path, capsys, prompt, extra, message):
    pickle = tmp_path / "old.pt"
    torch.save({"a": torch.zeros(1)}, pickle)
    extra = [{"LORAS": loras, "PICKLE": pickle}.get(arg, arg) for arg in extra]
    err = cli_error(capsys, "generate", prompt, "--model", model, *FAST, *extra, "--out", tmp_path / "x.png")
    assert message in err


def test_tags_are_parsed_as_a1111_writes_them():
    assert split_lora_tags("a <lora:a:0.5>cat<lora:b> <LORA:a:.25> <lyco:c:-1>") == \
        ("a cat  ", {"a": 0.75, "b": 1.0, "c": -1.0})
    assert split_lora_tags("no tags (here:1.2)") == ("no tags (here:1.2)", {})
    with pytest.raises(UserError, match="separate text-encoder and UNet weights"):
        split_lora_tags("<lora:a:1:0.5>")


def test_tag_loras_leave_after_their_generation_and_the_callers_stay(model, loras):
    pipe = TextToImage.from_pretrained(model)
    pipe.show_progress = False
    original = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    pipe.set_lora_dir(loras)
    pipe.load_lora_weights(loras / "sub" / "ink.safetensors")
    pipe.set_adapters("ink", 0.5)
    settings = dict(num_steps=1, height=32, width=32, seed=0, output_type="latent")
    pipe("a cat <lora:style:0.3>", **settings)
    assert pipe.lora.active == {"ink": 0.5, "style": 0.3}
    assert set(pipe.lora_hashes()) == {"ink", "style"}
    pipe("a cat", **settings)
    assert pipe.lora.active == {"ink": 0.5} and "style" not in pipe.lora.adapters
    pipe.unload_lora_weights()
    assert all(torch.equal(value, original[key]) for key, value in pipe.unet.state_dict().items())
    with pytest.raises(UserError, match="name different LoRAs"):
        pipe(["a <lora:style>", "a dog"], **settings)


def test_png_json_names_the_adapters(model, loras, tmp_path):
    out = tmp_path / "x.png"
    cli("generate", "a cat <lora:ink:0.5>", "--model", model, *FAST, "--lora-dir", loras, "--out", out)
    settings = json.loads(read_png_text(out)["nanodiffusion"])
    assert settings["lora_dir"] == str(loras) and list(settings["lora_hashes"]) == ["ink"]
