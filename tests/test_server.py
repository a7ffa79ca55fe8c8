"""`nanodiffusion serve`'s app through FastAPI's TestClient: A1111's txt2img with a tiny model (PNGs that
carry `generate`'s metadata and replay alone), validation (422 naming the field, 413), the A1111 listing
endpoints, progress, cancel and interrupt, failure isolation and the bounded queue (429), with fake pipelines
for timing.
"""

import argparse
import io
import json
import subprocess
import sys
import threading

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from nanodiffusion import __version__  # noqa: E402
from nanodiffusion.cli import COMMANDS  # noqa: E402
from nanodiffusion.commands import serve  # noqa: E402
from nanodiffusion.errors import UserError  # noqa: E402
from nanodiffusion.pipelines.metadata import read_settings  # noqa: E402
from nanodiffusion.pipelines.request import GenerationRequest  # noqa: E402
from nanodiffusion.server.app import create_app  # noqa: E402
from nanodiffusion.server.service import ServerSettings  # noqa: E402
from nanodiffusion.weights.models import BUILTIN_TEXT_TO_IMAGE  # noqa: E402
from fixtures import tiny_ours  # noqa: E402
from server_fakes import MODEL, WAIT, FakePipe, png, wait_until  # noqa: E402

FAST = {"steps": 2, "width": 16, "height": 16}           # the tiny VAE halves: 8x8 latents


@pytest.fixture(scope="module")
def pipe():
    pipe = tiny_ours()
    pipe.show_progress = False
    return pipe


@pytest.fixture(scope="module")
def client(pipe):
    with TestClient(create_app(pipe, MODEL, ServerSettings(queue_size=4))) as client:
        yield client


def test_txt2img_returns_pngs_with_generate_metadata_that_replay_alone(client, pipe):
    body = {"prompt": "a photo of a cat, (red:1.2) collar", "negative_prompt": "blurry", "seed": 42,
            "cfg_scale": 7.5, "sampler_name": "Euler a", "batch_size": 2, **FAST}
    answer = client.post("/sdapi/v1/txt2img", json=body)
    assert answer.status_code == 200, answer.text
    result = answer.json()
    info = json.loads(result["info"])
    assert info["all_seeds"] == [42, 43] and info["seed"] == 42 and info["sampler_name"] == "Euler a"
    assert result["parameters"]["prompt"] == body["prompt"] and len(result["images"]) == 2
    second = png(result["images"][1])
    assert second.format == "PNG" and second.size == (16, 16)
    assert second.text["parameters"] == info["infotexts"][1] == (
        "a photo of a cat, (red:1.2) collar\nNegative prompt: blurry\n"
        "Steps: 2, Sampler: Euler a, CFG scale: 7.5, Seed: 43, Size: 16x16, Model hash: 0123456789, "
        f"Model: tiny-sd, Version: nanodiffusion {__version__}")
    settings = read_settings(second.text, "answer")
    assert settings["model"] == "tiny-sd" and settings["dtype"] == "fp32" and settings["device"] == "cpu"
    request = GenerationRequest.from_dict(settings["request"])
    assert request.seed == 43 and request.num_images_per_prompt == 1
    alone = pipe.generate(request).images[0]                # what `generate --from` would run
    assert np.array_equal(np.asarray(alone), np.asarray(second.convert("RGB")))


def test_a1111_sampler_names_with_a_schedule(client):
    answer = client.post("/sdapi/v1/txt2img", json={"prompt": "a cat", "sampler_name": "DPM++ 2M Karras",
                                                     "seed": 1, **FAST})
    assert answer.status_code == 200, answer.text
    info = json.loads(answer.json()["info"])
    assert (info["sampler_name"], info["scheduler"]) == ("DPM++ 2M", "Karras")
    assert "Sampler: DPM++ 2M, Schedule type: Karras," in info["infotexts"][0]
    old = client.post("/sdapi/v1/txt2img", json={"prompt": "a cat", "sampler_index": "LMS", "seed": 1,
                                                  "scheduler": "exponential", **FAST})
    assert json.loads(old.json()["info"])["infotexts"][0].count("Sampler: LMS, Schedule type: Exponential")


def test_every_listed_sampler_runs(client):
    names = [sampler["name"] for sampler in client.get("/sdapi/v1/samplers").json()]
    assert {"Euler a", "DPM++ 2M", "DDIM", "PLMS", "UniPC", "DPM++ SDE", "Restart", "TCD"} <= set(names)
    assert len(names) == 19
    for name in names:
        answer = client.post("/sdapi/v1/txt2img", json={"prompt": "a cat", "sampler_name": name, **FAST})
        assert answer.status_code == 200, (name, answer.text)


@pytest.mark.parametrize("prompt", [
    "猫の写真, 一只猫", "🐱‍👤 cat 👩🏽‍🚀 (astronaut:1.2)", "قطة جميلة", "e\u0301te\u0301 \u200b zero-width",
    "line one\nline two\ttab", "ends with a backslash \\", "a " * 4000,
])
def test_any_unicode_prompt_round_trips_into_the_png(client, prompt):
    answer = client.post("/sdapi/v1/txt2img", json={"prompt": prompt, "negative_prompt": prompt[::-1],
                                                     "steps": 1, "width": 16, "height": 16, "seed": 3})
    assert answer.status_code == 200, answer.text
    image = png(answer.json()["images"][0])
    assert read_settings(image.text, "answer")["request"]["prompt"] == prompt
    assert image.text["parameters"].startswith(prompt)


@pytest.mark.parametrize("change, field", [
    ({"steps": 0}, "steps"), ({"steps": 151}, "steps"), ({"steps": "20"}, "steps"), ({"steps": 2.5}, "steps"),
    ({"cfg_scale": -1}, "cfg_scale"), ({"cfg_scale": "high"}, "cfg_scale"), ({"width": 20}, "width"),
    ({"height": 4096}, "height"), ({"width": 0}, "width"), ({"batch_size": 9}, "batch_size"),
    ({"batch_size": 0}, "batch_size"), ({"n_iter": 9}, "n_iter"), ({"seed": -2}, "seed"),
    ({"seed": 2**32}, "seed"), ({"prompt": 7}, "prompt"), ({"prompt": "x" * 10_001}, "prompt"),
    ({"prompt": "a\x00b"}, "prompt"), ({"sampler_name": "Eulerr"}, "sampler_name"),
    ({"scheduler": "Polyexponential"}, "scheduler"), ({"step": 20}, "step"),
    ({"override_settings": {"CLIP_stop_at_last_layers": "2"}}, "CLIP_stop_at_last_layers"),
    ({"sampler_name": "Euler Karras", "scheduler": "Exponential"}, "scheduler"),
    ({"sampler_name": "DPM fast"}, "sampler_name"),
])
def test_bad_fields_are_422_naming_the_field(client, change, field):
    for url in ("/sdapi/v1/txt2img", "/api/jobs"):
        answer = client.post(url, json={"prompt": "a cat", **FAST, **change})
        assert answer.status_code == 422, answer.text
        assert field in answer.json()["message"], answer.json()["message"]
        assert answer.json()["detail"]


def test_unpaired_surrogates_and_broken_json_are_422(client):
    raw = b'{"prompt": "half a pair \\ud83d", "steps": 1}'
    answer = client.post("/sdapi/v1/txt2img", content=raw, headers={"Content-Type": "application/json"})
    assert answer.status_code == 422 and "prompt: " in answer.json()["message"]
    raw = (b'{"prompt": "a cat", "steps": 1, "width": 16, "height": 16, '
           b'"override_settings": {"\\udc80": "\\ud800"}}')
    answer = client.post("/sdapi/v1/txt2img", content=raw, headers={"Content-Type": "application/json"})
    assert answer.status_code == 200 and json.loads(answer.json()["info"])["ignored_fields"] == [
        "override_settings.\udc80"]
    answer = client.post("/sdapi/v1/txt2img", content=b'{"prompt": ',
                         headers={"Content-Type": "application/json"})
    assert answer.status_code == 422


def test_ignored_a1111_fields_are_reported(client):
    body = {"prompt": "a cat", **FAST, "restore_faces": False, "send_images": True, "styles": [],
            "override_settings": {"CLIP_stop_at_last_layers": 2, "sd_vae": "auto"}}
    info = json.loads(client.post("/sdapi/v1/txt2img", json=body).json()["info"])
    assert info["ignored_fields"] == ["restore_faces", "send_images", "styles", "override_settings.sd_vae"]
    assert info["clip_skip"] == 2 and "Clip skip: 2" in info["infotexts"][0]


def test_oversized_bodies_get_413(client):
    big = json.dumps({"prompt": "x" * (2 << 20)}).encode()
    assert client.post("/sdapi/v1/txt2img", content=big,
                       headers={"Content-Type": "application/json"}).status_code == 413
    streamed = client.post("/api/jobs", content=iter([big[:1 << 19]] * 4),      # chunked, no Content-Length
                           headers={"Content-Type": "application/json"})
    assert streamed.status_code == 413 and "larger than" in streamed.json()["detail"]


def test_listing_endpoints_and_openapi(client):
    samplers = client.get("/sdapi/v1/samplers").json()
    euler_a = next(s for s in samplers if s["name"] == "Euler a")
    assert "euler_ancestral" in euler_a["aliases"] and "euler_a" in euler_a["aliases"]
    schedulers = client.get("/sdapi/v1/schedulers").json()
    labels = [s["label"] for s in schedulers]
    assert labels[:3] == ["Automatic", "Karras", "Exponential"] and len(labels) == 10
    # A1111's names, which its clients send back as `scheduler`, as they may the labels
    names = {s["name"] for s in schedulers}
    assert {"automatic", "sgm_uniform", "align_your_steps"} <= names
    for scheduler in ("sgm_uniform", "SGM Uniform"):
        answer = client.post("/sdapi/v1/txt2img", json={"prompt": "a cat", "scheduler": scheduler, **FAST})
        assert json.loads(answer.json()["info"])["scheduler"] == "SGM Uniform"
    [model] = client.get("/sdapi/v1/sd-models").json()
    assert model["title"] == "tiny-sd [0123456789]" and model["hash"] == "0123456789"
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == model["title"]
    info = client.get("/api/info").json()
    assert info["native_size"] == 16 and info["max_images"] == 8
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/sdapi/v1/txt2img", "/sdapi/v1/progress", "/sdapi/v1/interrupt", "/api/jobs"} <= set(paths)
    page = client.get("/")
    assert page.status_code == 200 and 'id="prompt"' in page.text
    assert client.get("/static/app.js").status_code == 200


def test_job_api_progress_and_png_download(client):
    idle = client.get("/sdapi/v1/progress").json()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0
    job = client.post("/api/jobs", json={"prompt": "a cat", "seed": 5, "batch_size": 2, **FAST})
    assert job.status_code == 202
    job_id = job.json()["id"]
    wait_until(lambda: client.get(f"/api/jobs/{job_id}").json()["state"] == "done")
    done = client.get(f"/api/jobs/{job_id}").json()
    assert done["progress"] == 1 and [image["seed"] for image in done["images"]] == [5, 6]
    download = client.get(done["images"][1]["url"])
    assert download.headers["content-type"] == "image/png"
    assert 'filename="00001-6.png"' in download.headers["content-disposition"]
    assert Image.open(io.BytesIO(download.content)).text["parameters"] == done["images"][1]["parameters"]
    assert client.get("/api/jobs/nope").status_code == 404
    assert client.get(f"/api/jobs/{job_id}/images/2.png").status_code == 404


def test_progress_and_cancel_answer_while_a_job_runs():
    fake = FakePipe(gated=True)
    with TestClient(create_app(fake, MODEL, ServerSettings(queue_size=2))) as client:
        running = client.post("/api/jobs", json={"prompt": "slow", "steps": 4}).json()["id"]
        waiting = client.post("/api/jobs", json={"prompt": "next", "steps": 1}).json()["id"]
        fake.allow(1)                                     # the job then waits inside its second step
        wait_until(lambda: client.get("/sdapi/v1/progress").json()["state"]["sampling_step"] == 1)
        progress = client.get("/sdapi/v1/progress").json()
        assert progress["progress"] == 0.25 and progress["eta_relative"] > 0
        assert progress["state"]["job"] == running and progress["state"]["job_count"] == 2
        assert client.get(f"/api/jobs/{waiting}").json()["queue_position"] == 1
        cancelled = client.delete(f"/api/jobs/{running}").json()
        assert cancelled["cancel_requested"] and cancelled["state"] == "running"
        fake.allow(1)                                     # it stops at the end of this step
        wait_until(lambda: client.get(f"/api/jobs/{running}").json()["state"] == "cancelled")
        assert client.get(f"/api/jobs/{running}").json()["step"] == 2
        fake.allow(1)
        wait_until(lambda: client.get(f"/api/jobs/{waiting}").json()["state"] == "done")   # worker freed


def test_a_waiting_job_is_cancelled_at_once():
    fake = FakePipe(gated=True)
    with TestClient(create_app(fake, MODEL, ServerSettings(queue_size=2))) as client:
        client.post("/api/jobs", json={"prompt": "slow", "steps": 1})
        waiting = client.post("/api/jobs", json={"prompt": "next", "steps": 1}).json()["id"]
        assert client.delete(f"/api/jobs/{waiting}").json()["state"] == "cancelled"
        fake.allow(1)


def test_interrupt_answers_the_waiting_txt2img_call():
    fake = FakePipe(gated=True)
    with TestClient(create_app(fake, MODEL)) as client:
        answers = []
        caller = threading.Thread(target=lambda: answers.append(client.post(
            "/sdapi/v1/txt2img", json={"prompt": "slow", "steps": 1, "batch_size": 2})))
        caller.start()
        fake.allow(1)                                     # image 0 is made, image 1 waits in its step
        wait_until(lambda: client.get("/sdapi/v1/progress").json()["state"]["job_no"] == 1)
        assert client.post("/sdapi/v1/interrupt").status_code == 200
        fake.allow(1)
        caller.join(WAIT)
        [answer] = answers
        info = json.loads(answer.json()["info"])
        assert answer.status_code == 200 and info["interrupted"] and len(answer.json()["images"]) == 1
        assert info["all_seeds"] == [info["seed"]]


def test_a_failing_job_is_a_500_and_the_worker_goes_on():
    with TestClient(create_app(FakePipe(), MODEL)) as client:
        failed = client.post("/sdapi/v1/txt2img", json={"prompt": "fail please", "steps": 1})
        assert failed.status_code == 500
        assert failed.json()["detail"] == "RuntimeError: the fake pipeline fails on purpose"
        job = client.post("/api/jobs", json={"prompt": "fail again", "steps": 1}).json()["id"]
        wait_until(lambda: client.get(f"/api/jobs/{job}").json()["state"] == "failed")
        assert client.post("/sdapi/v1/txt2img", json={"prompt": "fine", "steps": 1}).status_code == 200


def test_a_full_queue_answers_429_with_retry_after():
    fake = FakePipe(gated=True)
    with TestClient(create_app(fake, MODEL, ServerSettings(queue_size=1))) as client:
        first = client.post("/api/jobs", json={"prompt": "slow", "steps": 1})
        assert fake.running.wait(WAIT)                                   # running: the queue is empty
        second = client.post("/api/jobs", json={"prompt": "waits", "steps": 1})
        third = client.post("/api/jobs", json={"prompt": "too many", "steps": 1})
        assert (first.status_code, second.status_code, third.status_code) == (202, 202, 429)
        assert int(third.headers["Retry-After"]) >= 1 and "queue is full" in third.json()["detail"]
        assert client.post("/sdapi/v1/txt2img", json={"prompt": "too", "steps": 1}).status_code == 429
        fake.allow(2)
        wait_until(lambda: client.get(f"/api/jobs/{second.json()['id']}").json()["state"] == "done")
        assert client.post("/api/jobs", json={"prompt": "room again", "steps": 1}).status_code == 202
        fake.allow(1)


def serve_command(*argv: str) -> None:
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    serve.run(parser.parse_args(argv))


def test_serve_needs_fastapi_and_a_model(monkeypatch, tmp_path):
    assert COMMANDS["serve"][0] == "serve"
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "uvicorn", None)                     # as if it were not installed
        with pytest.raises(UserError, match=r"pip install 'nanodiffusion\[serve\]'"):
            serve_command("--model", str(tmp_path))
    monkeypatch.setitem(BUILTIN_TEXT_TO_IMAGE, "builtin", tmp_path / "not-shipped")
    with pytest.raises(UserError, match=r"not shipped yet \(or was removed\): pass --model"):
        serve_command()
    with pytest.raises(UserError, match="no such model file or folder"):
        serve_command("--model", str(tmp_path / "missing"))
    with pytest.raises(UserError, match="--queue-size must be >= 1"):
        serve_command("--model", str(tmp_path), "--queue-size", "0")


def test_the_package_and_other_commands_work_without_fastapi():
    code = ("import sys; sys.modules.update(fastapi=None, uvicorn=None, starlette=None)\n"
            "from nanodiffusion.cli import build_parser; build_parser().parse_args(['info', 'x.png'])\n"
            "import nanodiffusion.commands.serve")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_large_images_are_decoded_in_tiles_that_the_png_records(client, pipe, monkeypatch):
    from nanodiffusion.server import generation
    monkeypatch.setattr(generation, "VAE_TILE", 32)                # latent pixels; the tiny VAE halves
    answer = client.post("/sdapi/v1/txt2img", json={"prompt": "a wide one", "steps": 2, "width": 80,
                                                     "height": 16, "seed": 4})
    image = png(answer.json()["images"][0])
    settings = read_settings(image.text, "answer")
    assert settings["vae_tile"] == 32
    pipe.vae_tile_size = 32
    try:
        expected = pipe.generate(GenerationRequest.from_dict(settings["request"])).images[0]
    finally:
        pipe.vae_tile_size = None
    assert np.array_equal(np.asarray(expected), np.asarray(image.convert("RGB")))
