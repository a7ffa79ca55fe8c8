"""Hostile input to every command: each bad argument ends with exit status 2 and one clear `error: ...` line,
never a traceback, and nothing is written (checked by listing the working folder before and after).

Runs in-process (`cli.main`); a few cases also run as a subprocess, where the exit status and the absence of
a traceback are what the user sees.
"""

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import save_file

from nanodiffusion.cli import build_parser, main
from nanodiffusion.images import save_png
from nanodiffusion.weights.models import BUILTIN_DDPM
from fixtures import make_fake_mnist

TOO_BIG = str(2**64)
SETTINGS = {"format": 1, "version": "0.1.0", "model": "builtin", "model_hash": None, "dtype": "fp32",
            "device": "cpu", "request": {"prompt": "a red circle", "num_steps": 1, "seed": 3, "height": 32,
                                         "width": 32}}
NO_CUDA = "this PyTorch build has no CUDA support|CUDA device\\(s\\) visible"


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """The working folder of a case: a regular file `file`, folders `folder.png` and `folder.safetensors`,
    `full.png` (a link to
    /dev/full where there is one) and PNGs whose nanodiffusion settings were tampered with."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "folder.safetensors").mkdir()
    if Path("/dev/full").exists():
        (tmp_path / "full.png").symlink_to("/dev/full")         # replacing the link never touches the device
    tampered = {"dtype": {"dtype": "fp64"}, "seed-text": {"request": {**SETTINGS["request"], "seed": "1"}},
                "prompt-number": {"request": {**SETTINGS["request"], "prompt": 5}},
                "request-list": {"request": []},
                "guidance-text": {"request": {**SETTINGS["request"], "guidance_scale": "7"}},
                "seed-huge": {"request": {**SETTINGS["request"], "seed": 2**70}},
                "model-number": {"model": 3},
                "size-huge": {"request": {**SETTINGS["request"], "height": 100000, "width": 100000}}}
    for name, change in tampered.items():
        save_png(_image(), tmp_path / f"{name}.png", {"nanodiffusion": json.dumps({**SETTINGS, **change})})
    save_png(_image(), tmp_path / "not-json.png", {"nanodiffusion": "{'request': "})
    save_png(_image(), tmp_path / "settings-list.png", {"nanodiffusion": "[1, 2]"})
    return tmp_path


def _image():
    from PIL import Image
    return Image.new("RGB", (8, 8))


def run_error(argv: list[str], capsys) -> str:
    """Run the command line in-process; return stderr after checking the exit status (2) and that no file
    appeared or changed."""
    before = _listing(Path.cwd())
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err
    assert _listing(Path.cwd()) == before, "the failed command wrote files"
    return err


def _listing(folder: Path) -> dict:
    return {str(path.relative_to(folder)): (path.lstat().st_size, path.lstat().st_mtime_ns)
            for path in folder.rglob("*")}


GENERATE = [
    (["--guidance", "nan"], "argument --guidance: must be a finite number, got 'nan'"),
    (["--guidance", "inf"], "must be a finite number, got 'inf'"),
    (["--guidance", "1e308"], "latents became NaN or infinite while sampling in float32: guidance_scale 1e"),
    (["--seed", TOO_BIG], "seed must be an integer from 0 to 2\\*\\*64 - 1, got 18446744073709551616"),
    (["--seed", "-1"], "seed must be an integer from 0 to 2\\*\\*64 - 1, got -1"),
    (["--seed", str(2**64 - 1), "-n", "2"], "too large for 2 images: image k has seed \\+ k"),
    (["--size", "100000x100000"], "one 100000x100000 image needs about [0-9.]+ GiB of memory, more than"),
    (["--size", "0"], "height must be a positive multiple of 8, got 0"),
    (["--gif", "g.gif", "--gif-frames", "0"], "--gif-frames must be >= 1, got 0"),
    (["--device", "cuda:99"], NO_CUDA),
    (["--device", "bogus"], "unknown device 'bogus'; valid: cpu, cuda, cuda:N, mps"),
    (["--out", "file/x.png"], "cannot write --out in file: file is a file, not a folder"),
    (["--out", "folder.png"], "--out folder.png is a folder: give a file name"),
    (["--out", "full.png"], "--out full.png exists and is not a regular file"),
    (["--out", "x.gif"], "--out must name a .png file"),
    (["--out-dir", "file"], "--out-dir file is a file, not a folder"),
    (["--gif", "file/g.gif"], "cannot write --gif in file"),
    (["--grid", "-n", "2", "--out", "file/x.png"], "cannot write --out in file"),
    (["--clip-skip", "0"], "clip_skip must be >= 1, got 0"),
    (["--clip-skip", "9"], "clip_skip must be between 1 and 4 \\(this model's text encoder layers\\), got 9"),
    (["--steps", "5000"], "the number of steps \\(5000\\) exceeds the schedule's 1000 timesteps"),
    (["-n", str(10**9)], "the number of images must be from 1 to 100,000, got 1000000000"),
    (["--gif", "g.gif", "--gif-frames", "5"], "--gif-frames must be from 1 to the number of steps \\(1\\)"),
    (["--gif", "g.png"], "--gif must name a .gif file \\(that is what is written\\), got g.png"),
    (["--gif", ""], "--gif is empty: give a path"),
    (["--vae-tile", "0"], "--vae-tile must be >= 32"),
]


@pytest.mark.parametrize("flags, message", GENERATE)
def test_generate_refuses(workdir, capsys, flags, message):
    if flags[:1] == ["--out"] and flags[1] == "full.png" and not (workdir / "full.png").exists():
        pytest.skip("no /dev/full here")
    err = run_error(["generate", "a red circle", "--steps", "1", *flags], capsys)
    assert re.search(message, err.strip().splitlines()[-1]), err        # argparse puts its usage above


@pytest.mark.parametrize("prompt, message", [
    ("a \udcff cat", "prompt is not valid text: character 2 is a lone surrogate"),
    ("(cat:" + "9" * 400 + ")", "the emphasis weight of 'cat' is inf"),
    ("(" * 5000 + "cat" + ")" * 5000, "the emphasis weight of 'cat' is [0-9.]+e\\+20[0-9]"),
])
def test_generate_refuses_prompts(workdir, capsys, prompt, message):
    err = run_error(["generate", prompt, "--steps", "1"], capsys)
    assert re.search(message, err), err


@pytest.mark.parametrize("png, message", [
    ("dtype", "dtype.png: its settings name the dtype 'fp64'; valid: fp32, fp16, bf16"),
    ("seed-text", "seed-text.png: its stored settings are not valid: seed must be an integer, got '1'"),
    ("prompt-number", "prompt must be a string or a non-empty list of strings, got 5"),
    ("request-list", "'request' must be an object, got \\[\\]"),
    ("guidance-text", "guidance_scale must be a number, got '7'"),
    ("seed-huge", "seed must be an integer from 0 to 2\\*\\*64 - 1, got 1180591620717411303424"),
    ("model-number", "'model' must be a string, got 3"),
    ("size-huge", "one 100000x100000 image needs about [0-9.]+ GiB of memory"),
    ("not-json", "the nanodiffusion settings text is not valid JSON"),
    ("settings-list", "the nanodiffusion settings text is a JSON list, not an object"),
])
def test_generate_from_a_tampered_png_is_refused(workdir, capsys, png, message):
    err = run_error(["generate", "--from", f"{png}.png"], capsys)
    assert re.search(message, err), err


def test_info_reads_a_broken_settings_chunk_as_an_error(workdir, capsys):
    err = run_error(["info", "--json", "settings-list.png"], capsys)
    assert "settings-list.png: the nanodiffusion settings text is a JSON list" in err


SAMPLE = [
    (["--guidance", "nan"], "must be a finite number, got 'nan'"),
    (["-n", "100000"], "sampling 100000 images at once needs about [0-9.]+ GiB of memory.*ask for fewer"),
    (["-n", "0"], "num_images must be >= 1, got 0"),
    (["--seed", TOO_BIG], "seed must be an integer from 0 to 2\\*\\*64 - 1"),
    (["--steps", "0"], "num_steps must be >= 1, got 0"),
    (["--gif", "g.gif", "--gif-frames", "0"], "--gif-frames must be from 2 \\(x_T and the image\\) to"),
    (["--gif", "g.gif", "--gif-frames", "5"], "--gif-frames must be from 2 .* = 3, got 5"),
    (["--gif", "file/g.gif"], "cannot write --gif in file"),
    (["--out", "folder.png"], "--out folder.png is a folder"),
    (["--out", "full.png"], "exists and is not a regular file"),
    (["--out", "x.jpg"], "--out must name a .png file"),
    (["--out-dir", "file"], "--out-dir file is a file, not a folder"),
    (["--label", "Sock"], "unknown class 'Sock'; valid: T-shirt/top"),
]


@pytest.mark.parametrize("flags, message", SAMPLE)
def test_sample_refuses(workdir, capsys, flags, message):
    if "full.png" in flags and not (workdir / "full.png").exists():
        pytest.skip("no /dev/full here")
    err = run_error(["sample", "-n", "2", "--steps", "2", *flags], capsys)
    assert re.search(message, err), err


@pytest.mark.parametrize("argv, frames", [
    (["sample", "-n", "2", "--steps", "3"], 4),                 # x_T and one frame per step
    (["generate", "a", "--steps", "2"], 3),                     # one preview per step, then the image
])
def test_gif_frames_follow_the_steps_by_default(workdir, argv, frames):
    """With their defaults (50 and 10 frames) GIFs of runs with fewer steps work."""
    from PIL import Image
    assert main([*argv, "--gif", "g.gif"]) == 0
    with Image.open("g.gif") as gif:
        assert gif.n_frames == frames


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    """DDPM models whose metadata is not JSON, or has no "unet" (flipped bytes: test_training_bad_inputs)."""
    folder = tmp_path_factory.mktemp("broken")
    with safe_open(BUILTIN_DDPM["fashion-mnist"], framework="pt") as file:
        tensors = {key: file.get_tensor(key) for key in file.keys()}
        meta = json.loads(file.metadata()["nanodiffusion"])
    save_file(tensors, folder / "not-json.safetensors", metadata={"nanodiffusion": "{unet: "})
    save_file(tensors, folder / "no-unet.safetensors",
              metadata={"nanodiffusion": json.dumps({k: v for k, v in meta.items() if k != "unet"})})
    return folder


@pytest.mark.parametrize("argv, message", [
    (["export", "fashion-mnist", "out.safetensors", "--notes", "{bad"],
     "--notes must be a JSON object such as .*: Expecting property name"),
    (["export", "fashion-mnist", "out.safetensors", "--notes", "[1]"], "--notes must be a JSON object"),
    (["export", "fashion-mnist", "out.safetensors", "--notes", '{"a": NaN}'], "NaN is not a JSON number"),
    (["export", "fashion-mnist", "."], "the model file must end with .safetensors, got ."),
    (["export", "fashion-mnist", "file/out.safetensors"], "cannot write OUT in file"),
    (["sample", "BROKEN/not-json.safetensors"], "not-json.safetensors is damaged: its 'nanodiffusion' "),
    (["sample", "BROKEN/no-unet.safetensors"], "no-unet.safetensors is damaged or not this kind of"),
    (["convert", "builtin", "file/out.safetensors"], "cannot write DST in file"),
    (["convert", "builtin", "file"], "DST file is a file, not a folder"),
    (["convert", "builtin", "folder.safetensors"], "DST folder.safetensors is a folder"),
    (["forward", "-n", "0"], "-n must be >= 1, got 0"),
    (["forward", "--seed", "-1"], "--seed must be an integer from 0 to 2\\*\\*64 - 1"),
    (["forward", "--out", "folder.png"], "--out folder.png is a folder"),
    (["eval", "-n", "0", "--steps", "1"], "evaluation needs at least 2 images .*got 0"),
    (["eval", "--seed", "-1"], "--seed must be an integer from 0"),
    (["eval", "--guidance", "inf"], "must be a finite number, got 'inf'"),
    (["eval", "--json", "file/x.json"], "cannot write --json in file"),
    (["eval", "--batch-size", "100000"], "sampling 100000 images at once needs about"),
    (["eval", "builtin", "-n", "5"], "-n is for DDPM models"),
    (["info", "file"], "cannot read PNG file"),
])
def test_other_commands_refuse(workdir, broken, capsys, argv, message):
    err = run_error([arg.replace("BROKEN", str(broken)) for arg in argv], capsys)
    assert re.search(message, err), err


@pytest.fixture
def data_dir(tmp_path):
    make_fake_mnist(tmp_path / "mnist", n=16)
    make_fake_mnist(tmp_path / "fashion-mnist", n=16)
    return str(tmp_path)


DDPM = ["--preset", "tiny", "--batch-size", "8", "--max-steps", "1"]
VAE = ["vae", "--dataset", "mnist", "--block-channels", "16", "32", "--norm-groups", "8", "--batch-size", "8",
       "--max-steps", "1", "--image-size", "16"]


@pytest.mark.parametrize("argv, message", [
    ([*DDPM, "--lr", "nan"], "argument --lr: must be a finite number, got 'nan'"),
    ([*DDPM, "--lr", "0"], "lr must be > 0, got 0"),
    ([*DDPM, "--weight-decay", "-1"], "weight_decay must be >= 0, got -1"),
    ([*DDPM, "--ema-decay", "2"], "ema_decay must be in \\[0, 1\\), got 2.0"),
    ([*DDPM, "--min-snr-gamma", "0"], "min_snr_gamma must be > 0, got 0"),
    ([*DDPM, "--image-size", "0"], "image size must be positive, got 0"),
    ([*DDPM, "--seed", TOO_BIG], "seed must be an integer from 0 to 2\\*\\*64 - 1"),
    ([*DDPM, "--device", "bogus"], "unknown device 'bogus'"),
    ([*DDPM, "--device", "cuda:99"], NO_CUDA),
    ([*DDPM, "--out-dir", "file"], "the output folder \\(out_dir\\) file is a file, not a folder"),
    ([*DDPM, "--out-dir", "file/run"], "cannot write the output folder \\(out_dir\\) in file/run"),
    ([*DDPM, "--resume", "file"], "file is not a readable safetensors checkpoint"),
    ([*DDPM, "--epochs", "0"], "epochs must be >= 1, got 0"),
    ([*VAE, "--recon-std", "0"], "recon_std must be > 0, got 0"),
    ([*VAE, "--kl-weight=-inf"], "must be a finite number, got '-inf'"),
    ([*DDPM, "--image-size", "100000"], "loading 16 images at 100000x100000 needs about [0-9.]+ GiB of "
                                        "memory, more than the [0-9.]+ GiB available on cpu: ask for a "
                                        "smaller --image-size"),
    ([*DDPM, "--batch-size", "100000"], "training on batches of 100000 images of 28x28 needs about .* lower "
                                        "--batch-size or --image-size"),
    (["text-encoder", "--dataset", "mnist", "--text-width", "32", "--text-heads", "3", "--max-steps", "1"],
     "hidden_size=32 must be divisible by num_heads=3"),
    (["unet", "--dataset", "mnist", "--vae", "folder.png", "--sample-guidance", "nan"],
     "must be a finite number, got 'nan'"),
])
def test_train_refuses(workdir, data_dir, capsys, argv, message):
    err = run_error(["train", *argv, "--data-dir", data_dir], capsys)
    assert re.search(message, err), err


def test_every_float_option_refuses_nan_and_infinities():
    """No option of any command or training stage parses a float with plain `float` (which takes 'nan')."""
    parsers, visited, plain = [build_parser()], [], []
    while parsers:
        parser = parsers.pop()
        visited.append(parser.prog)
        for action in parser._actions:
            if action.type is float:
                plain.append(f"{parser.prog} {'/'.join(action.option_strings)}")
            if isinstance(action, argparse._SubParsersAction):            # commands and train's stages
                parsers += [sub for sub in action.choices.values() if sub.prog not in visited]
    assert "nanodiffusion train unet" in visited and "nanodiffusion generate" in visited
    assert not plain, f"options parsed with float instead of finite_float: {plain}"


def test_the_process_exits_with_status_2_and_no_traceback(tmp_path):
    root = Path(__file__).resolve().parent.parent
    argv = [sys.executable, "-m", "nanodiffusion", "generate", "a", "--seed", "-1"]
    done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(root)})
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr == "error: seed must be an integer from 0 to 2**64 - 1, got -1\n"
    assert not list(tmp_path.iterdir())



@pytest.mark.parametrize("error, status", [
    (RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried "
                  "to allocate 1073741824 bytes."), 1),
    (RuntimeError("a bug of ours"), None),
])
def test_torch_allocation_failures_are_one_line_errors_and_bugs_still_raise(monkeypatch, capsys, error, status):
    import nanodiffusion.commands.info as info

    def fail(args):
        raise error
    monkeypatch.setattr(info, "run", fail)
    if status is None:
        with pytest.raises(RuntimeError, match="a bug of ours"):
            main(["info", "x.png"])
        return
    with pytest.raises(SystemExit) as exited:
        main(["info", "x.png"])
    assert exited.value.code == status
    err = capsys.readouterr().err
    assert err.startswith("error: out of memory") and "can't allocate memory" in err and err.count("\n") == 1
