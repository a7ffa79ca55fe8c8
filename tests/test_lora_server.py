"""LoRAs and embeddings in `nanodiffusion serve`: --lora-dir and --embeddings-dir, A1111's listings
(`GET /sdapi/v1/loras`, `/sdapi/v1/embeddings`), `<lora:NAME:WEIGHT>` in a txt2img prompt (the same image as
the Python API, "Lora hashes" in its infotext), and a 422 that names an unknown LoRA."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from lora_fixtures import lora_layers, write_kohya  # noqa: E402
from nanodiffusion.cli import main  # noqa: E402
from nanodiffusion.pipelines.text_to_image import TextToImage  # noqa: E402
from server_fakes import png, save_tiny_model  # noqa: E402

FAST = {"steps": 2, "width": 16, "height": 16, "seed": 3, "sampler_name": "Euler"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny model folder, a LoRA folder (style, sub/ink) and an embeddings folder (one that fits, one
    made for SD v1.x's 768-wide text encoder)."""
    root = tmp_path_factory.mktemp("serve-adapters")
    model = save_tiny_model(root / "tiny-sd")
    pipe = TextToImage.from_pretrained(model)
    networks = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    (root / "loras" / "sub").mkdir(parents=True)
    write_kohya(root / "loras" / "style.safetensors", lora_layers(networks, seed=1),
                metadata={"ss_output_name": "style"})
    write_kohya(root / "loras" / "sub" / "ink.safetensors", lora_layers(networks, text_encoder=(), seed=2))
    (root / "embeddings").mkdir()
    save_file({"emb_params": torch.randn(2, 32)}, str(root / "embeddings" / "sparkle.safetensors"))
    save_file({"emb_params": torch.zeros(1, 768)}, str(root / "embeddings" / "wide.safetensors"))
    return root


@pytest.fixture(scope="module")
def client(setup):
    """The app `nanodiffusion serve` builds with --lora-dir and --embeddings-dir (uvicorn not started)."""
    apps = []
    uvicorn = pytest.importorskip("uvicorn")
    patch = pytest.MonkeyPatch()
    patch.setattr(uvicorn, "run", lambda app, **options: apps.append(app))
    try:
        main(["serve", "--model", str(setup / "tiny-sd"), "--lora-dir", str(setup / "loras"),
              "--embeddings-dir", str(setup / "embeddings"), "--allowed-host", "testserver"])
    finally:
        patch.undo()
    with TestClient(apps[0]) as client:
        yield client


def test_loras_are_listed_with_paths_relative_to_the_folder(client):
    listing = client.get("/sdapi/v1/loras").json()
    assert [(entry["name"], entry["path"]) for entry in listing] == [
        ("style", "style.safetensors"), ("ink", "sub/ink.safetensors")]
    assert listing[0]["metadata"] == {"ss_output_name": "style"} and listing[0]["alias"] == "style"
    assert client.post("/sdapi/v1/refresh-loras").status_code == 200


def test_embeddings_are_listed_loaded_or_skipped(client):
    listing = client.get("/sdapi/v1/embeddings").json()
    assert listing["loaded"]["sparkle"]["shape"] == 32 and listing["loaded"]["sparkle"]["vectors"] == 2
    assert "768 wide" in listing["skipped"]["wide"]["error"] and "sparkle" not in listing["skipped"]


def test_txt2img_applies_prompt_loras_as_the_python_api(client, setup):
    answer = client.post("/sdapi/v1/txt2img", json={"prompt": "a sparkle cat <lora:style:0.6>", **FAST})
    assert answer.status_code == 200, answer.text
    info = json.loads(answer.json()["info"])
    assert 'Lora hashes: "style: ' in info["infotexts"][0]
    pipe = TextToImage.from_pretrained(setup / "tiny-sd")
    pipe.show_progress = False
    pipe.load_textual_inversion(setup / "embeddings" / "sparkle.safetensors")
    pipe.load_lora_weights(setup / "loras" / "style.safetensors")
    pipe.set_adapters("style", 0.6)
    expected = pipe("a sparkle cat", num_steps=2, height=16, width=16, seed=3, sampler="euler").images[0]
    assert np.array_equal(np.asarray(png(answer.json()["images"][0]).convert("RGB")), np.asarray(expected))
    plain = client.post("/sdapi/v1/txt2img", json={"prompt": "a sparkle cat", **FAST}).json()
    assert "Lora hashes" not in json.loads(plain["info"])["infotexts"][0]        # the LoRA left again
    assert not np.array_equal(np.asarray(png(plain["images"][0]).convert("RGB")), np.asarray(expected))


@pytest.mark.parametrize("prompt, message", [
    ("a cat <lora:nope:1>", "no LoRA 'nope' in the LoRA folder"),
    ("a cat <lora:style:x>", "the weight must be a number"),
])
def test_unknown_or_malformed_loras_are_refused_with_422(client, prompt, message):
    answer = client.post("/sdapi/v1/txt2img", json={"prompt": prompt, **FAST})
    assert answer.status_code == 422 and message in answer.json()["message"]
