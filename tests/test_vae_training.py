"""VAE training (stage 1 of text-to-image): the negative ELBO, a tiny run, exact resume, the measured latent
scaling factor and the CLI."""

import dataclasses
import json
import math

import pytest
import torch

from fixtures import make_fake_mnist
from nanodiffusion.cli import main
from nanodiffusion.data.captioned import load_captioned
from nanodiffusion.nets.vae import TINY_VAE, DiagonalGaussian
from nanodiffusion.training.export import load_component
from nanodiffusion.training.vae_trainer import (
    VAETrainConfig, VAETrainer, latent_scaling_factor, negative_elbo,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

VAE = dataclasses.replace(TINY_VAE, in_channels=1, out_channels=1, sample_size=16)


@pytest.fixture
def dataset(tmp_path):
    """64 toy digits (class k: a bar at row 2k+2) at 16x16, captioned by every wording of their class."""
    make_fake_mnist(tmp_path / "mnist")
    return load_captioned("mnist", image_size=16, data_dir=str(tmp_path / "mnist"))


def make_trainer(tmp_path, dataset, **changes):
    settings = dict(out_dir=str(tmp_path / "run"), batch_size=16, lr=3e-3, warmup_steps=0, epochs=3,
                    scale_images=64)
    return VAETrainer(VAETrainConfig(**(settings | changes)), VAE, dataset)


def test_negative_elbo_is_the_gaussian_log_likelihood_plus_kl_per_dimension():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, 8, 8, generator=generator)
    reconstruction = torch.randn(3, 1, 8, 8, generator=generator)
    posterior = DiagonalGaussian(torch.randn(3, 8, 4, 4, generator=generator))
    sigma, beta = 0.3, 0.5
    likelihood = torch.distributions.Normal(reconstruction, sigma).log_prob(x).flatten(1).sum(1)  # log p(x|z)
    q = torch.distributions.Normal(posterior.mean, posterior.std)
    kl = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).flatten(1).sum(1)
    dims = x[0].numel()
    constant = dims / 2 * math.log(2 * math.pi * sigma**2)           # dropped by negative_elbo
    terms = negative_elbo(x, reconstruction, posterior, recon_std=sigma, kl_weight=beta)
    torch.testing.assert_close(terms["loss"] * dims, -likelihood - constant + beta * kl)
    torch.testing.assert_close(terms["kl"], kl)
    torch.testing.assert_close(terms["mse"], (x - reconstruction).pow(2).flatten(1).mean(1))


def test_tiny_run_lowers_the_loss_and_logs_both_terms(tmp_path, dataset):
    state = make_trainer(tmp_path, dataset, epochs=6, sample_every_epochs=6).fit()
    first, last = sum(state.losses[:4]) / 4, sum(state.losses[-4:]) / 4
    assert last < 0.3 * first
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    epochs = [r for r in records if "epoch" in r]
    assert len(epochs) == 6 and all({"loss", "mse", "kl", "images_per_s"} <= r.keys() for r in epochs)
    assert epochs[-1]["mse"] < epochs[0]["mse"]
    assert (tmp_path / "run" / "samples" / "epoch_0006.png").is_file()
    assert (tmp_path / "run" / "vae" / "config.json").is_file()


def test_resume_reproduces_the_uninterrupted_losses(tmp_path, dataset):
    full = make_trainer(tmp_path / "a", dataset, max_steps=10).fit().losses       # 4 steps per epoch
    make_trainer(tmp_path / "b", dataset, max_steps=6).fit()
    resumed = make_trainer(tmp_path / "b", dataset, max_steps=10)
    resumed.resume(tmp_path / "b" / "run" / "last.safetensors")
    assert resumed.state.step == 6
    assert resumed.fit().losses == full[6:]


def test_exported_scaling_factor_gives_latents_unit_std(tmp_path, dataset):
    make_trainer(tmp_path, dataset, max_steps=8, seed=3).fit()
    vae = load_component(tmp_path / "run", "vae").eval()
    factor = vae.config.scaling_factor
    assert factor != TINY_VAE.scaling_factor and vae.config.sample_size == 16
    # latents as latent_scaling_factor draws them: all 64 images in Generator(seed) order, z ~ q(z|x)
    generator = torch.Generator().manual_seed(3)
    order = torch.randperm(len(dataset), generator=generator)
    with torch.no_grad():
        posterior = vae.encode(dataset.batch(order, generator)[0])
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
    assert (z * factor).std().item() == pytest.approx(1.0, abs=1e-5)
    assert latent_scaling_factor(vae, dataset, 64, seed=3) == pytest.approx(factor, rel=1e-6)


def test_cli_trains_and_exports_a_vae(tmp_path, capsys):
    make_fake_mnist(tmp_path / "mnist")
    out = tmp_path / "vae-run"
    data = ["--dataset", "mnist", "--data-dir", str(tmp_path / "mnist"), "--image-size", "16"]
    main(["train", "vae", *data, "--block-channels", "16", "32",
          "--norm-groups", "8", "--batch-size", "16", "--max-steps", "3", "--warmup-steps", "0",
          "--scale-images", "32", "--out-dir", str(out)])
    assert "done: 3 steps" in capsys.readouterr().out
    config = json.loads((out / "vae" / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderKL" and config["block_out_channels"] == [16, 32]
    assert config["in_channels"] == 1 and config["scaling_factor"] != TINY_VAE.scaling_factor
    main(["train", "vae", *data, "--block-channels", "16", "32",
          "--norm-groups", "8", "--batch-size", "16", "--max-steps", "5", "--out-dir", str(out), "--resume"])
    assert "resumed from" in capsys.readouterr().out
