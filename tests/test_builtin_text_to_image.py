"""The shipped text-to-image model: small, in the diffusers layout, loads with no download, `generate` uses it
by default, its images follow class and shapes prompts, and diffusers' own StableDiffusionPipeline loads its
`convert --to diffusers` export and draws the same images."""

import json

import numpy as np
import pytest
import torch

from nanodiffusion.cli import main
from nanodiffusion.evaluation.classifier import classifier_for_dataset
from nanodiffusion.evaluation.metrics import class_agreement
from nanodiffusion.evaluation.shapes_check import shapes_adherence
from nanodiffusion.evaluation.text_to_image_eval import (
    class_prompt_list, classifier_view, generate_images, shapes_prompt_list,
)
from nanodiffusion.pipelines.request import read_generation_defaults
from nanodiffusion.pipelines.text_to_image import TextToImage
from nanodiffusion.weights.models import BUILTIN_TEXT_TO_IMAGE

FOLDER = BUILTIN_TEXT_TO_IMAGE["builtin"]
DEFAULTS = read_generation_defaults(FOLDER)            # the settings generate uses for it


@pytest.fixture(scope="module")
def pipe() -> TextToImage:
    pipe = TextToImage.from_pretrained("builtin")
    pipe.show_progress = False
    return pipe


def test_shipped_in_the_diffusers_layout_and_small():
    files = [path for path in FOLDER.rglob("*") if path.is_file()]
    assert sum(path.stat().st_size for path in files) <= 30 * 2**20
    names = {str(path.relative_to(FOLDER)) for path in files}
    assert {"model_index.json", "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
            "text_encoder/model.safetensors", "tokenizer/vocab.json", "tokenizer/merges.txt",
            "scheduler/scheduler_config.json"} <= names
    assert not [name for name in names if name.endswith((".bin", ".ckpt", ".pt", ".pth"))]     # no pickles
    assert json.loads((FOLDER / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    assert DEFAULTS == {"sampler": "dpmpp_2m", "num_steps": 20, "guidance_scale": 7.0}


@pytest.mark.parametrize("dataset_name", ["mnist", "fashion-mnist"])
def test_class_prompts_draw_their_class(pipe, dataset_name):
    prompts, labels = class_prompt_list(dataset_name, 2)
    images = generate_images(pipe, prompts, sampler=DEFAULTS["sampler"], num_steps=DEFAULTS["num_steps"],
                             guidance_scale=DEFAULTS["guidance_scale"], seed=0)
    classifier, _ = classifier_for_dataset(dataset_name)
    view = classifier_view(images, classifier.config.image_size)
    assert class_agreement(classifier, view, labels) >= 0.8       # see README for the 1000-image figures


def test_shapes_prompts_are_followed(pipe):
    prompts = shapes_prompt_list(20)
    images = generate_images(pipe, prompts, sampler=DEFAULTS["sampler"], num_steps=DEFAULTS["num_steps"],
                             guidance_scale=DEFAULTS["guidance_scale"], seed=0)
    rates = shapes_adherence(images, prompts)
    assert rates["color"] >= 0.7 and rates["shape"] >= 0.6 and rates["position"] >= 0.7


def test_generate_uses_it_by_default(tmp_path, capsys):
    out = tmp_path / "sneaker.png"
    main(["generate", "a photo of a sneaker", "--seed", "1", "--steps", "10", "--out", str(out)])
    assert out.is_file() and "wrote" in capsys.readouterr().out
    from PIL import Image
    with Image.open(out) as image:
        assert image.size == (32, 32) and "a photo of a sneaker" in image.text["parameters"]


def test_diffusers_loads_the_export_and_draws_the_same_images(pipe, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    main(["convert", "builtin", str(tmp_path / "export"), "--to", "diffusers"])
    reference = diffusers.StableDiffusionPipeline.from_pretrained(
        tmp_path / "export", safety_checker=None, requires_safety_checker=False)
    reference.set_progress_bar_config(disable=True)
    prompts = ["a photo of a sneaker", "the handwritten digit 3", "a large blue square in the center"]
    settings = dict(num_inference_steps=10, guidance_scale=DEFAULTS["guidance_scale"], output_type="np")
    expected = pipe(prompts, seed=0, sampler="pndm", **settings).images       # the folder's scheduler
    images = reference(prompts, generator=torch.Generator().manual_seed(0), **settings).images
    assert images.shape == expected.shape == (3, 32, 32, 3)
    assert np.abs(images - expected).max() <= 2 / 255
