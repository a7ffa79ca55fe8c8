"""Stopping jobs and keeping their results: cancel/interrupt take effect inside a network's forward pass (and
between VAE tiles), interrupt and skip return the image as far as it got, previews while sampling, finished
jobs kept by count and age (then a 404 that says "expired"), and a synchronous call whose client goes away
cancels its job.
"""

import base64
import json
import socket
import threading
from dataclasses import replace

import numpy as np
import pytest
import torch.nn as nn

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
from fastapi.testclient import TestClient  # noqa: E402

from nanodiffusion.images import to_pil  # noqa: E402
from nanodiffusion.pipelines.request import GenerationRequest  # noqa: E402
from nanodiffusion.server.app import create_app  # noqa: E402
from nanodiffusion.server import generation  # noqa: E402
from nanodiffusion.server.generation import run_job  # noqa: E402
from nanodiffusion.server.jobs import CANCEL, CANCELLED, DONE, INTERRUPT, SKIP, Job, JobQueue  # noqa: E402
from nanodiffusion.server.service import ServerSettings  # noqa: E402
from server_fakes import MODEL, WAIT, FakePipe, png, wait_until  # noqa: E402
from fixtures import tiny_ours  # noqa: E402

REQUEST = GenerationRequest("a cat", num_steps=4, seed=3, height=16, width=16, sampler="euler")


@pytest.fixture(scope="module")
def pipe():
    pipe = tiny_ours()
    pipe.show_progress = False
    return pipe


class LayerGate:
    """Holds the `call`-th forward of `layer` until the test has asked the job to stop, and counts the
    conv/linear forwards of `network` that complete after that request."""

    def __init__(self, network: nn.Module, layer: nn.Module, call: int):
        self.entered, self.stop_requested = threading.Event(), threading.Event()
        self.calls, self.after_stop = 0, 0
        self.handles = [layer.register_forward_pre_hook(self._hold)]
        self.handles += [m.register_forward_hook(self._count) for m in network.modules()
                         if isinstance(m, (nn.Conv2d, nn.Linear))]
        self.call = call

    def _hold(self, module, args):
        self.calls += 1
        if self.calls == self.call:
            self.entered.set()
            assert self.stop_requested.wait(WAIT)

    def _count(self, module, args, output):
        self.after_stop += self.stop_requested.is_set()

    def remove(self):
        for handle in self.handles:
            handle.remove()


def run_gated(pipe, gate: LayerGate, kind: str, request=REQUEST, num_images: int = 1) -> Job:
    """Run a job on a queue, ask it to stop (`kind`) once the gate holds a layer, and return it finished."""
    queue = JobQueue(lambda job: run_job(pipe, MODEL, job))
    queue.start()
    try:
        job = queue.submit(Job(request, num_images, request.num_steps))
        assert gate.entered.wait(WAIT)
        queue.cancel(job, kind)
        gate.stop_requested.set()
        wait_until(lambda: job.state in (DONE, CANCELLED))
        return job
    finally:
        gate.remove()
        queue.stop()


def first_conv(network: nn.Module) -> nn.Module:
    return next(m for m in network.modules() if isinstance(m, nn.Conv2d))


def test_a_cancel_stops_inside_the_unets_forward_pass(pipe):
    gate = LayerGate(pipe.unet, first_conv(pipe.unet), call=2)         # step 2's UNet pass (CFG batched)
    job = run_gated(pipe, gate, CANCEL)
    assert job.state == CANCELLED and job.step == 1 and job.images == []
    assert gate.after_stop == 0                # not one more layer ran: the held one did not either


def test_a_cancel_stops_between_and_inside_vae_tiles(monkeypatch):
    pipe = tiny_ours()
    monkeypatch.setattr(generation, "VAE_TILE", 4)                  # 8x8 latents: 3x3 tiles
    pipe.vae_tile_overlap = 1
    decoder_in = first_conv(pipe.vae.decoder)
    gate = LayerGate(pipe.vae.decoder, decoder_in, call=2)         # the second tile of the final decode
    job = run_gated(pipe, gate, CANCEL)
    assert job.state == CANCELLED and job.step == REQUEST.num_steps and gate.after_stop == 0


def test_interrupt_returns_the_image_as_far_as_it_got(pipe):
    estimates = []
    pipe.generate(REQUEST, callback=lambda i, x, denoised: estimates.append(denoised))
    expected = np.asarray(to_pil(pipe.decode_latents(estimates[0]))[0])     # decoded after step 1
    gate = LayerGate(pipe.unet, first_conv(pipe.unet), call=2)
    job = run_gated(pipe, gate, INTERRUPT)
    assert job.state == DONE and job.interrupted and len(job.images) == 1
    [image] = job.images
    assert image.partial and image.infotext.endswith(", Interrupted: true")
    assert np.array_equal(np.asarray(png_of(image)), expected)


def png_of(image):
    return png(base64.b64encode(image.png).decode())


def test_skip_ends_the_current_image_and_goes_on(pipe):
    gate = LayerGate(pipe.unet, first_conv(pipe.unet), call=REQUEST.num_steps + 2)   # image 1, step 2
    job = run_gated(pipe, gate, SKIP, num_images=3)
    assert job.state == DONE and not job.interrupted
    assert [image.partial for image in job.images] == [False, True, False]
    assert [image.seed for image in job.images] == [3, 4, 5]
    whole = pipe.generate(replace(REQUEST, seed=5)).images[0]           # the image after the skip is whole
    assert np.array_equal(np.asarray(png_of(job.images[2])), np.asarray(whole))


class PausedPipe:
    """The tiny pipeline, pausing after each step until the test allows the next."""

    def __init__(self, pipe):
        self.pipe, self.permits = pipe, threading.Semaphore(0)

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def generate(self, request, callback=None, **inputs):
        def paused(i, x, denoised):
            callback(i, x, denoised)
            assert self.permits.acquire(timeout=WAIT)
        return self.pipe.generate(request, callback=paused, **inputs)


def test_previews_and_progress_current_image_while_sampling(pipe):
    paused = PausedPipe(pipe)
    with TestClient(create_app(paused, MODEL, ServerSettings(preview_budget=1.0))) as client:
        job = client.post("/api/jobs", json={"prompt": "a cat", "steps": 3, "width": 32, "height": 16}).json()
        wait_until(lambda: client.get(f"/api/jobs/{job['id']}").json()["preview"] is not None)
        preview = client.get(f"/api/jobs/{job['id']}").json()["preview"]
        assert preview["step"] == 1 and client.get(preview["url"]).headers["content-type"] == "image/png"
        current = client.get("/sdapi/v1/progress").json()["current_image"]
        assert png(current).size == (32, 16)
        assert client.get("/sdapi/v1/progress?skip_current_image=true").json()["current_image"] is None
        paused.permits.release(3)
        wait_until(lambda: client.get(f"/api/jobs/{job['id']}").json()["state"] == "done")
        assert client.get(f"/api/jobs/{job['id']}").json()["preview"] is None


def test_finished_jobs_expire_by_count_and_by_age():
    with TestClient(create_app(FakePipe(), MODEL, ServerSettings(keep_jobs=2, keep_minutes=1))) as client:
        ids = [client.post("/api/jobs", json={"prompt": "a cat", "steps": 1}).json()["id"] for _ in range(3)]
        wait_until(lambda: client.get(f"/api/jobs/{ids[2]}").json()["state"] == "done")
        gone = client.get(f"/api/jobs/{ids[0]}")
        assert gone.status_code == 404 and "expired" in gone.json()["detail"]
        assert "last 2" in gone.json()["detail"] and client.get(f"/api/jobs/{ids[1]}").status_code == 200
        client.app.state.service.queue.get(ids[1]).finished -= 61          # finished over a minute ago
        assert "expired" in client.get(f"/api/jobs/{ids[1]}/images/0.png").json()["detail"]
        unknown = client.get("/api/jobs/0123")
        assert unknown.status_code == 404 and unknown.json()["detail"] == "no job 0123"


def test_a_txt2img_call_whose_client_goes_away_is_cancelled():
    fake = FakePipe(gated=True)
    app = create_app(fake, MODEL)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started)
    port = server.servers[0].sockets[0].getsockname()[1]
    body = json.dumps({"prompt": "abandoned", "steps": 3}).encode()
    with socket.create_connection(("127.0.0.1", port)) as client:
        client.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                       b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        assert fake.running.wait(WAIT)
        job = app.state.service.queue.current
    wait_until(lambda: job.cancel_requested)                  # the socket closed: the job is asked to stop
    fake.allow(3)
    wait_until(lambda: job.state == CANCELLED)
    server.should_exit = True
    thread.join(WAIT)


def test_a_model_that_fails_to_load_leaves_the_previous_one_and_no_path(tmp_path):
    from nanodiffusion.pipelines.metadata import ModelRecord
    from nanodiffusion.pipelines.text_to_image import TextToImage
    from nanodiffusion.server.models import ModelRegistry
    from server_fakes import save_tiny_model

    for name, seed in (("first", 0), ("good", 1)):
        save_tiny_model(tmp_path / name, seed)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    first = TextToImage.from_pretrained(tmp_path / "first")
    registry = ModelRegistry(first, ModelRecord("first", tmp_path / "first", "00", "fp32", "cpu"),
                             dirs=[tmp_path], load=TextToImage.from_pretrained)
    with TestClient(create_app(first, registry.served, registry=registry)) as client:
        refused = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "sub/bad.safetensors"})
        assert refused.status_code == 422 and "sub/bad.safetensors" in refused.json()["message"]
        assert str(tmp_path) not in refused.text
        assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "first [00]"
        assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "good"}).status_code == 200
        assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"].startswith("good [")
        answer = client.post("/sdapi/v1/txt2img", json={"prompt": "a cat", "steps": 1})
        assert answer.status_code == 200 and json.loads(answer.json()["info"])["sd_model_name"] == "good"


def test_a_model_switch_waits_for_the_running_job(tmp_path):
    from nanodiffusion.pipelines.metadata import ModelRecord
    from nanodiffusion.server.models import ModelRegistry

    for name in ("a", "b"):
        (tmp_path / f"{name}.safetensors").write_bytes(name.encode())
    first, second, loaded = FakePipe(gated=True), FakePipe(), []
    registry = ModelRegistry(first, ModelRecord("a", tmp_path / "a.safetensors", "00", "fp32", "cpu"),
                             dirs=[tmp_path], load=lambda path: loaded.append(path.name) or second)
    with TestClient(create_app(first, registry.served, registry=registry)) as client:
        generated, answers = [], []
        call = threading.Thread(target=lambda: generated.append(
            client.post("/sdapi/v1/txt2img", json={"prompt": "a cat", "steps": 3})))
        call.start()
        assert first.running.wait(WAIT)
        switch = threading.Thread(target=lambda: answers.append(
            client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "b.safetensors"})))
        switch.start()
        wait_until(lambda: client.get("/sdapi/v1/progress").json()["state"]["job_count"] == 2)
        assert loaded == [] and answers == []                   # queued behind the running job
        first.allow(3)
        for thread in (call, switch):
            thread.join(WAIT)
        assert answers[0].status_code == 200 and loaded == ["b.safetensors"]
        info = json.loads(generated[0].json()["info"])         # answered after the switch, made before it
        assert info["sd_model_name"] == "a" and "Model: a," in info["infotexts"][0]
        after = client.post("/sdapi/v1/txt2img", json={"prompt": "a cat", "steps": 1}).json()
        assert json.loads(after["info"])["sd_model_name"] == "b"
