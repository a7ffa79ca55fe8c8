"""Tiny random SD 2.x models for the tests: diffusers folders (ε, v, SD-Turbo's scheduler) and an original
single file in SD 2's layout, the OpenCLIP part written here by hand (not through our rename table).

The networks are TINY_SD2_UNET, a small VAE and TINY_SD2_TEXT (a GELU CLIP text model, as diffusers stores
OpenCLIP), with CLIP's real vocabulary and SD 2's tokenizer folder (padding with "!").
"""

import json
from pathlib import Path

import torch

from nanodiffusion.nets.clip_text import TINY_SD2_TEXT
from nanodiffusion.nets.sd_unet import TINY_SD2_UNET
from nanodiffusion.nets.vae import VAEConfig
from tiny_sd import SD15_SCHEDULER_JSON, tiny_diffusers_pipeline, write_clip_tokenizer

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
    """Write a tiny SD 2 diffusers folder with the published scheduler config of `kind` (a key of SCHEDULERS)."""
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
