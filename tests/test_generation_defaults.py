"""A model folder's generation_defaults.json: its settings replace the SD defaults where a call, a flag or a
replayed PNG gives none; diffusers ignores the file; a malformed one is a clear error."""

import json

import pytest

from nanodiffusion.cli import main
from nanodiffusion.errors import UserError
from nanodiffusion.images import read_png_text
from nanodiffusion.pipelines.metadata import SETTINGS_KEY
from nanodiffusion.pipelines.request import GENERATION_DEFAULTS_FILE
from nanodiffusion.pipelines.text_to_image import TextToImage
from fixtures import save_tiny_diffusers

DEFAULTS = {"num_steps": 3, "guidance_scale": 2.5, "sampler": "ddim"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = save_tiny_diffusers(tmp_path_factory.mktemp("model") / "tiny")
    (folder / GENERATION_DEFAULTS_FILE).write_text(json.dumps(DEFAULTS))
    return folder


def test_the_pipeline_uses_the_model_defaults_unless_a_call_sets_them(folder):
    pipe = TextToImage.from_pretrained(folder)
    pipe.show_progress = False
    assert pipe.generation_defaults == DEFAULTS
    request = pipe("a cat", seed=0, output_type="latent").request
    assert (request.num_steps, request.guidance_scale, request.sampler) == (3, 2.5, "ddim")
    request = pipe("a cat", seed=0, num_inference_steps=2, sampler="euler", output_type="latent").request
    assert (request.num_steps, request.guidance_scale, request.sampler) == (2, 2.5, "euler")


def test_generate_fills_only_what_no_flag_or_png_chose(folder, tmp_path):
    main(["generate", "a cat", "--model", str(folder), "--seed", "0", "--out", str(tmp_path / "a.png")])
    stored = json.loads(read_png_text(tmp_path / "a.png")[SETTINGS_KEY])["request"]
    assert (stored["num_steps"], stored["guidance_scale"], stored["sampler"]) == (3, 2.5, "ddim")
    main(["generate", "a cat", "--model", str(folder), "--seed", "0", "--guidance", "4",
          "--out", str(tmp_path / "b.png")])
    stored = json.loads(read_png_text(tmp_path / "b.png")[SETTINGS_KEY])["request"]
    assert (stored["num_steps"], stored["guidance_scale"]) == (3, 4.0)


@pytest.mark.parametrize("content", ['{"guidance_scale": -1}', '{"eta": 0.5}', "not json"])
def test_a_malformed_defaults_file_is_a_clear_error(tmp_path, content):
    folder = save_tiny_diffusers(tmp_path / "tiny")
    (folder / GENERATION_DEFAULTS_FILE).write_text(content)
    with pytest.raises(UserError):
        TextToImage.from_pretrained(folder)


def test_diffusers_ignores_the_file(folder):
    diffusers = pytest.importorskip("diffusers")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None,
                                                             requires_safety_checker=False)
    assert pipe.unet is not None
