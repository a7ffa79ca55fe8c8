"""A model folder's generation_defaults.json: its settings replace the SD defaults where a call, a flag or a
replayed PNG gives none; diffusers ignores the file; a malformed one is a clear error."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from nanodiffusion.cli import main
from nanodiffusion.errors import UserError
from nanodiffusion.images import read_png_text
from nanodiffusion.pipelines.metadata import SETTINGS_KEY
from nanodiffusion.pipelines.request import GENERATION_DEFAULTS_FILE
from nanodiffusion.pipelines.text_to_image import TextToImage
from nanodiffusion.weights.families import scheduler_defaults
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


def test_python_api_cli_server_and_page_give_one_image_for_one_request(folder, tmp_path):
    """One set of defaults: a request that sets only the prompt and the seed runs with the model's settings
    through the Python API, `generate`, the A1111 API and the page (which fills its form from /api/info)."""
    testclient = pytest.importorskip("fastapi.testclient")
    from nanodiffusion.server.app import create_app
    from server_fakes import MODEL, png, wait_until

    pipe = TextToImage.from_pretrained(folder)
    pipe.show_progress = False
    python_api = np.asarray(pipe("a cat", seed=7).images[0])
    main(["generate", "a cat", "--model", str(folder), "--seed", "7", "--out", str(tmp_path / "cli.png")])
    with testclient.TestClient(create_app(pipe, MODEL)) as client:
        answer = client.post("/sdapi/v1/txt2img", json={"prompt": "a cat", "seed": 7}).json()
        shown = client.get("/api/info").json()["defaults"]
        form = {"prompt": "a cat", "seed": 7, "steps": shown["steps"], "cfg_scale": shown["cfg_scale"],
                "sampler_name": shown["sampler"]}
        job_id = client.post("/api/jobs", json=form).json()["id"]
        wait_until(lambda: client.get(f"/api/jobs/{job_id}").json()["state"] == "done")
        page = client.get(client.get(f"/api/jobs/{job_id}").json()["images"][0]["url"]).content
    assert (shown["steps"], shown["cfg_scale"], shown["sampler"]) == (3, 2.5, "ddim")
    assert json.loads(answer["info"])["steps"] == 3
    for image in (Image.open(tmp_path / "cli.png"), png(answer["images"][0]), Image.open(io.BytesIO(page))):
        assert np.array_equal(np.asarray(image.convert("RGB")), python_api)


@pytest.mark.parametrize("config, defaults", [
    ({"_class_name": "DDIMScheduler"}, {"sampler": "ddim"}),                       # SD 2.1's folder
    ({"_class_name": "PNDMScheduler"}, {"sampler": "plms"}),                       # SD v1.5's
    ({"_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True},
     {"sampler": "dpmpp_2m", "sigma_schedule": "karras"}),
    ({"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "sde-dpmsolver++",
      "solver_type": "heun"}, {"sampler": "dpmpp_2m_sde_heun"}),
    ({"_class_name": "DPMSolverMultistepScheduler", "solver_order": 3}, {}),    # a variant we do not have
    ({"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "dpmsolver"}, {}),
    ({"_class_name": "SomeOtherScheduler"}, {}),
])
def test_a_folder_without_the_file_samples_as_its_scheduler_class(config, defaults):
    assert scheduler_defaults(config) == defaults


def test_the_scheduler_class_gives_way_to_the_file(tmp_path):
    folder = save_tiny_diffusers(tmp_path / "tiny")
    config_file = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "_class_name": "DDIMScheduler"}))
    assert TextToImage.from_pretrained(folder).generation_defaults == {"sampler": "ddim"}
    (folder / GENERATION_DEFAULTS_FILE).write_text(json.dumps({"sampler": "euler", "num_steps": 4}))
    assert TextToImage.from_pretrained(folder).generation_defaults == {"sampler": "euler", "num_steps": 4}


def test_a_hub_repo_brings_its_generation_defaults(folder, monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    patterns = []

    def snapshot_download(repo_id, allow_patterns):          # the Hub's cache folder, as if downloaded
        patterns.extend(allow_patterns)
        return str(folder)

    monkeypatch.setattr(hub, "snapshot_download", snapshot_download)
    assert TextToImage.from_pretrained("someone/tiny-sd").generation_defaults == DEFAULTS
    assert GENERATION_DEFAULTS_FILE in patterns
