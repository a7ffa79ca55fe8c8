"""`nanodiffusion generate --controlnet PATH --control-image IMG` on a tiny model: the ControlNet steers the
image, the PNG records it (A1111's "ControlNet 0" text and our settings), --from replays it bit for bit,
and mistakes are one-line errors."""

import json

import numpy as np
import pytest
from PIL import Image

from nanodiffusion.images import read_png_text
from nanodiffusion.nets.controlnet import ControlNet
from nanodiffusion.weights import SDComponents, save_diffusers
from nanodiffusion.weights.controlnet import save_controlnet
from nanodiffusion.weights.models import model_hash
from fixtures import randomize_, tiny_ours
from test_generate_cli import cli, cli_error
from test_generate_cli import pixels as cli_pixels

FAST = ["--steps", "3", "--size", "32x32", "--seed", "7"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny model folder, a random ControlNet for it (as a single file), and a control image."""
    root = tmp_path_factory.mktemp("control-cli")
    pipe = tiny_ours()
    save_diffusers(SDComponents(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer,
                                pipe.scheduler_config), root / "tiny-sd")
    controlnet = randomize_(ControlNet.from_unet(pipe.unet, embedding_channels=(8, 16)), 3, fresh=True)
    save_controlnet(controlnet, root / "control_tiny_canny.safetensors")
    image = np.zeros((48, 48, 3), np.uint8)
    image[12:36, 12:36] = 255                                      # a white square: four clear edges
    Image.fromarray(image).save(root / "square.png")
    return root / "tiny-sd", root / "control_tiny_canny.safetensors", root / "square.png"


def pixels(path) -> np.ndarray:
    return cli_pixels(path).astype(int)


def test_controlnet_steers_is_recorded_and_replays(files, tmp_path):
    model, controlnet, square = files
    plain, steered, again = tmp_path / "plain.png", tmp_path / "steered.png", tmp_path / "again.png"
    cli("generate", "a box", "--model", model, *FAST, "--out", plain)
    cli("generate", "a box", "--model", model, *FAST, "--controlnet", controlnet, "--control-image", square,
        "--control-preprocess", "canny", "--control-scale", 0.8, "--control-end", 0.7, "--out", steered)
    assert np.abs(pixels(plain) - pixels(steered)).max() > 5
    text = read_png_text(steered)
    digest = model_hash(controlnet)
    assert (f'ControlNet 0: "Module: canny, Model: control_tiny_canny [{digest[:8]}], Weight: 0.8, '
            'Resize Mode: Just Resize, Threshold A: 100, Threshold B: 200, Guidance Start: 0, Guidance End: 0.7, '
            'Pixel Perfect: True, Control Mode: Balanced"') in text["parameters"]
    control, = json.loads(text["nanodiffusion"])["request"]["controls"]
    assert control["model"] == str(controlnet) and control["model_hash"] == digest
    assert control["image"] == str(square) and control["scale"] == 0.8 and control["end"] == 0.7
    cli("generate", "--from", steered, "--out", again)
    assert np.array_equal(pixels(again), pixels(steered))
    weaker = tmp_path / "weaker.png"
    cli("generate", "--from", steered, "--control-scale", 0.2, "--out", weaker)     # a flag changes the unit
    assert np.abs(pixels(weaker) - pixels(steered)).max() > 0
    assert "Weight: 0.2," in read_png_text(weaker)["parameters"]


def test_two_controlnets_take_a_setting_once_for_all_or_once_each(files, tmp_path):
    model, controlnet, square = files
    out = tmp_path / "two.png"
    cli("generate", "a box", "--model", model, *FAST, "--controlnet", controlnet, "--controlnet", controlnet,
        "--control-image", square, "--control-image", square, "--control-scale", 0.5,
        "--control-preprocess", "canny", "--control-preprocess", "none", "--out", out)
    controls = json.loads(read_png_text(out)["nanodiffusion"])["request"]["controls"]
    assert [(c["scale"], c["preprocess"]) for c in controls] == [(0.5, "canny"), (0.5, "none")]


def test_replay_warns_when_the_control_image_changed(files, tmp_path, capsys):
    model, controlnet, _ = files
    square = tmp_path / "mine.png"
    Image.new("RGB", (32, 32), "white").save(square)
    out = tmp_path / "out.png"
    cli("generate", "a box", "--model", model, *FAST, "--controlnet", controlnet, "--control-image", square,
        "--out", out)
    Image.new("RGB", (32, 32), "black").save(square)
    with pytest.warns(UserWarning, match="is not the one recorded"):
        cli("generate", "--from", out, "--out", tmp_path / "again.png")


@pytest.mark.parametrize("argv, message", [
    (["--control-image", "x.png"], "--control-image needs --controlnet PATH"),
    (["--controlnet", "CN"], "give one --control-image per --controlnet: got 0 for 1"),
    (["--controlnet", "CN", "--control-image", "IMG", "--control-scale", "1", "--control-scale", "2"],
     "--control-scale is given 2 times for 1 ControlNets"),
    (["--controlnet", "CN", "--control-image", "IMG", "--control-start", "0.9", "--control-end", "0.5"],
     "0 <= start < end <= 1"),
    (["--controlnet", "missing", "--control-image", "IMG"], "no such ControlNet file or folder: missing"),
    (["--controlnet", "CN", "--control-image", "nowhere.png"], "no such control image file: nowhere.png"),
])
def test_mistakes_are_one_line_errors(files, tmp_path, capsys, argv, message):
    model, controlnet, square = files
    argv = [{"CN": controlnet, "IMG": square}.get(a, a) for a in argv]
    err = cli_error(capsys, "generate", "a box", "--model", model, *FAST, *argv, "--out", tmp_path / "x.png")
    assert message in err and "Traceback" not in err
