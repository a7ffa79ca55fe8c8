"""Folders we write run in diffusers' StableDiffusionPipeline, and folders diffusers writes load into ours,
with the same outputs (max-abs <= 1e-5): token ids, text states, every UNet call of a few-step generation
with fixed latents, and the VAE decode of its result.
"""

import pytest
import torch

from nanodiffusion.nets.sd_unet import TINY_UNET
from nanodiffusion.nets.vae import TINY_VAE
from nanodiffusion.weights import SDComponents, load_sd, save_diffusers
from fixtures import random_components, randomize_, tiny_text_config, tiny_tokenizer

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

PROMPT = "an astronaut riding a horse"
TOLERANCE = 1e-5


def _generate(pipe, latents: torch.Tensor, output_type: str):
    """Run 3 guided steps from `latents`; return the output and every UNet call (inputs and eps)."""
    calls = []

    def record(module, args, kwargs, output):
        calls.append((args[0].clone(), args[1], kwargs["encoder_hidden_states"].clone(), output[0].clone()))

    handle = pipe.unet.register_forward_hook(record, with_kwargs=True)
    try:
        result = pipe(PROMPT, num_inference_steps=3, guidance_scale=7.5, latents=latents.clone(),
                      output_type=output_type, return_dict=False)[0]
    finally:
        handle.remove()
    return result, calls


def assert_pipeline_matches_ours(pipe, ours: SDComponents) -> None:
    pipe.set_progress_bar_config(disable=True)
    ids = pipe.tokenizer(PROMPT, padding="max_length", max_length=77, truncation=True,
                         return_tensors="pt").input_ids
    assert torch.equal(ids, ours.tokenizer([PROMPT]))
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference_states = pipe.text_encoder(ids)[0]
        assert (ours.text_encoder(ids).hidden_states - reference_states).abs().max() <= TOLERANCE

        final, calls = _generate(pipe, latents, "latent")
        assert len(calls) == 4                          # PNDM's PLMS repeats its first step
        for sample, t, context, eps in calls:
            assert sample.shape[0] == 2                                     # unconditional + conditional
            assert (ours.unet(sample, t, context) - eps).abs().max() <= TOLERANCE

        scale = ours.vae.config.scaling_factor
        assert scale == pipe.vae.config.scaling_factor
        decoded = ours.vae.decode(final / scale)
        assert (decoded - pipe.vae.decode(final / scale).sample).abs().max() <= TOLERANCE
        image, _ = _generate(pipe, latents, "pt")                        # (B, 3, H, W) in [0, 1]
        assert (image - (decoded / 2 + 0.5).clamp(0, 1)).abs().max() <= TOLERANCE


def test_folder_we_save_runs_in_diffusers(tmp_path):
    components = random_components(seed=3)
    save_diffusers(components, tmp_path / "ours")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "ours")
    assert type(pipe.scheduler).__name__ == "PNDMScheduler"
    assert pipe.safety_checker is None
    assert_pipeline_matches_ours(pipe, components)


def test_folder_diffusers_saves_loads_into_ours(tmp_path):
    text_config = tiny_text_config()
    tiny_tokenizer().save_pretrained(tmp_path / "tokenizer")
    unet = randomize_(diffusers.UNet2DConditionModel.from_config(TINY_UNET.to_diffusers_config()), seed=5)
    vae = randomize_(diffusers.AutoencoderKL.from_config(TINY_VAE.to_diffusers_config()), seed=6)
    text_encoder = randomize_(transformers.CLIPTextModel(
        transformers.CLIPTextConfig(**text_config.to_transformers_config())), seed=7)
    scheduler = diffusers.PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, unet=unet,
        tokenizer=transformers.CLIPTokenizer.from_pretrained(tmp_path / "tokenizer"), scheduler=scheduler,
        safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.save_pretrained(tmp_path / "theirs")
    ours = load_sd(tmp_path / "theirs")
    assert ours.text_encoder.config == text_config
    assert ours.scheduler_config["_class_name"] == "PNDMScheduler"
    assert_pipeline_matches_ours(pipe, ours)
