"""Model folders moved between diffusers and nanodiffusion, with each side's defaults (issue 14):
diffusers' default `StableDiffusionPipeline.from_pretrained(folder)` call on the shipped built-in folder and
on an fp16 export (transformers 5 would keep an fp16 text encoder in fp16 beside diffusers' fp32 UNet unless the
config declares float32), and folders that diffusers' `save_pretrained` writes with the tokenizer as
tokenizer.json only, whose context length must be read from what the folder states.
"""

import json
import shutil

import numpy as np
import pytest
import torch

from nanodiffusion.pipelines.text_to_image import TextToImage
from nanodiffusion.tokenizer import CLIPTokenizer
from nanodiffusion.weights import SDComponents, save_diffusers
from nanodiffusion.weights.diffusers_folder import read_tokenizer
from nanodiffusion.weights.models import BUILTIN_TEXT_TO_IMAGE
from fixtures import tiny_ours

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

PROMPTS = ["a photo of a sneaker", "the handwritten digit 3"]
SETTINGS = dict(num_inference_steps=6, guidance_scale=7.0, output_type="np")


@pytest.fixture(scope="module")
def ours():
    pipe = TextToImage.from_pretrained("builtin")
    pipe.show_progress = False
    return pipe


@pytest.fixture(scope="module")
def shipped():
    """diffusers' default call on the shipped built-in folder."""
    return diffusers_default(BUILTIN_TEXT_TO_IMAGE["builtin"])


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    """The built-in tokenizer as transformers 5 saves it: tokenizer.json and tokenizer_config.json."""
    folder = tmp_path_factory.mktemp("tokenizer")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(BUILTIN_TEXT_TO_IMAGE["builtin"] / "tokenizer")
    tokenizer.save_pretrained(folder)
    assert not (folder / "vocab.json").exists()
    return folder


def diffusers_default(folder):
    """Exactly what a diffusers user types: no dtype, nothing else."""
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_diffusers_default_call_on_the_shipped_folder_draws_our_images(ours, shipped):
    reference = shipped
    assert reference.text_encoder.dtype == reference.unet.dtype == torch.float32
    images = reference(PROMPTS, generator=torch.Generator().manual_seed(0), **SETTINGS).images
    expected = ours(PROMPTS, seed=0, sampler="pndm", **SETTINGS).images         # the folder's scheduler
    assert images.shape == expected.shape and np.abs(images - expected).max() <= 2 / 255


def test_an_fp16_export_loads_with_diffusers_defaults(tmp_path):
    pipe = tiny_ours().to(dtype=torch.float16)
    components = SDComponents(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler_config)
    save_diffusers(components, tmp_path / "fp16")
    reference = diffusers_default(tmp_path / "fp16")
    assert reference.text_encoder.dtype == torch.float32
    settings = dict(num_inference_steps=3, height=16, width=16, output_type="np")
    images = reference("a cat", generator=torch.Generator().manual_seed(0), **settings).images
    pipe.to(dtype=torch.float32).show_progress = False            # the fp16 weights, computed in fp32
    expected = pipe("a cat", seed=0, sampler="pndm", **settings).images
    assert images.shape == (1, 16, 16, 3) and np.abs(images - expected).max() <= 2 / 255


def test_a_diffusers_saved_folder_generates_here_and_back(ours, shipped, tmp_path):
    shipped.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved" / "tokenizer" / "vocab.json").exists()     # tokenizer.json only
    loaded = TextToImage.from_pretrained(tmp_path / "saved")
    loaded.show_progress = False
    assert loaded.tokenizer.model_max_length == 24
    # save_pretrained drops our generation_defaults.json and writes the scheduler's filled-in defaults (the
    # timestep spacing of its class): the folder's own scheduler, PNDM, walks the same steps either way
    mine = ours(PROMPTS, seed=1, sampler="pndm", **SETTINGS).images
    assert np.array_equal(loaded(PROMPTS, seed=1, sampler="pndm", **SETTINGS).images, mine)
    save_diffusers(SDComponents(loaded.unet, loaded.vae, loaded.text_encoder, loaded.tokenizer,
                                loaded.scheduler_config), tmp_path / "back")          # and back to diffusers
    reference = diffusers_default(tmp_path / "back")
    assert reference.tokenizer.model_max_length == 24
    images = reference(PROMPTS, generator=torch.Generator().manual_seed(0), **SETTINGS).images
    assert np.abs(images - ours(PROMPTS, seed=0, sampler="pndm", **SETTINGS).images).max() <= 2 / 255


@pytest.mark.parametrize("states", ["truncation", "padding", "text_encoder"])
def test_the_context_length_is_read_from_wherever_the_folder_states_it(tmp_path, tokenizer_json, states):
    folder = tmp_path / "model"
    (folder / "text_encoder").mkdir(parents=True)
    shutil.copy(BUILTIN_TEXT_TO_IMAGE["builtin"] / "text_encoder" / "config.json", folder / "text_encoder")
    tokenizer_folder = folder / "tokenizer"
    shutil.copytree(tokenizer_json, tokenizer_folder)
    config = json.loads((tokenizer_folder / "tokenizer_config.json").read_text())
    config["model_max_length"] = int(1e30)                  # what transformers writes for "no limit"
    (tokenizer_folder / "tokenizer_config.json").write_text(json.dumps(config))
    stored = json.loads((tokenizer_folder / "tokenizer.json").read_text())
    if states == "truncation":
        stored["truncation"] = {"max_length": 24, "strategy": "LongestFirst", "stride": 0}
    elif states == "padding":
        stored["padding"] = {"strategy": {"Fixed": 24}, "direction": "Right"}
    (tokenizer_folder / "tokenizer.json").write_text(json.dumps(stored))
    tokenizer = read_tokenizer(tokenizer_folder)
    assert tokenizer.model_max_length == 24                  # the text encoder's 24 positions in the last case
    shipped = CLIPTokenizer.from_pretrained(BUILTIN_TEXT_TO_IMAGE["builtin"])
    assert tokenizer("a cat").tolist() == shipped("a cat").tolist()
