import dataclasses
import json

import pytest
import torch

from nanodiffusion.data.datasets import load_dataset
from nanodiffusion.diffusion.schedules import ScheduleConfig
from nanodiffusion.errors import UserError
from nanodiffusion.nets.ddpm_unet import TINY_UNET
from nanodiffusion.pipelines.ddpm import DDPMPipeline
from nanodiffusion.training.ddpm_trainer import DDPMTrainer, TrainConfig
from nanodiffusion.weights import checkpoint

UNET = dataclasses.replace(TINY_UNET, image_size=28, num_classes=10)


def make_trainer(tmp_path, fake_fashion_dir, **changes):
    settings = {"out_dir": str(tmp_path / "run"), "batch_size": 16, "lr": 2e-3, "warmup_steps": 0, "epochs": 3}
    config = TrainConfig(**(settings | changes))
    dataset = load_dataset("fashion-mnist", data_dir=str(fake_fashion_dir))
    return DDPMTrainer(config, UNET, ScheduleConfig("linear"), dataset)


def test_tiny_training_run_lowers_the_loss(tmp_path, fake_fashion_dir):
    state = make_trainer(tmp_path, fake_fashion_dir, epochs=8).fit()
    first, last = sum(state.losses[:4]) / 4, sum(state.losses[-4:]) / 4
    assert last < 0.6 * first
    assert (tmp_path / "run" / "best.safetensors").is_file() and (tmp_path / "run" / "last.safetensors").is_file()


def test_resume_reproduces_the_uninterrupted_losses(tmp_path, fake_fashion_dir):
    # 64 images / batch 16 = 4 steps per epoch: stop mid-epoch (step 6) to exercise the saved batch order
    full = make_trainer(tmp_path / "a", fake_fashion_dir, max_steps=10).fit().losses
    make_trainer(tmp_path / "b", fake_fashion_dir, max_steps=6).fit()
    resumed = make_trainer(tmp_path / "b", fake_fashion_dir, max_steps=10)
    resumed.resume(tmp_path / "b" / "run" / "last.safetensors")
    assert resumed.state.step == 6
    assert resumed.fit().losses == full[6:]


def test_checkpoint_holds_the_json_config_and_loads_for_sampling(tmp_path, fake_fashion_dir):
    trainer = make_trainer(tmp_path, fake_fashion_dir, max_steps=2)
    trainer.fit()
    path = tmp_path / "run" / "last.safetensors"
    tensors, meta = checkpoint.load_checkpoint(path)
    assert meta["kind"] == "ddpm" and meta["unet"]["num_classes"] == 10 and meta["schedule"]["kind"] == "linear"
    assert json.loads(json.dumps(meta)) == meta
    assert any(k.startswith("ema.") for k in tensors) and any(k.startswith("optim.") for k in tensors)
    pipe = DDPMPipeline.from_pretrained(path)
    torch.testing.assert_close(pipe.unet.state_dict(), trainer.ema.shadow.state_dict())


def test_a_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.safetensors"
    checkpoint.save_checkpoint(path, {"w": torch.ones(3)}, {"step": 1})

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", crash)
    with pytest.raises(RuntimeError):
        checkpoint.save_checkpoint(path, {"w": torch.zeros(3)}, {"step": 2})
    tensors, meta = checkpoint.load_checkpoint(path)
    assert meta == {"step": 1} and torch.equal(tensors["w"], torch.ones(3))
    assert list(tmp_path.iterdir()) == [path]                  # no temporary file left behind


def test_bad_checkpoints_are_clear_errors(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_text("<html>404 not found</html>")
    with pytest.raises(UserError, match="not a readable safetensors"):
        checkpoint.load_checkpoint(bad)
    with pytest.raises(UserError, match="not found"):
        checkpoint.load_checkpoint(tmp_path / "missing.safetensors")


def test_dataset_and_model_mismatch_is_a_clear_error(tmp_path, fake_fashion_dir):
    dataset = load_dataset("fashion-mnist", data_dir=str(fake_fashion_dir))
    with pytest.raises(UserError, match="28x28 but the model expects 16x16"):
        DDPMTrainer(TrainConfig(out_dir=str(tmp_path)), TINY_UNET, ScheduleConfig(), dataset)
