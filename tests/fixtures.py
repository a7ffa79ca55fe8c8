"""Test helpers shared by the suite: fake MNIST files, CLIP's tokenizer folder, tiny random Stable Diffusion
networks (ours, and the same weights in diffusers for the parity tests). pytest fixtures are in conftest.py.

`save_tiny_diffusers(folder)` writes a diffusers StableDiffusionPipeline folder (tiny UNet, VAE and CLIP text
encoder with random weights, CLIP's real tokenizer, SD v1.5's scheduler config as published, no safety
checker); `ours_from_diffusers(pipe)` builds our pipeline with the same weights, key for key;
`save_tiny_sd2(folder, kind)` writes a tiny SD 2.x one.
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
from nanodiffusion.nets.clip_text import TINY_SD2_TEXT, TINY_TEXT, CLIPTextConfig, CLIPTextModel
from nanodiffusion.nets.sd_unet import TINY_SD2_UNET, TINY_UNET, SDUNet, SDUNetConfig
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


def randomize_(model: torch.nn.Module, seed: int, scale: float = 0.1, *,
               fresh: bool = False) -> torch.nn.Module:
    """Perturb every parameter (norms and biases too) so that no path hides behind a default zero or one;
    `fresh=True` draws each afresh from N(0, scale²) instead (small weights whatever the initialisation)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            draw = scale * torch.randn(parameter.shape, generator=generator)
            if fresh:
                parameter.copy_(draw)
            else:
                parameter.add_(draw)
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


def tiny_diffusers_pipeline(tmp_folder: Path, seed: int = 0, *, unet_config: SDUNetConfig = TINY_UNET,
                            vae_config: VAEConfig = TINY_VAE, text_config: CLIPTextConfig = TINY_TEXT,
                            write_tokenizer=write_clip_tokenizer,
                            scheduler_config: dict = SD15_SCHEDULER_JSON):
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
        folder = write_clip_tokenizer(Path(tempfile.mkdtemp()) / "tokenizer")
    return CLIPTokenizer.from_pretrained(folder)


def tiny_ours(seed: int = 0, tokenizer: CLIPTokenizer | None = None) -> TextToImage:
    """Our tiny pipeline with random weights, built without diffusers."""
    torch.manual_seed(seed)
    unet = randomize_(SDUNet(TINY_UNET), seed)
    vae = randomize_(AutoencoderKL(TINY_VAE), seed + 1)
    text_encoder = randomize_(CLIPTextModel(TINY_TEXT), seed + 2)
    return TextToImage(unet, vae, text_encoder, tokenizer or _clip_tokenizer(None))


# --- tiny SD 2.x models: diffusers folders (ε, v, SD-Turbo's scheduler) and an original single file in SD 2's
# layout, the OpenCLIP part written here by hand (not through our rename table); a GELU CLIP text model, as
# diffusers stores OpenCLIP, with CLIP's real vocabulary and SD 2's tokenizer folder (padding with "!") ---

# A VAE whose unstored options are SD's (32 groups), so a file without metadata reads back the same.
SD2_VAE = VAEConfig(block_channels=(32, 64), layers_per_block=1, sample_size=32)
# stabilityai/stable-diffusion-2-1 scheduler/scheduler_config.json (diffusers 0.10): v prediction, DDIM.
SD21_V_SCHEDULER_JSON = {**SD15_SCHEDULER_JSON, "_class_name": "DDIMScheduler",
                         "_diffusers_version": "0.10.0", "prediction_type": "v_prediction"}
# stabilityai/stable-diffusion-2-1-base: ε prediction, PNDM.
SD21_BASE_SCHEDULER_JSON = {**SD15_SCHEDULER_JSON, "_diffusers_version": "0.10.0",
                            "prediction_type": "epsilon"}
# stabilityai/sd-turbo scheduler/scheduler_config.json (diffusers 0.24): Euler on trailing timesteps.
SD_TURBO_SCHEDULER_JSON = {
    "_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.24.0.dev0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.0,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "trailing",
    "timestep_type": "discrete", "trained_betas": None, "use_karras_sigmas": False,
}
SCHEDULERS = {"v": SD21_V_SCHEDULER_JSON, "epsilon": SD21_BASE_SCHEDULER_JSON,
              "turbo": SD_TURBO_SCHEDULER_JSON}


def write_sd2_tokenizer(folder: Path) -> Path:
    """SD 2's tokenizer folder: CLIP's files, pad "!" in special_tokens_map.json, as stabilityai ships it
    (its tokenizer_config.json still says <|endoftext|>; the map wins, in transformers and in ours)."""
    write_clip_tokenizer(folder)
    specials = json.loads((folder / "special_tokens_map.json").read_text())
    (folder / "special_tokens_map.json").write_text(json.dumps({**specials, "pad_token": "!"}))
    return folder


def save_tiny_sd2(folder: Path, kind: str = "v", seed: int = 0) -> Path:
    """Write a tiny SD 2 diffusers folder with the published scheduler config of `kind` (a key of
    SCHEDULERS)."""
    pipe = tiny_diffusers_pipeline(folder.parent / f"{folder.name}-work", seed, unet_config=TINY_SD2_UNET,
                                   vae_config=SD2_VAE, text_config=TINY_SD2_TEXT,
                                   write_tokenizer=write_sd2_tokenizer, scheduler_config=SCHEDULERS[kind])
    # A trained UNet predicts unit-size ε or v; this random one about 7x that, which makes 10x too large
    # latents and amplifies the fp32 rounding differences between two implementations as much.
    with torch.no_grad():
        pipe.unet.conv_out.weight.mul_(0.15)
        pipe.unet.conv_out.bias.mul_(0.15)
    pipe.save_pretrained(folder, safe_serialization=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULERS[kind]))
    return folder


def openclip_layout(text_state: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModel tensors (`text_model.*`) as an SD 2 checkpoint stores open_clip's text tower
    (`cond_stage_model.model.*`): q/k/v fused into in_proj, and the whole tower, i.e. one block more than SD 2
    reads (random), the text projection and the logit scale, which it never reads."""
    generator = torch.Generator().manual_seed(seed)
    prefix, state = "cond_stage_model.model.", {}
    names = {"embeddings.token_embedding.weight": "token_embedding.weight",
             "embeddings.position_embedding.weight": "positional_embedding",
             "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
    for ours, theirs in names.items():
        state[prefix + theirs] = text_state[f"text_model.{ours}"]
    layers = 1 + max(int(key.split(".")[3]) for key in text_state if ".encoder.layers." in key)
    for n in range(layers + 1):
        block = f"{prefix}transformer.resblocks.{n}."
        layer = {key.split(f"layers.{n}.", 1)[1]: value for key, value in text_state.items()
                 if f".encoder.layers.{n}." in key}
        if n == layers:                                             # the last block, never read by SD 2
            layer = {key: torch.randn(value.shape, generator=generator) for key, value in previous.items()}
        for leaf in ("weight", "bias"):
            state[f"{block}attn.in_proj_{leaf}"] = torch.cat(
                [layer[f"self_attn.{proj}.{leaf}"] for proj in ("q_proj", "k_proj", "v_proj")])
            state[f"{block}attn.out_proj.{leaf}"] = layer[f"self_attn.out_proj.{leaf}"]
            state[f"{block}ln_1.{leaf}"] = layer[f"layer_norm1.{leaf}"]
            state[f"{block}ln_2.{leaf}"] = layer[f"layer_norm2.{leaf}"]
            state[f"{block}mlp.c_fc.{leaf}"] = layer[f"mlp.fc1.{leaf}"]
            state[f"{block}mlp.c_proj.{leaf}"] = layer[f"mlp.fc2.{leaf}"]
        previous = layer
    width = text_state["text_model.final_layer_norm.weight"].shape[0]
    state[prefix + "text_projection"] = torch.randn(width, width, generator=generator)
    state[prefix + "logit_scale"] = torch.tensor(4.6052)
    return state
