"""Tiny random Stable Diffusion v1.x models for the pipeline tests: ours, and the same weights in diffusers.

`save_tiny_diffusers(folder)` writes a diffusers StableDiffusionPipeline folder (tiny UNet, VAE and CLIP text
encoder with random weights, CLIP's real tokenizer, SD v1.5's scheduler config as published, no safety
checker); `ours_from_diffusers(pipe)` builds our pipeline with the same weights, key for key.
"""

import gzip
import json
from pathlib import Path

import pytest
import torch

from nanodiffusion.nets.clip_text import TINY_TEXT, CLIPTextConfig, CLIPTextModel
from nanodiffusion.nets.sd_unet import TINY_UNET, SDUNet, SDUNetConfig
from nanodiffusion.nets.vae import TINY_VAE, AutoencoderKL, VAEConfig
from nanodiffusion.pipelines.text_to_image import TextToImage
from nanodiffusion.tokenizer import CLIP_BPE_FOLDER, CLIPTokenizer

FIXTURES = CLIP_BPE_FOLDER                  # CLIP's BPE files, shipped with the package
# runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json as published (no timestep_spacing, so every
# scheduler class swapped in with from_config uses its own default spacing)
SD15_SCHEDULER_JSON = {
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
    "clip_sample": False,
}


def write_clip_tokenizer(folder: Path) -> Path:
    """CLIP's real vocabulary as a transformers tokenizer folder (SD v1.x's `tokenizer/`)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        (folder / name).write_bytes(gzip.decompress((FIXTURES / f"{name}.gz").read_bytes()))
    specials = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials))
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True, **specials}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def randomize_(model: torch.nn.Module, seed: int, scale: float = 0.1) -> torch.nn.Module:
    """Perturb every parameter (norms and biases too) so that no path hides behind a default zero or one."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def tiny_diffusers_pipeline(tmp_folder: Path, seed: int = 0, *, unet_config: SDUNetConfig = TINY_UNET,
                            vae_config: VAEConfig = TINY_VAE, text_config: CLIPTextConfig = TINY_TEXT,
                            write_tokenizer=write_clip_tokenizer, scheduler_config: dict = SD15_SCHEDULER_JSON):
    """A diffusers StableDiffusionPipeline with tiny random networks (fp32, CPU); SD v1.x's by default."""
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    unet = randomize_(diffusers.UNet2DConditionModel.from_config(unet_config.to_diffusers_config()), seed)
    vae = randomize_(diffusers.AutoencoderKL.from_config(vae_config.to_diffusers_config()), seed + 1)
    text_config = transformers.CLIPTextConfig(**text_config.to_transformers_config(),
                                              attn_implementation="eager")
    text_encoder = randomize_(transformers.CLIPTextModel(text_config), seed + 2)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(write_tokenizer(tmp_folder / "clip"))
    scheduler = getattr(diffusers, scheduler_config["_class_name"]).from_config(scheduler_config)
    return diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                             unet=unet, scheduler=scheduler, safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)


def save_tiny_diffusers(folder: Path, seed: int = 0) -> Path:
    """Write a tiny diffusers folder; its scheduler config is SD v1.5's file as published."""
    pipe = tiny_diffusers_pipeline(folder.parent / f"{folder.name}-work", seed)
    pipe.save_pretrained(folder, safe_serialization=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD15_SCHEDULER_JSON))
    return folder


def ours_from_diffusers(pipe, tokenizer_folder: Path | None = None) -> TextToImage:
    """Our pipeline with the diffusers pipeline's weights (loaded strictly) and scheduler config."""
    unet = SDUNet(SDUNetConfig.from_diffusers_config(pipe.unet.config))
    unet.load_state_dict(pipe.unet.state_dict(), strict=True)
    vae = AutoencoderKL(VAEConfig.from_diffusers_config(pipe.vae.config))
    vae.load_state_dict(pipe.vae.state_dict(), strict=True)
    text_encoder = CLIPTextModel(CLIPTextConfig.from_transformers_config(pipe.text_encoder.config.to_dict()))
    # transformers >= 5 drops the `text_model.` prefix inside CLIPTextModel; the files (and we) keep it
    text_encoder.load_state_dict({k if k.startswith("text_model.") else f"text_model.{k}": v
                                  for k, v in pipe.text_encoder.state_dict().items()}, strict=True)
    return TextToImage(unet, vae, text_encoder, _clip_tokenizer(tokenizer_folder),
                       dict(pipe.scheduler.config))


def _clip_tokenizer(folder: Path | None) -> CLIPTokenizer:
    if folder is None:
        import tempfile
        folder = write_clip_tokenizer(Path(tempfile.mkdtemp()) / "tokenizer")
    return CLIPTokenizer.from_pretrained(folder)


def tiny_ours(seed: int = 0, tokenizer: CLIPTokenizer | None = None) -> TextToImage:
    """Our tiny pipeline with random weights, built without diffusers."""
    torch.manual_seed(seed)
    unet = randomize_(SDUNet(TINY_UNET), seed)
    vae = randomize_(AutoencoderKL(TINY_VAE), seed + 1)
    text_encoder = randomize_(CLIPTextModel(TINY_TEXT), seed + 2)
    return TextToImage(unet, vae, text_encoder, tokenizer or _clip_tokenizer(None))
