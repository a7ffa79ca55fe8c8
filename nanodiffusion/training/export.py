"""Trained components written the way a diffusers Stable Diffusion folder holds them, so that the next stage,
our loaders, diffusers and transformers all read them: `vae/` and `text_encoder/` (config.json and one
safetensors file each), `tokenizer/` (CLIP's vocab.json and merges.txt), and the scheduler config; and the
miniature CLIP that scores prompt adherence (`clip.safetensors`, read by evaluation.clip_score.CLIPScorer).
"""

from pathlib import Path

import torch

from nanodiffusion.diffusion.sampling_plan import BETA_SCHEDULES
from nanodiffusion.diffusion.schedules import ScheduleConfig
from nanodiffusion.errors import UserError
from nanodiffusion.evaluation.clip_score import CHECKPOINT_NAME
from nanodiffusion.nets.mini_clip import MiniCLIP
from nanodiffusion.tokenizer import CLIPTokenizer
from nanodiffusion.weights.checkpoint import prefixed, save_checkpoint
from nanodiffusion.weights.components import NETWORKS, SD15_SCHEDULER, check_state_dict, expected_shapes
from nanodiffusion.weights.diffusers_folder import (
    CONFIG_READERS, WEIGHT_NAMES, read_component, read_json, read_tokenizer, write_json,
)
from nanodiffusion.weights.safe_load import write_safetensors

_DIFFUSERS_SCHEDULES = {ours: theirs for theirs, ours in BETA_SCHEDULES.items()}


def save_component(network: torch.nn.Module, folder: str | Path, component: str) -> Path:
    """Write `network` ("unet", "vae" or "text_encoder") to `folder/component/`; return that folder."""
    folder = Path(folder) / component
    config = (network.config.to_transformers_config() if component == "text_encoder"
              else network.config.to_diffusers_config())
    write_safetensors(network.state_dict(), folder / f"{WEIGHT_NAMES[component]}.safetensors",
                      metadata={"format": "pt"})
    write_json(folder / "config.json", config)          # last: a folder with a config is complete
    return folder


def component_folder(path: str | Path, component: str) -> Path:
    """`path` itself when it holds the component's config.json, else `path/component` (a stage's output
    folder or a diffusers pipeline folder)."""
    path = Path(path)
    for folder in (path, path / component):
        if (folder / "config.json").is_file():
            return folder
    raise UserError(f"no {component} in {path}: expected {path / component / 'config.json'}")


def load_component(path: str | Path, component: str) -> torch.nn.Module:
    """A trainable float32 copy of the component saved under `path` (see `component_folder`)."""
    folder = component_folder(path, component)
    config = CONFIG_READERS[component](read_json(folder / "config.json"))
    network = NETWORKS[component][0](config)
    state = read_component(folder, component, variant=None)
    check_state_dict(expected_shapes(network), state, str(folder))
    network.load_state_dict({key: value.float() for key, value in state.items()}, strict=True)
    return network


def load_tokenizer(path: str | Path) -> CLIPTokenizer:
    """The CLIP tokenizer in `path` or `path/tokenizer`."""
    path = Path(path)
    return read_tokenizer(path if (path / "vocab.json").is_file() else path / "tokenizer")


def scheduler_config(schedule: ScheduleConfig, prediction: str) -> dict:
    """SD v1.x's scheduler_config.json with the schedule and prediction type a UNet was trained with.

    A v-prediction model names DDIMScheduler, as SD 2.x's v model does: diffusers' PNDMScheduler combines the
    raw v outputs of several timesteps before converting them to noise, which our PLMS sampler does not.
    """
    config = {**SD15_SCHEDULER, "beta_schedule": _DIFFUSERS_SCHEDULES[schedule.kind],
              "num_train_timesteps": schedule.num_timesteps, "prediction_type": prediction}
    if prediction == "v_prediction":
        config["_class_name"] = "DDIMScheduler"
    beta_start, beta_end = schedule.betas_range
    if beta_start is not None:                          # the cosine schedule has none
        config |= {"beta_start": beta_start, "beta_end": beta_end}
    return config


def save_mini_clip(model: MiniCLIP, tokenizer: CLIPTokenizer, folder: str | Path) -> Path:
    """Write `folder/clip.safetensors` and the tokenizer to `folder/tokenizer/` (what CLIPScorer loads)."""
    folder = Path(folder)
    tokenizer.save_pretrained(folder / "tokenizer")
    meta = {"kind": "mini_clip", "clip": model.config.to_dict(), "text": model.text_config.to_dict()}
    save_checkpoint(folder / CHECKPOINT_NAME, prefixed("clip", model.state_dict()), meta)
    return folder / CHECKPOINT_NAME
