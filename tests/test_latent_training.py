"""Latent UNet training (stage 3 of text-to-image) with a frozen or a jointly trained text encoder: tiny runs,
exact resume, caption dropout, the exported diffusers folder in TextToImage and in diffusers, and the CLI
running all three stages."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from fixtures import make_fake_mnist
from nanodiffusion.cli import main
from nanodiffusion.data.captioned import load_captioned
from nanodiffusion.diffusion.schedules import ScheduleConfig
from nanodiffusion.nets.clip_text import TINY_TEXT
from nanodiffusion.nets.sd_unet import TINY_UNET, SDUNet
from nanodiffusion.nets.vae import TINY_VAE, AutoencoderKL
from nanodiffusion.pipelines.text_to_image import TextToImage
from nanodiffusion.tokenizer import CLIPTokenizer
from nanodiffusion.training.captions import all_captions, caption_tokenizer, new_text_encoder
from nanodiffusion.training.export import load_component
from nanodiffusion.training.latent_trainer import LatentTrainConfig, LatentTrainer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning",
                                        "ignore::DeprecationWarning")

VAE = dataclasses.replace(TINY_VAE, in_channels=1, out_channels=1, sample_size=16, scaling_factor=0.7)


@pytest.fixture
def dataset(tmp_path):
    """64 toy digits (class k: a bar at row 2k+2) at 16x16, captioned by every wording of their class."""
    make_fake_mnist(tmp_path / "mnist")
    return load_captioned("mnist", image_size=16, data_dir=str(tmp_path / "mnist"))


def make_trainer(tmp_path, dataset, max_tokens=77, **changes):
    settings = dict(out_dir=str(tmp_path / "run"), batch_size=16, lr=2e-3, warmup_steps=0, epochs=3)
    config = LatentTrainConfig(**(settings | changes))
    torch.manual_seed(0)
    vae = AutoencoderKL(VAE)                       # untrained: its latents are still a function of the image
    tokenizer = caption_tokenizer(dataset, 600, max_tokens)
    return LatentTrainer(config, TINY_UNET, ScheduleConfig("scaled_linear"), dataset, vae,
                         new_text_encoder(tokenizer, TINY_TEXT), tokenizer)


@pytest.mark.parametrize("joint", [False, True], ids=["frozen-text-encoder", "joint-text-encoder"])
def test_tiny_run_lowers_the_loss(tmp_path, dataset, joint):
    trainer = make_trainer(tmp_path, dataset, epochs=5, train_text_encoder=joint)
    text_before = {k: v.clone() for k, v in trainer.text_encoder.state_dict().items()}
    state = trainer.fit()
    first, last = sum(state.losses[:4]) / 4, sum(state.losses[-4:]) / 4
    assert last < 0.6 * first
    text_after = trainer.text_encoder.state_dict()
    text_changed = any(not torch.equal(value, text_before[key]) for key, value in text_after.items())
    assert text_changed == joint
    assert (tmp_path / "run" / "pipeline" / "model_index.json").is_file()


@pytest.mark.parametrize("changes", [{}, {"train_text_encoder": True, "sample_posterior": True,
                                          "prediction": "v_prediction", "min_snr_gamma": 5.0}],
                         ids=["frozen", "joint-posterior-v-minsnr"])
def test_resume_reproduces_the_uninterrupted_losses(tmp_path, dataset, changes):
    full = make_trainer(tmp_path / "a", dataset, max_steps=10, **changes).fit().losses     # 4 steps per epoch
    make_trainer(tmp_path / "b", dataset, max_steps=6, **changes).fit()
    resumed = make_trainer(tmp_path / "b", dataset, max_steps=10, **changes)
    resumed.resume(tmp_path / "b" / "run" / "last.safetensors")
    assert resumed.state.step == 6
    assert resumed.fit().losses == full[6:]


def test_resuming_with_the_other_text_encoder_mode_is_a_clear_error(tmp_path, dataset):
    from nanodiffusion.errors import UserError
    make_trainer(tmp_path, dataset, max_steps=1).fit()
    with pytest.raises(UserError, match="frozen versus trained text encoder"):
        make_trainer(tmp_path, dataset, train_text_encoder=True).resume(tmp_path / "run" / "last.safetensors")


def test_captions_are_dropped_to_the_empty_caption(tmp_path, dataset, monkeypatch):
    trainer = make_trainer(tmp_path, dataset, max_steps=8, caption_dropout=0.5)
    seen = []
    tokenize = CLIPTokenizer.__call__
    def recording(self, captions, **options):
        seen.extend(captions)
        return tokenize(self, captions, **options)

    monkeypatch.setattr(CLIPTokenizer, "__call__", recording)
    trainer.fit()
    assert len(seen) == 8 * 16
    assert 0.35 < seen.count("") / len(seen) < 0.65
    assert {caption for caption in seen if caption} <= set(all_captions(dataset))


@pytest.mark.parametrize("max_tokens", [77, 12], ids=["clip-context", "short-context"])
def test_exported_folder_gives_the_same_images_in_text_to_image_and_diffusers(tmp_path, dataset, max_tokens):
    trainer = make_trainer(tmp_path, dataset, max_tokens, max_steps=3, prediction="v_prediction")
    trainer.fit()
    folder = tmp_path / "run" / "pipeline"
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction" and scheduler["beta_schedule"] == "scaled_linear"
    assert scheduler["_class_name"] == "DDIMScheduler"                 # diffusers' default sampler for it
    settings = dict(num_inference_steps=4, guidance_scale=3.0, height=16, width=16, output_type="np")
    prompts = ["the number three", "a handwritten digit seven"]
    in_memory, loaded = trainer.pipeline(), TextToImage.from_pretrained(folder)
    for pipe in (in_memory, loaded):
        pipe.show_progress = False
    expected = in_memory(prompts, seed=0, sampler="ddim", **settings).images
    np.testing.assert_array_equal(loaded(prompts, seed=0, sampler="ddim", **settings).images, expected)
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    reference = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None,
                                                                  requires_safety_checker=False)
    reference.set_progress_bar_config(disable=True)
    images = reference(prompts, generator=torch.Generator().manual_seed(0), **settings).images
    assert images.shape == expected.shape
    assert np.abs(images - expected).max() <= 1 / 255
    assert reference.tokenizer.model_max_length == max_tokens          # diffusers pads prompts as we do


def test_a_text_context_too_short_for_the_captions_is_a_clear_error(dataset):
    from nanodiffusion.errors import UserError
    with pytest.raises(UserError, match="more than the text context of 4"):
        caption_tokenizer(dataset, 600, 4)


def test_cli_trains_the_three_stages_into_a_text_to_image_model(tmp_path, capsys):
    make_fake_mnist(tmp_path / "mnist", n=16)
    data = ["--dataset", "mnist", "--data-dir", str(tmp_path / "mnist"), "--image-size", "16",
            "--batch-size", "8"]
    text = ["--vocab-size", "600", "--text-width", "32", "--text-layers", "2", "--text-heads", "2"]
    unet = ["--model-channels", "32", "--channel-mult", "1", "2", "--attention-levels", "1",
            "--num-heads", "2"]
    main(["train", "vae", *data, "--block-channels", "16", "32", "--norm-groups", "8", "--max-steps", "2",
          "--out-dir", str(tmp_path / "vae")])
    main(["train", "text-encoder", *data, *text, "--image-widths", "16", "32", "--embed-dim", "32",
          "--max-steps", "2", "--out-dir", str(tmp_path / "text")])
    main(["train", "unet", *data, *unet, "--vae", str(tmp_path / "vae"),
          "--text-encoder", str(tmp_path / "text"), "--epochs", "1", "--sample-every", "1",
          "--sample-prompt", "the number one", "--out-dir", str(tmp_path / "frozen")])
    assert "text encoder frozen" in capsys.readouterr().out
    assert (tmp_path / "frozen" / "samples" / "epoch_0001.png").is_file()
    main(["train", "unet", *data, *unet, *text, "--max-tokens", "16", "--vae", str(tmp_path / "vae"),
          "--max-steps", "2",
          "--prediction", "v_prediction", "--out-dir", str(tmp_path / "joint")])
    assert "text encoder trained with it" in capsys.readouterr().out
    for run in ("frozen", "joint"):
        pipe = TextToImage.from_pretrained(tmp_path / run / "pipeline")
        pipe.show_progress = False
        image = pipe("the number one", num_steps=2, seed=0).images[0]
        assert image.size == (16, 16) and image.mode == "L"
    joint = TextToImage.from_pretrained(tmp_path / "joint" / "pipeline")
    assert joint.tokenizer.model_max_length == joint.text_encoder.config.max_positions == 16
    # --init-unet fine-tunes the frozen run's UNet (its config, no model options); at lr 1e-12 it stays that UNet
    main(["train", "unet", *data, "--vae", str(tmp_path / "vae"), "--text-encoder", str(tmp_path / "text"),
          "--init-unet", str(tmp_path / "frozen" / "pipeline"), "--lr", "1e-12", "--max-steps", "1",
          "--out-dir", str(tmp_path / "tuned")])
    start, tuned = (load_component(tmp_path / run / "pipeline", "unet").state_dict()
                    for run in ("frozen", "tuned"))
    assert start.keys() == tuned.keys()
    assert all(torch.allclose(start[key], tuned[key], rtol=0, atol=1e-8) for key in start)


def test_init_unet_sets_the_unet_and_its_ema_and_refuses_another_config(tmp_path, dataset):
    trainer = make_trainer(tmp_path, dataset, max_steps=1)
    torch.manual_seed(1)
    start = SDUNet(TINY_UNET)
    trainer.init_unet(start)
    for module in (trainer.unet, trainer.ema.shadow):
        assert all(torch.equal(value, start.state_dict()[key]) for key, value in module.state_dict().items())
    from nanodiffusion.errors import UserError
    with pytest.raises(UserError, match="another config"):
        trainer.init_unet(SDUNet(dataclasses.replace(TINY_UNET, num_res_blocks=1)))


def test_encoded_latents_are_cached_for_the_same_vae_and_images_only(tmp_path, dataset, monkeypatch):
    from nanodiffusion.training import latent_trainer
    first = make_trainer(tmp_path, dataset, max_steps=1)
    assert (tmp_path / "run" / "latents.safetensors").is_file()

    def no_encoding(*args, **kwargs):
        raise AssertionError("encoded again")

    with monkeypatch.context() as patch:
        patch.setattr(latent_trainer, "encode_dataset", no_encoding)
        again = make_trainer(tmp_path, dataset, max_steps=1)          # same seed: the same VAE weights
        assert torch.equal(again.latent_mean, first.latent_mean)
        with pytest.raises(AssertionError, match="encoded again"):
            make_trainer(tmp_path, dataset, max_steps=1, bf16=True)     # other dtype: other latents
    torch.manual_seed(1)
    other_vae = AutoencoderKL(VAE)
    key = latent_trainer.latents_key(other_vae, dataset, 0, False)
    assert key != latent_trainer.latents_key(first.vae, dataset, 0, False)
