"""Hostile input to every endpoint: each gets a 4xx with a JSON `detail`, never a 5xx or a traceback
(TestClient re-raises any exception of the app), and the worker generates afterwards. Also the guards: the
Host header, the API key, non-finite JSON numbers, and `serve`'s refusal to bind beyond localhost without a
key.
"""

import argparse
import base64
import io
import zlib

import pytest
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from nanodiffusion.commands import serve  # noqa: E402
from nanodiffusion.errors import UserError  # noqa: E402
from nanodiffusion.server.app import create_app  # noqa: E402
from nanodiffusion.server.limits import Limits  # noqa: E402
from nanodiffusion.server.service import ServerSettings  # noqa: E402
from server_fakes import MODEL, b64_image  # noqa: E402
from fixtures import tiny_ours  # noqa: E402

OK = {"prompt": "a cat", "steps": 1, "width": 16, "height": 16}
INIT = b64_image(Image.new("RGB", (16, 16), (10, 200, 30)))
BIG = b64_image(Image.new("RGB", (80, 80)))                       # over max_upload_pixels below
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def client():
    pipe = tiny_ours()
    pipe.show_progress = False
    settings = ServerSettings(limits=Limits(max_upload_pixels=64 * 64, max_job_cost=0.5))
    with TestClient(create_app(pipe, MODEL, settings)) as client:
        yield client


RAW_BODIES = [                              # (path, raw JSON body, what the answer must mention)
    ("/sdapi/v1/txt2img", b'{"prompt": "x", "eta": NaN}', "finite"),
    ("/sdapi/v1/txt2img", b'{"prompt": "x", "cfg_scale": Infinity}', "finite"),
    ("/sdapi/v1/txt2img", b'{"prompt": "x", "override_settings": {"a": [-Infinity]}}', "finite"),
    ("/sdapi/v1/txt2img", b'{"prompt": "x", "s_noise": 1e400}', "finite"),
    ("/sdapi/v1/txt2img", b'{"prompt": "x", "steps": ' + b"9" * 5000 + b"}", "digits"),
    ("/sdapi/v1/txt2img", b'{"prompt": "x", "seed": 1e3}', "seed"),
    ("/sdapi/v1/txt2img", b"[" * 100_000 + b"]" * 100_000, ""),
    ("/sdapi/v1/txt2img", b"null", ""),
    ("/sdapi/v1/txt2img", b'"a cat"', ""),
    ("/sdapi/v1/txt2img", b"", ""),
    ("/sdapi/v1/txt2img", b'{"prompt": "x"', ""),
    ("/sdapi/v1/img2img", b'{"init_images": ["%s"], "denoising_strength": NaN}' % INIT.encode(), "finite"),
    ("/sdapi/v1/options", b'{"CLIP_stop_at_last_layers": NaN}', "finite"),
    ("/sdapi/v1/options", b"[1, 2]", ""),
    ("/sdapi/v1/png-info", b"{}", "image"),
    ("/api/jobs", b'{"prompt": "x", "cfg_scale": -Infinity}', "finite"),
]


@pytest.mark.parametrize("path, raw, mentions", RAW_BODIES)
def test_raw_bodies_are_4xx(client, path, raw, mentions):
    answer = client.post(path, content=raw, headers=JSON)
    assert 400 <= answer.status_code < 500 and answer.json()["detail"], answer.text
    assert mentions in answer.text


BODIES = [                                  # (path, body, what the answer must mention)
    ("/sdapi/v1/txt2img", {**OK, "width": 2048, "height": 2048, "steps": 150}, "--max-job-cost"),
    ("/sdapi/v1/txt2img", {**OK, "steps": 10**30}, "steps"),
    ("/sdapi/v1/txt2img", {**OK, "batch_size": 9}, "batch_size"),
    ("/sdapi/v1/txt2img", {**OK, "n_iter": 9}, "n_iter"),
    ("/sdapi/v1/txt2img", {**OK, "seed": 2**32}, "seed"),
    ("/sdapi/v1/txt2img", {**OK, "override_settings": []}, "override_settings"),
    ("/sdapi/v1/txt2img", {**OK, "sampler_name": ["Euler"]}, "sampler_name"),
    ("/sdapi/v1/txt2img", {**OK, "init_images": [INIT]}, "init_images"),
    ("/sdapi/v1/txt2img", {**OK, "eta": -1}, "eta"),
    ("/sdapi/v1/txt2img", {**OK, "s_churn": "2"}, "s_churn"),
    ("/sdapi/v1/txt2img", {**OK, "sampler_name": "TCD", "eta": 1.5}, "eta must be in [0, 1] for 'tcd'"),
    ("/sdapi/v1/img2img", OK, "init_images"),
    ("/sdapi/v1/img2img", {**OK, "init_images": []}, "init_images"),
    ("/sdapi/v1/img2img", {**OK, "init_images": ["not base64!"]}, "base64"),
    ("/sdapi/v1/img2img", {**OK, "init_images": [base64.b64encode(b"GIF89a...").decode()]}, "readable"),
    ("/sdapi/v1/img2img", {**OK, "init_images": [BIG]}, "pixels"),
    ("/sdapi/v1/img2img", {**OK, "init_images": [INIT], "mask": "data:image/png;base64,AAAA"}, "mask"),
    ("/sdapi/v1/img2img", {**OK, "init_images": [INIT], "mask": BIG}, "mask"),
    ("/sdapi/v1/img2img", {**OK, "init_images": [INIT], "resize_mode": 3}, "latent upscale"),
    ("/sdapi/v1/img2img", {**OK, "init_images": [INIT], "inpainting_fill": 2}, "inpainting_fill"),
    ("/sdapi/v1/img2img", {**OK, "init_images": [INIT], "inpaint_full_res": 2}, "inpaint_full_res"),
    ("/sdapi/v1/img2img", {**OK, "init_images": [INIT], "mask_round": False}, "mask_round"),
    ("/sdapi/v1/img2img", {**OK, "init_images": [INIT], "mask_blur_x": 9}, "mask_blur_x"),
    ("/sdapi/v1/img2img", {**OK, "init_images": [INIT], "initial_noise_multiplier": 1.5}, "noise"),
    ("/sdapi/v1/img2img", {**OK, "init_images": [INIT], "latent_mask": INIT}, "latent_mask"),
    ("/sdapi/v1/img2img", {**OK, "init_images": [INIT], "denoising_strength": 1.5}, "denoising_strength"),
    ("/sdapi/v1/img2img", {**OK, "init_images": [INIT] * 3, "batch_size": 2}, "init_images"),
    ("/sdapi/v1/img2img", {**OK, "init_images": [INIT], "width": 4096}, "width"),
    ("/sdapi/v1/img2img", {**OK, "init_images": [INIT], "enable_hr": True}, "enable_hr"),
    ("/api/jobs/img2img", {**OK, "init_images": ["%%%"]}, "base64"),
    ("/sdapi/v1/png-info", {"image": "bm90IGFuIGltYWdl"}, "readable"),
    ("/sdapi/v1/png-info", {"image": INIT, "extra": 1}, "extra"),
    ("/sdapi/v1/png-info", {"image": 5}, "image"),
    ("/sdapi/v1/options", {"sd_model_checkpoint": 5}, "sd_model_checkpoint"),
    ("/sdapi/v1/options", {"sd_model_checkpoint": "/etc/passwd"}, "no model"),
    ("/sdapi/v1/options", {"sd_model_checkpoint": "../tiny-sd"}, "no model"),
    ("/sdapi/v1/options", {"CLIP_stop_at_last_layers": 13}, "CLIP_stop_at_last_layers"),
    ("/sdapi/v1/options", {"samples_format": "jpg"}, "samples_format"),
]


@pytest.mark.parametrize("path, body, mentions", BODIES)
def test_bad_bodies_are_4xx_naming_the_problem(client, path, body, mentions):
    answer = client.post(path, json=body)
    assert 400 <= answer.status_code < 500 and answer.json()["detail"], answer.text
    assert mentions in answer.text


@pytest.mark.parametrize("method, path", [
    ("GET", "/api/jobs/%00%ff"), ("GET", "/api/jobs/x/images/-1.png"), ("GET", "/api/jobs/x/images/a.png"),
    ("DELETE", "/api/jobs/nope"), ("GET", "/api/jobs/nope/preview.png"), ("GET", "/sdapi/v1/txt2img"),
    ("GET", "/sdapi/v1/progress?skip_current_image=maybe"), ("GET", "/sdapi/v1/nothing-here"),
])
def test_bad_urls_are_4xx(client, method, path):
    answer = client.request(method, path)
    assert 400 <= answer.status_code < 500 and answer.json()["detail"]


def test_the_worker_generates_after_all_that(client):
    answer = client.post("/sdapi/v1/txt2img", json=OK)
    assert answer.status_code == 200 and len(answer.json()["images"]) == 1


def guarded(**settings) -> TestClient:
    return TestClient(create_app(tiny_ours(), MODEL, ServerSettings(**settings)))


def test_only_the_allowed_host_names_are_answered():
    local = frozenset(serve.LOCAL_HOSTS)
    with guarded(allowed_hosts=local) as client:
        for host in ("localhost:7860", "127.0.0.1", "[::1]:7860", "LOCALHOST"):
            assert client.get("/sdapi/v1/samplers", headers={"host": host}).status_code == 200, host
        refused = client.get("/sdapi/v1/options", headers={"host": "rebound.example:7860"})
        assert refused.status_code == 400 and "--allowed-host" in refused.json()["detail"]
        assert "tiny-sd" not in refused.text                            # nothing about the model leaks
    with guarded(allowed_hosts=local | {"*"}) as client:
        assert client.get("/sdapi/v1/samplers", headers={"host": "anything.example"}).status_code == 200


def test_the_api_key_is_required_when_set():
    with guarded(api_key="s3cret") as client:
        bare = client.get("/sdapi/v1/options")
        assert bare.status_code == 401 and bare.headers["www-authenticate"].startswith("Basic")
        assert client.get("/", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.get("/", headers={"Authorization": "Basic %%%"}).status_code == 401
        assert client.get("/sdapi/v1/options", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert client.get("/sdapi/v1/options", auth=("anyone", "s3cret")).status_code == 200


def serve_settings(*argv: str):
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    args = parser.parse_args(argv)
    return serve._settings(args, Limits(), ServerSettings)


def test_serve_needs_a_key_beyond_localhost_and_names_its_hosts():
    with pytest.raises(UserError, match="--api-key"):
        serve_settings("--host", "0.0.0.0")
    settings = serve_settings("--host", "192.168.1.5", "--api-key", "k", "--allowed-host", "Box.lan")
    assert settings.allowed_hosts == {"127.0.0.1", "localhost", "::1", "192.168.1.5", "box.lan"}
    assert settings.flags["api_key"] is True and "k" not in str(settings.flags.values())
    assert serve_settings().allowed_hosts == {"127.0.0.1", "localhost", "::1"}
    with pytest.raises(UserError, match="--keep-jobs"):
        serve_settings("--keep-jobs", "0")


def test_an_image_with_a_huge_declared_size_is_refused_before_decoding(client):
    header = io.BytesIO()
    Image.new("L", (1, 1)).save(header, "PNG")
    data = bytearray(header.getvalue())
    data[16:24] = (100_000).to_bytes(4, "big") * 2                     # IHDR: 100000 x 100000 ...
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")    # ... with its CRC
    answer = client.post("/sdapi/v1/png-info", json={"image": base64.b64encode(bytes(data)).decode()})
    assert answer.status_code == 422 and "pixels allowed" in answer.json()["message"]
