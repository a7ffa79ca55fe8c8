"""TAESD (diffusers' AutoencoderTiny): parity of encode/decode on random weights, its published config, the
folder format, and the tiny autoencoder as a pipeline's VAE against diffusers (txt2img and img2img)."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from nanodiffusion.errors import UserError
from nanodiffusion.nets.taesd import TAESD, TINY_TAESD, AutoencoderTiny, AutoencoderTinyConfig
from nanodiffusion.pipelines.text_to_image import TextToImage
from nanodiffusion.weights import load_sd, load_vae, save_diffusers, save_single_file
from fixtures import random_components, randomize_, save_tiny_diffusers

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

# madebyollin/taesd config.json as saved by diffusers 0.42 (block_out_channels is its copy of the decoder's).
TAESD_JSON = {
    "_class_name": "AutoencoderTiny", "_diffusers_version": "0.42.1", "act_fn": "relu",
    "block_out_channels": [64, 64, 64, 64], "decoder_block_out_channels": [64, 64, 64, 64],
    "encoder_block_out_channels": [64, 64, 64, 64], "force_upcast": False, "in_channels": 3,
    "latent_channels": 4, "latent_magnitude": 3, "latent_shift": 0.5, "num_decoder_blocks": [3, 3, 3, 1],
    "num_encoder_blocks": [1, 3, 3, 3], "out_channels": 3, "scaling_factor": 1.0, "shift_factor": 0.0,
    "upsample_fn": "nearest", "upsampling_scaling_factor": 2,
}
# Another layout: 3 levels (4x), different encoder and decoder widths and block counts.
OTHER = AutoencoderTinyConfig(encoder_channels=8, decoder_channels=16, encoder_blocks=(2, 0, 1),
                              decoder_blocks=(1, 2, 1))
# The latent size of a TINY_TAESD (8x) pipeline matches TINY_UNET's 8x8 at 64x64 pixels.
SIZE = 64


def reference_and_ours(config: AutoencoderTinyConfig, seed: int = 0):
    reference = diffusers.AutoencoderTiny.from_config(config.to_diffusers_config())
    randomize_(reference, seed, fresh=True)
    ours = AutoencoderTiny(AutoencoderTinyConfig.from_diffusers_config(reference.config)).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference, ours


@pytest.mark.parametrize("config", [TINY_TAESD, OTHER], ids=["tiny", "other"])
def test_encode_and_decode_match_diffusers(config):
    reference, ours = reference_and_ours(config)
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, 32, 48, generator=generator) * 2 - 1
    latents = torch.randn(2, 4, 5, 7, generator=generator) * 2
    with torch.no_grad():
        encoded = ours.encode(images)
        assert (encoded - reference.encode(images).latents).abs().max() <= 1e-5
        assert (ours.decode(latents) - reference.decode(latents).sample).abs().max() <= 1e-5
    factor = config.downsample_factor
    assert encoded.shape == (2, 4, 32 // factor, 48 // factor)
    assert ours.decode(latents).shape == (2, 3, 5 * factor, 7 * factor)


def test_published_config_and_parameter_count():
    assert AutoencoderTinyConfig.from_diffusers_config(TAESD_JSON) == TAESD
    assert AutoencoderTinyConfig.from_diffusers_config(json.loads(json.dumps(TAESD.to_diffusers_config()))) \
        == TAESD
    assert AutoencoderTinyConfig.from_dict(json.loads(json.dumps(OTHER.to_dict()))) == OTHER
    with torch.device("meta"):
        reference = diffusers.AutoencoderTiny.from_config(TAESD_JSON)
        ours = AutoencoderTiny(TAESD)
    assert {k: v.shape for k, v in ours.state_dict().items()} == \
        {k: v.shape for k, v in reference.state_dict().items()}
    assert sum(p.numel() for p in ours.encoder.parameters()) == 1_222_532     # about 1.2 M a side
    assert TAESD.downsample_factor == 8 and TAESD.scaling_factor == 1.0


@pytest.mark.parametrize("changes, message", [
    ({"encoder_block_out_channels": [64, 32, 64, 64]}, "one width once per level"),
    ({"act_fn": "silu"}, "unsupported AutoencoderTiny options: act_fn"),
    ({"block_out_channels": [32, 32, 32, 32]}, "must equal decoder_block_out_channels"),
    ({"num_decoder_blocks": [3, 3, 1], "decoder_block_out_channels": [64] * 3, "block_out_channels": None},
     "upsamples 4x"),
])
def test_configs_diffusers_cannot_run_or_we_do_not_implement_fail_clearly(changes, message):
    with pytest.raises(UserError, match=message):
        AutoencoderTinyConfig.from_diffusers_config({**TAESD_JSON, **changes})


@pytest.fixture(scope="module")
def taesd_folder(tmp_path_factory):
    reference = diffusers.AutoencoderTiny.from_config(TINY_TAESD.to_diffusers_config())
    randomize_(reference, 7, fresh=True)
    folder = tmp_path_factory.mktemp("taesd") / "taesd"
    reference.save_pretrained(folder, safe_serialization=True)
    return folder, reference


def test_an_autoencoder_tiny_folder_loads(taesd_folder, tmp_path):
    folder, reference = taesd_folder
    loaded = load_vae(folder)
    assert isinstance(loaded, AutoencoderTiny) and loaded.config == TINY_TAESD
    assert all(torch.equal(value, reference.state_dict()[key]) for key, value in loaded.state_dict().items())
    components = random_components()
    components.vae = loaded                                 # a model folder whose vae/ is TAESD
    save_diffusers(components, tmp_path / "model")
    assert json.loads((tmp_path / "model" / "model_index.json").read_text())["vae"][1] == "AutoencoderTiny"
    assert isinstance(load_sd(tmp_path / "model").vae, AutoencoderTiny)
    with pytest.raises(UserError, match="no place for this vae"):
        save_single_file(components, tmp_path / "model.safetensors")
    (folder.parent / "bad").mkdir()
    (folder.parent / "bad" / "config.json").write_text(json.dumps({"_class_name": "VQModel"}))
    with pytest.raises(UserError, match="unsupported autoencoder 'VQModel'"):
        load_vae(folder.parent / "bad")


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory, taesd_folder):
    """diffusers' and our tiny SD v1.x pipelines, both with the TAESD folder as their VAE."""
    folder = save_tiny_diffusers(tmp_path_factory.mktemp("sd") / "tiny-sd")
    reference = diffusers.StableDiffusionPipeline.from_pretrained(
        folder, vae=diffusers.AutoencoderTiny.from_pretrained(taesd_folder[0]), safety_checker=None,
        requires_safety_checker=False)
    reference.scheduler = diffusers.EulerDiscreteScheduler.from_config(reference.scheduler.config)
    reference.set_progress_bar_config(disable=True)
    ours = TextToImage.from_pretrained(folder, vae=taesd_folder[0])
    ours.show_progress = False
    return reference, ours


def test_text_to_image_with_taesd_matches_diffusers(pipelines):
    reference, ours = pipelines
    assert isinstance(ours.vae, AutoencoderTiny) and ours.vae_factor == 8
    expected = reference("a photo of a cat", num_inference_steps=4, height=SIZE, width=SIZE,
                         generator=torch.Generator().manual_seed(0), output_type="np").images
    got = ours("a photo of a cat", num_steps=4, sampler="euler", height=SIZE, width=SIZE, seed=0,
               output_type="np").images
    assert np.abs(got - expected).max() <= 1e-4 and expected.std() > 0.01


def test_img2img_with_taesd_draws_no_posterior_sample_as_in_diffusers(pipelines):
    reference, ours = pipelines
    img2img = diffusers.StableDiffusionImg2ImgPipeline(**reference.components)
    img2img.set_progress_bar_config(disable=True)
    image = torch.linspace(-1, 1, 3 * SIZE * SIZE).reshape(1, 3, SIZE, SIZE).sin()
    expected = img2img("a photo of a cat", image=(image + 1) / 2, strength=0.5, num_inference_steps=6,
                       generator=torch.Generator().manual_seed(3), output_type="np").images
    got = ours("a photo of a cat", image=image, strength=0.5, num_steps=6, sampler="euler", seed=3,
               output_type="np").images
    assert np.abs(got - expected).max() <= 1e-4


def test_a_module_passed_as_vae_is_used_as_it_is(tmp_path):
    folder = save_tiny_diffusers(tmp_path / "tiny-sd")
    taesd = AutoencoderTiny(dataclasses.replace(TINY_TAESD, latent_channels=4)).eval()
    assert TextToImage.from_pretrained(folder, vae=taesd).vae is taesd
