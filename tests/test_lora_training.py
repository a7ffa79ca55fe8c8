"""`nanodiffusion train lora` on a tiny model and a captioned image folder: the loss falls, the file is a
kohya LoRA that our loader and diffusers' `load_lora_weights` (PEFT) apply alike, the frozen model stays
untouched, and resuming gives the uninterrupted run's LoRA exactly."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from server_fakes import save_tiny_model
from nanodiffusion.cli import main
from nanodiffusion.pipelines.text_to_image import TextToImage

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning",
                                        "ignore::DeprecationWarning")

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
FAST = ["--batch-size", "4", "--lr", "1e-2", "--seed", "0"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Eight 32x32 pictures of a red or a blue square, each captioned by a .txt file beside it."""
    folder = tmp_path_factory.mktemp("squares")
    for i in range(8):
        pixels = np.zeros((32, 32, 3), np.uint8)
        pixels[8 + i % 3: 20 + i % 3, 6:18, i % 2 * 2] = 220             # red (0) or blue (2) channel
        Image.fromarray(pixels).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a {'blue' if i % 2 else 'red'} square")
    return folder


def train(model, images, out, *extra) -> None:
    assert main(["train", "lora", "--model", str(model), "--dataset", str(images), "--out-dir", str(out),
                 *FAST, *map(str, extra)]) == 0


def test_trained_lora_loads_in_our_pipeline_and_in_diffusers(model, images, tmp_path, capsys):
    train(model, images, tmp_path / "run", "--max-steps", 4, "--text-encoder-lora", "--name", "square",
          "--rank", 2, "--alpha", 1)
    assert "rank-2 LoRA" in capsys.readouterr().out
    path = tmp_path / "run" / "square.safetensors"
    tensors = load_file(path)
    assert any(key.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj") for key in tensors)
    assert tensors["lora_unet_mid_block_attentions_0_proj_in.lora_down.weight"].shape[0] == 2
    with safe_open(path, "pt") as file:
        assert file.metadata()["ss_network_dim"] == "2" and file.metadata()["ss_steps"] == "4"

    ours = TextToImage.from_pretrained(model)
    ours.show_progress = False
    settings = dict(num_steps=2, sampler="euler", seed=0, output_type="np", height=32, width=32)
    base = ours("a red square", **settings).images
    ours.load_lora_weights(path)
    got = ours("a red square", **settings).images
    assert np.abs(got - base).max() > 1e-3                              # the trained LoRA changes the image

    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    reference = diffusers.StableDiffusionPipeline.from_pretrained(model, safety_checker=None,
                                                                  requires_safety_checker=False)
    reference.scheduler = diffusers.EulerDiscreteScheduler.from_config(reference.scheduler.config)
    reference.set_progress_bar_config(disable=True)
    reference.load_lora_weights(str(path))
    expected = reference("a red square", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                         height=32, width=32, output_type="np").images
    assert np.abs(got - expected).max() <= 1e-4


def test_training_leaves_the_model_untouched_and_lowers_the_loss(model, images, tmp_path):
    from nanodiffusion.data.captioned import load_captioned
    from nanodiffusion.training.lora_trainer import LoRATrainConfig, LoRATrainer
    pipe = TextToImage.from_pretrained(model)
    before = {key: value.clone() for key, value in pipe.unet.state_dict().items()}
    dataset = load_captioned(str(images), image_size=32, channels=3)
    config = LoRATrainConfig(out_dir=str(tmp_path / "run"), epochs=12, batch_size=8, lr=2e-2, rank=4)
    state = LoRATrainer(config, pipe, dataset, ("tiny-sd", None)).fit()
    assert sum(state.losses[-3:]) < 0.9 * sum(state.losses[:3])
    assert all(torch.equal(value, before[key]) for key, value in pipe.unet.state_dict().items())


def test_resume_gives_the_uninterrupted_lora(model, images, tmp_path):
    train(model, images, tmp_path / "full", "--max-steps", 4, "--ema")
    train(model, images, tmp_path / "split", "--max-steps", 2, "--ema")
    train(model, images, tmp_path / "split", "--max-steps", 4, "--ema", "--resume")
    full, resumed = load_file(tmp_path / "full" / "full.safetensors"), \
        load_file(tmp_path / "split" / "split.safetensors")
    assert full.keys() == resumed.keys()
    assert all(torch.equal(full[key], resumed[key]) for key in full)


def train_error(capsys, model, images, out, *extra) -> str:
    with pytest.raises(SystemExit) as exit_info:
        train(model, images, out, *extra)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: ")
    return error


def test_resuming_another_lora_is_a_clear_error(model, images, tmp_path, capsys):
    train(model, images, tmp_path / "run", "--max-steps", 1)
    assert "another LoRA" in train_error(capsys, model, images, tmp_path / "run", "--rank", 8, "--resume")


@pytest.mark.parametrize("argv, message", [
    (["--rank", "0"], "rank must be >= 1"),
    (["--alpha", "0"], "alpha must be > 0"),
    (["--name", "a/b"], "LoRA name"),
    (["--image-size", "31"], "multiple of"),
])
def test_bad_settings_are_clear_errors(model, images, tmp_path, capsys, argv, message):
    assert message in train_error(capsys, model, images, tmp_path / "run", "--max-steps", 1, *argv)


def test_the_star_demo_checker_names_held_out_renders():
    """scripts/lora_star_demo.py's checker (docs/adapters.md's adherence figures): stars and the shapes data
    set's four shapes, rendered at random colours, sizes and places, are each named right."""
    spec = importlib.util.spec_from_file_location("lora_star_demo", SCRIPTS / "lora_star_demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    assert demo.checker_accuracy(4, seed=7) == {"circle": 1.0, "square": 1.0, "triangle": 1.0, "cross": 1.0,
                                                "star": 1.0}
    blank = torch.zeros(3, 32, 32, dtype=torch.uint8)
    assert demo.judge(blank, "red") == {"shape": "none", "color_ok": False, "star": False}
