"""Data-parallel training (DDP over gloo on 127.0.0.1) equals one process on the same global batch.

Two CPU processes train each stage; with batches of 9 every step splits unevenly between them (4 + 5), and
DDP's averaged gradient must still be the gradient of the mean loss over the 9 items. The first step's
gradients match a single process's to within fp32 rounding, and so do the losses of six steps across an
epoch end. (Weights are not compared: Adam turns the rounding noise of near-zero gradients, such as those of
attention key biases, whose exact gradient is 0, into steps of about the learning rate.) A `torchrun` run of
the CLI matches too.
"""

import dataclasses
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fixtures import make_fake_mnist
from nanodiffusion.data.captioned import load_captioned
from nanodiffusion.data.datasets import load_dataset
from nanodiffusion.diffusion.schedules import ScheduleConfig
from nanodiffusion.nets.clip_text import TINY_TEXT
from nanodiffusion.nets.ddpm_unet import TINY_UNET as TINY_DDPM_UNET
from nanodiffusion.nets.mini_clip import MiniCLIPConfig
from nanodiffusion.nets.sd_unet import TINY_UNET
from nanodiffusion.nets.vae import TINY_VAE, AutoencoderKL
from nanodiffusion.training.captions import caption_tokenizer, new_text_encoder, text_config_for
from nanodiffusion.training.clip_trainer import TextEncoderTrainConfig, TextEncoderTrainer
from nanodiffusion.training.ddpm_trainer import DDPMTrainer, TrainConfig
from nanodiffusion.training.latent_trainer import LatentTrainConfig, LatentTrainer
from nanodiffusion.training.vae_trainer import VAETrainConfig, VAETrainer
from nanodiffusion.weights import checkpoint

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

ITEMS = 41                  # batches of 9: five per epoch, the last of 5 items
STEPS = 6                   # into the second epoch
LOOP = dict(batch_size=9, lr=2e-3, warmup_steps=2)
TOLERANCE = dict(rtol=1e-5, atol=1e-6)
VAE = dataclasses.replace(TINY_VAE, in_channels=1, out_channels=1, sample_size=16)


def trainer_factories(folder) -> dict:
    """{stage: make(out_dir, max_steps)}: tiny trainers, the text-to-image ones on 16x16 captioned digits."""
    images = load_dataset("fashion-mnist", data_dir=str(folder))
    captioned = load_captioned("mnist", image_size=16, data_dir=str(folder))
    tokenizer = caption_tokenizer(captioned, 600)
    torch.manual_seed(0)
    vae = AutoencoderKL(dataclasses.replace(VAE, scaling_factor=0.7))
    return {
        "ddpm": lambda out, steps: DDPMTrainer(
            TrainConfig(out_dir=out, max_steps=steps, **LOOP),
            dataclasses.replace(TINY_DDPM_UNET, image_size=28, num_classes=10), ScheduleConfig("linear"),
            images),
        "vae": lambda out, steps: VAETrainer(
            VAETrainConfig(out_dir=out, max_steps=steps, scale_images=16, **LOOP), VAE, captioned),
        "text-encoder": lambda out, steps: TextEncoderTrainer(   # a batch size that 2 processes divide
            TextEncoderTrainConfig(out_dir=out, max_steps=steps, **(LOOP | dict(batch_size=10))),
            MiniCLIPConfig(image_size=16, image_widths=(16, 32), embed_dim=32),
            text_config_for(tokenizer, TINY_TEXT), captioned, tokenizer),
        "unet": lambda out, steps: LatentTrainer(
            LatentTrainConfig(out_dir=out, max_steps=steps, train_text_encoder=True, sample_posterior=True,
                              caption_dropout=0.3, **LOOP),
            TINY_UNET, ScheduleConfig("scaled_linear"), captioned, vae,
            new_text_encoder(tokenizer, TINY_TEXT), tokenizer),
    }


def train_all(folder, out_dir) -> dict:
    """{stage: (losses of STEPS steps, gradients of the trained modules after the first step)}."""
    results = {}
    for stage, make in trainer_factories(folder).items():
        losses = make(f"{out_dir}/{stage}", STEPS).fit().losses
        trainer = make(f"{out_dir}/{stage}-first-step", 1)
        trainer.fit()
        gradients = {f"{prefix}.{name}": parameter.grad for prefix, module in trainer.run.modules.items()
                     for name, parameter in module.named_parameters() if parameter.grad is not None}
        results[stage] = (losses, gradients)
    return results


def worker(rank: int, world_size: int, port: int, folder, out_dir, results_path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        results = train_all(folder, out_dir)
        if rank == 0:
            torch.save(results, results_path)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_every_stage_as_one(tmp_path):
    folder = tmp_path / "data" / "fashion-mnist"
    make_fake_mnist(folder, n=ITEMS)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                # as each worker: the same reduction order, so the same floats
    try:
        single = train_all(folder, tmp_path / "single")
    finally:
        torch.set_num_threads(threads)
    mp.spawn(worker, args=(2, free_port(), folder, tmp_path / "ddp", tmp_path / "ddp.pt"), nprocs=2,
             join=True)
    parallel = torch.load(tmp_path / "ddp.pt")
    for stage, (losses, gradients) in single.items():
        parallel_losses, parallel_gradients = parallel[stage]
        assert len(parallel_losses) == len(losses) == STEPS and gradients.keys() == parallel_gradients.keys()
        torch.testing.assert_close(torch.tensor(parallel_losses), torch.tensor(losses), **TOLERANCE,
                                   msg=lambda m, s=stage: f"{s} losses: {m}")
        for name, gradient in gradients.items():
            torch.testing.assert_close(parallel_gradients[name], gradient, rtol=1e-4, atol=1e-6,
                                       msg=lambda m, s=stage, n=name: f"{s} gradient of {n}: {m}")


def test_torchrun_cli_matches_a_single_process(tmp_path):
    folder = tmp_path / "data" / "fashion-mnist"
    make_fake_mnist(folder, n=ITEMS)
    options = ["train", "--dataset", "fashion-mnist", "--data-dir", str(folder), "--preset", "tiny",
               "--image-size", "16", "--batch-size", "16", "--max-steps", "4", "--warmup-steps", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    single = subprocess.run([sys.executable, "-m", "nanodiffusion", *options, "--out-dir",
                             str(tmp_path / "one")], env=env, capture_output=True, text=True, timeout=120)
    assert single.returncode == 0, single.stderr
    # --standalone: torchrun picks its own free port (no window for another process to take ours)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    parallel = subprocess.run([*torchrun, "-m", "nanodiffusion", *options, "--out-dir",
                               str(tmp_path / "two")],
                              env=env, capture_output=True, text=True, timeout=180)
    assert parallel.returncode == 0, parallel.stderr
    assert parallel.stdout.count("done:") == 1                       # rank 0 alone prints
    single_log, parallel_log = ((tmp_path / run / "log.jsonl").read_text() for run in ("one", "two"))
    # one epoch of 3 steps, then the 4th step's partial epoch, which --max-steps ends
    assert single_log.count("\n") == parallel_log.count("\n") == 2
    expected, got = ([json.loads(line)["loss"] for line in log.splitlines()]
                     for log in (single_log, parallel_log))
    assert got == pytest.approx(expected, rel=1e-5)
    tensors, meta = checkpoint.load_checkpoint(tmp_path / "two" / "last.safetensors")
    assert meta["world_size"] == 2 and "rng.torch.rank1" in tensors and meta["state"]["step"] == 4
