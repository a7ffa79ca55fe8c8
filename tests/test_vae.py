"""AutoencoderKL: parity with diffusers, the Gaussian posterior's math, config round trips and invariants."""

import dataclasses
import json
import math

import pytest
import torch

from nanodiffusion.errors import UserError
from nanodiffusion.nets.vae import SD15_VAE, TINY_VAE, AutoencoderKL, DiagonalGaussian, VAEConfig

VARIANT_VAE = VAEConfig(block_channels=(8, 16, 16), layers_per_block=2, norm_groups=4, sample_size=16)

# runwayml/stable-diffusion-v1-5 vae/config.json (written by diffusers 0.6.0: later keys absent)
SD15_DIFFUSERS_CONFIG = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3,
    "sample_size": 512, "up_block_types": ["UpDecoderBlock2D"] * 4,
}


def _random_weights_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter (norms and biases included) random values, so no path hides behind a zero."""
    generator = torch.Generator().manual_seed(seed)
    for parameter in model.parameters():
        parameter.data = torch.randn(parameter.shape, generator=generator) * 0.1
    return model.eval()


def _images(batch: int, height: int, width: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _reference_and_ours(config: VAEConfig):
    diffusers = pytest.importorskip("diffusers")
    reference = _random_weights_(diffusers.AutoencoderKL.from_config(config.to_diffusers_config()))
    ours = AutoencoderKL(VAEConfig.from_diffusers_config(reference.config)).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference, ours


@pytest.mark.parametrize("config", [TINY_VAE, VARIANT_VAE], ids=["tiny", "variant"])
@pytest.mark.parametrize("size", [(16, 16), (16, 24), (17, 23)], ids=["square", "non-square", "odd"])
def test_vae_matches_diffusers(config, size):
    reference, ours = _reference_and_ours(config)
    x = _images(2, *size)
    with torch.no_grad():
        expected, posterior = reference.encode(x).latent_dist, ours.encode(x)
        z = posterior.mean
        decoded, expected_decoded = ours.decode(z), reference.decode(z).sample
    assert (posterior.mean - expected.mean).abs().max() <= 1e-5
    assert (posterior.logvar - expected.logvar).abs().max() <= 1e-5
    assert (posterior.kl() - expected.kl()).abs().max() <= 1e-4 * expected.kl().abs().max()
    assert (decoded - expected_decoded).abs().max() <= 1e-5


def test_shapes_and_batch_of_n_equals_n_batches_of_1():
    model = _random_weights_(AutoencoderKL(TINY_VAE))
    x = _images(3, 16, 24)
    with torch.no_grad():
        mean = model.encode(x).mean
        single = torch.cat([model.encode(x[i:i + 1]).mean for i in range(3)])
        images = model.decode(mean)
        single_images = torch.cat([model.decode(mean[i:i + 1]) for i in range(3)])
    assert mean.shape == (3, 4, 16 // TINY_VAE.downsample_factor, 24 // TINY_VAE.downsample_factor)
    assert images.shape == x.shape
    assert (mean - single).abs().max() <= 1e-5
    assert (images - single_images).abs().max() <= 1e-5


def test_gaussian_posterior_math():
    generator = torch.Generator().manual_seed(0)
    mean, logvar = (torch.randn(2, 4, 32, 32, generator=generator) for _ in range(2))
    posterior = DiagonalGaussian(torch.cat([mean, logvar], dim=1))
    assert torch.equal(posterior.mode(), mean) and torch.allclose(posterior.std, (0.5 * logvar).exp())
    # same generator state, same sample; the standardised sample is N(0, 1)
    first = posterior.sample(torch.Generator().manual_seed(5))
    assert torch.equal(first, posterior.sample(torch.Generator().manual_seed(5)))
    noise = (first - mean) / posterior.std
    assert abs(noise.mean().item()) < 0.03 and abs(noise.std().item() - 1) < 0.03
    # KL(N(m, s^2) || N(0, 1)) = (m^2 + s^2 - 1 - log s^2) / 2 per element, summed per sample
    expected = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).flatten(1).sum(1)
    assert torch.allclose(posterior.kl(), expected)
    assert posterior.kl().shape == (2,)
    # SD clamps logvar to [-30, 20] so exp() stays finite
    extreme = DiagonalGaussian(torch.cat([mean, torch.full_like(logvar, 100.0)], dim=1))
    assert extreme.logvar.max() == 20 and math.isfinite(extreme.kl().max().item())


def test_scaling_factor_is_only_stored():
    assert SD15_VAE.scaling_factor == 0.18215
    model = _random_weights_(AutoencoderKL(TINY_VAE))
    changed = _random_weights_(AutoencoderKL(dataclasses.replace(TINY_VAE, scaling_factor=1.0)))
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model.decode(z), changed.decode(z))


@pytest.mark.parametrize("config", [SD15_VAE, TINY_VAE, VARIANT_VAE], ids=["sd15", "tiny", "variant"])
def test_config_round_trips(config):
    assert VAEConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert VAEConfig.from_diffusers_config(json.loads(json.dumps(config.to_diffusers_config()))) == config


def test_diffusers_builds_the_same_tensors_from_our_config():
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):                      # shapes only: instant even at full size
        reference = diffusers.AutoencoderKL.from_config(SD15_VAE.to_diffusers_config())
        ours = AutoencoderKL(SD15_VAE)
    expected = {name: tensor.shape for name, tensor in reference.state_dict().items()}
    assert {name: tensor.shape for name, tensor in ours.state_dict().items()} == expected


def test_sd15_parameter_count_and_published_config():
    assert VAEConfig.from_diffusers_config(SD15_DIFFUSERS_CONFIG) == SD15_VAE
    assert SD15_VAE.downsample_factor == 8
    with torch.device("meta"):
        model = AutoencoderKL(SD15_VAE)
    assert sum(p.numel() for p in model.parameters()) == 83_653_863


@pytest.mark.parametrize("changes, message", [
    ({"shift_factor": 0.0609}, "unsupported AutoencoderKL options: shift_factor"),
    ({"down_block_types": ["DownEncoderBlock2D"] * 3}, "down_block_types must be 4"),
    ({"some_future_option": 1}, "unknown keys .*some_future_option"),
])
def test_unsupported_diffusers_configs_fail_clearly(changes, message):
    with pytest.raises(UserError, match=message):
        VAEConfig.from_diffusers_config({**SD15_DIFFUSERS_CONFIG, **changes})


def test_invalid_config_and_inputs_fail_clearly():
    with pytest.raises(UserError, match="multiples of norm_groups"):
        VAEConfig(block_channels=(128, 250))
    with pytest.raises(UserError, match="unknown VAEConfig keys"):
        VAEConfig.from_dict({"block_out_channels": [128]})
    model = AutoencoderKL(TINY_VAE)
    with pytest.raises(ValueError, match="latents must have shape"):
        model.decode(torch.zeros(1, 3, 4, 4))
