"""Test helpers shared by the suite: fake MNIST files, CLIP's tokenizer folder, tiny random Stable Diffusion
networks (ours, and the same weights in diffusers for the parity tests). pytest fixtures are in conftest.py.

`save_tiny_diffusers(folder)` writes a diffusers StableDiffusionPipeline folder (tiny UNet, VAE and CLIP text
encoder with random weights, CLIP's real tokenizer, SD v1.5's scheduler config as published, no safety
checker); `ours_from_diffusers(pipe)` builds our pipeline with the same weights, key for key.
"""

import dataclasses
import functools
import gzip
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from nanodiffusion.data.idx import write_idx
from nanodiffusion.nets.clip_text import TINY_TEXT, CLIPTextConfig, CLIPTextModel
from nanodiffusion.nets.sd_unet import TINY_UNET, SDUNet, SDUNetConfig
from nanodiffusion.nets.vae import TINY_VAE, AutoencoderKL, VAEConfig
from nanodiffusion.pipelines.text_to_image import TextToImage
from nanodiffusion.tokenizer import CLIP_BPE_FOLDER, CLIPTokenizer, train_bpe
from nanodiffusion.weights import SDComponents

SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"      # real data, if present
PROMPTS = ["a photo of a cat", "an astronaut riding a horse on the moon", "a watercolor painting of a fox"]
# runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json as published (no timestep_spacing, so every
# scheduler class swapped in with from_config uses its own default spacing)
SD15_SCHEDULER_JSON = {
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
    "clip_sample": False,
}


def make_fake_mnist(folder: Path, n: int = 64, size: int = 28, num_classes: int = 10, seed: int = 0) -> None:
    """Write MNIST-format IDX files of learnable toy images: class k is a bright bar at row 2k+2."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % num_classes).astype(np.uint8)
    images = rng.integers(0, 40, size=(n, size, size), dtype=np.uint8)
    for i, k in enumerate(labels):
        images[i, 2 * k + 2: 2 * k + 4, 4:size - 4] = 230
    folder.mkdir(parents=True, exist_ok=True)
    for prefix in ("train", "t10k"):
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)


def write_clip_tokenizer(folder: Path) -> Path:
    """CLIP's real vocabulary (the BPE files shipped with the package) as SD v1.x's `tokenizer/` folder, its
    special tokens written as transformers writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        (folder / name).write_bytes(gzip.decompress((CLIP_BPE_FOLDER / f"{name}.gz").read_bytes()))
    token = {"lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    specials = {"bos_token": {"content": "<|startoftext|>", **token},
                "eos_token": {"content": "<|endoftext|>", **token},
                "pad_token": "<|endoftext|>",
                "unk_token": {"content": "<|endoftext|>", **token}}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials))
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
              **{name: {"__type": "AddedToken", **value} if isinstance(value, dict) else value
                 for name, value in specials.items()}}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@functools.cache
def tiny_tokenizer() -> CLIPTokenizer:
    """A CLIP-style BPE with about 600 ids, trained on a few prompts (seconds, no download)."""
    return train_bpe(PROMPTS * 20, vocab_size=600)


def tiny_text_config(tokenizer: CLIPTokenizer | None = None) -> CLIPTextConfig:
    """TINY_TEXT resized to the tiny tokenizer's vocabulary and special ids."""
    tokenizer = tokenizer or tiny_tokenizer()
    return dataclasses.replace(TINY_TEXT, vocab_size=tokenizer.vocab_size,
                               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                               pad_token_id=tokenizer.pad_token_id)


def randomize_(model: torch.nn.Module, seed: int, scale: float = 0.1) -> torch.nn.Module:
    """Perturb every parameter (norms and biases too) so that no path hides behind a default zero or one."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def random_components(unet: SDUNetConfig = TINY_UNET, vae: VAEConfig = TINY_VAE,
                      text: CLIPTextConfig | None = None, seed: int = 0) -> SDComponents:
    """SDComponents of random networks with the tiny tokenizer."""
    return SDComponents(unet=randomize_(SDUNet(unet), seed), vae=randomize_(AutoencoderKL(vae), seed + 1),
                        text_encoder=randomize_(CLIPTextModel(text or tiny_text_config()), seed + 2),
                        tokenizer=tiny_tokenizer())


def assert_same_weights(a: SDComponents, b: SDComponents) -> None:
    """Same configs, keys, dtypes and values in all three networks."""
    for name, network in a.networks().items():
        other = b.networks()[name]
        assert network.config == other.config, name
        first, second = network.state_dict(), other.state_dict()
        assert first.keys() == second.keys(), name
        for key in first:
            assert first[key].dtype == second[key].dtype, f"{name}.{key}"
            assert torch.equal(first[key], second[key]), f"{name}.{key}"


def tiny_diffusers_pipeline(tmp_folder: Path, seed: int = 0):
    """A diffusers StableDiffusionPipeline with tiny random networks (fp32, CPU)."""
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    unet = randomize_(diffusers.UNet2DConditionModel.from_config(TINY_UNET.to_diffusers_config()), seed)
    vae = randomize_(diffusers.AutoencoderKL.from_config(TINY_VAE.to_diffusers_config()), seed + 1)
    text_config = transformers.CLIPTextConfig(**TINY_TEXT.to_transformers_config(),
                                              attn_implementation="eager")
    text_encoder = randomize_(transformers.CLIPTextModel(text_config), seed + 2)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp_folder / "clip"))
    scheduler = diffusers.PNDMScheduler.from_config(SD15_SCHEDULER_JSON)
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
        folder = write_clip_tokenizer(Path(tempfile.mkdtemp()) / "tokenizer")
    return CLIPTokenizer.from_pretrained(folder)


def tiny_ours(seed: int = 0, tokenizer: CLIPTokenizer | None = None) -> TextToImage:
    """Our tiny pipeline with random weights, built without diffusers."""
    torch.manual_seed(seed)
    unet = randomize_(SDUNet(TINY_UNET), seed)
    vae = randomize_(AutoencoderKL(TINY_VAE), seed + 1)
    text_encoder = randomize_(CLIPTextModel(TINY_TEXT), seed + 2)
    return TextToImage(unet, vae, text_encoder, tokenizer or _clip_tokenizer(None))
