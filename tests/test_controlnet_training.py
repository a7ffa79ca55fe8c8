"""Training a ControlNet on a frozen tiny text-to-image model with the Canny edges of shapes: the loss falls,
the frozen networks stay as they were, resume is exact, the written folder steers `generate`, and the CLI
runs it end to end."""

import numpy as np
import pytest
import torch
from PIL import Image

from nanodiffusion.cli import main
from nanodiffusion.control_images.canny import edge_maps
from nanodiffusion.data.captioned import shapes_captioned
from nanodiffusion.errors import UserError
from nanodiffusion.images import read_png_text
from nanodiffusion.training.controlnet_trainer import ControlNetTrainConfig, ControlNetTrainer, edge_control
from nanodiffusion.weights import SDComponents, save_diffusers
from nanodiffusion.weights.controlnet import load_controlnet
from fixtures import tiny_ours

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
EMBEDDING = (8, 16)                     # the tiny VAE halves once


@pytest.fixture(scope="module")
def dataset():
    return shapes_captioned(32, 16, 0)          # 32 scenes at the tiny model's 16 px


def make_trainer(tmp_path, dataset, **changes):
    pipe = tiny_ours()
    pipe.show_progress = False
    settings = dict(out_dir=str(tmp_path / "run"), batch_size=8, lr=1e-3, warmup_steps=0, epochs=3)
    torch.manual_seed(0)
    return ControlNetTrainer(ControlNetTrainConfig(**(settings | changes)), pipe, dataset,
                             embedding_channels=EMBEDDING)


def test_edge_controls_are_the_canny_maps_of_the_images(dataset):
    images = dataset.images[:4]
    maps = edge_control(images, ControlNetTrainConfig())
    assert maps.shape == (4, 3, 16, 16) and set(maps.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(maps[:, 0] * 255, torch.from_numpy(edge_maps(images.numpy())).float())
    assert 0 < maps.mean() < 0.5                                  # edges, not blank or full maps


def test_tiny_run_lowers_the_loss_and_leaves_the_model_alone(tmp_path, dataset):
    trainer = make_trainer(tmp_path, dataset, epochs=4)
    unet_before = {k: v.clone() for k, v in trainer.pipe.unet.state_dict().items()}
    state = trainer.fit()
    first, last = sum(state.losses[:4]) / 4, sum(state.losses[-4:]) / 4
    assert last < 0.8 * first
    assert all(torch.equal(v, unet_before[k]) for k, v in trainer.pipe.unet.state_dict().items())
    written = load_controlnet(tmp_path / "run" / "controlnet")
    for key, value in trainer.ema.shadow.state_dict().items():
        assert torch.equal(written.state_dict()[key], value), key


def test_resume_reproduces_the_uninterrupted_losses(tmp_path, dataset):
    full = make_trainer(tmp_path / "a", dataset, max_steps=6).fit().losses           # 4 steps per epoch
    make_trainer(tmp_path / "b", dataset, max_steps=3).fit()
    resumed = make_trainer(tmp_path / "b", dataset, max_steps=6)
    resumed.resume(tmp_path / "b" / "run" / "last.safetensors")
    assert resumed.state.step == 3
    assert resumed.fit().losses == full[3:]


def test_mismatches_are_clear_errors(tmp_path, dataset):
    with pytest.raises(UserError, match="downscale control images 4x, the model's latents 2x: give 2 widths"):
        ControlNetTrainer(ControlNetTrainConfig(out_dir=str(tmp_path)), tiny_ours(), dataset,
                          embedding_channels=(8, 16, 32))
    with pytest.raises(UserError, match="the model makes 16x16 RGB images"):
        ControlNetTrainer(ControlNetTrainConfig(out_dir=str(tmp_path)), tiny_ours(),
                          shapes_captioned(8, 32, 0), embedding_channels=EMBEDDING)
    with pytest.raises(UserError, match="train its ControlNet for that"):
        ControlNetTrainer(ControlNetTrainConfig(out_dir=str(tmp_path), prediction="v_prediction"),
                          tiny_ours(), dataset, embedding_channels=EMBEDDING)


def test_cli_trains_a_controlnet_that_generate_uses(tmp_path, dataset, capsys):
    pipe = tiny_ours()
    model = tmp_path / "tiny-sd"
    save_diffusers(SDComponents(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer,
                                pipe.scheduler_config), model)
    out = tmp_path / "cn"
    train = ["train", "controlnet", "--model", str(model), "--dataset", "shapes", "--num-shapes", "16",
             "--embedding-channels", "8", "16", "--batch-size", "8", "--lr", "1e-3", "--out-dir", str(out)]
    assert main([*train, "--max-steps", "2"]) == 0
    assert main([*train, "--max-steps", "3", "--resume"]) == 0
    printed = capsys.readouterr().out
    assert "resumed from" in printed and ", step 2" in printed and "done: 3 steps" in printed
    edges = Image.fromarray(edge_maps(dataset.images[:1].numpy())[0]).convert("RGB")
    edges.save(tmp_path / "edges.png")
    image = tmp_path / "image.png"
    assert main(["generate", "a red square", "--model", str(model), "--steps", "3", "--seed", "1",
                 "--controlnet", str(out / "controlnet"), "--control-image", str(tmp_path / "edges.png"),
                 "--out", str(image)]) == 0
    assert "ControlNet 0" in read_png_text(image)["parameters"]
    assert np.asarray(Image.open(image)).shape == (16, 16, 3)
