"""The server's ControlNet support in the shape of A1111's ControlNet extension: the listings, units in
`alwayson_scripts` on txt2img and img2img (the same pixels as the pipeline called directly, recorded in the
PNG), 422s that name the unit's field, and `webuiapi`'s ControlNetUnit against a real server process."""

import json

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from nanodiffusion.nets.controlnet import ControlNet  # noqa: E402
from nanodiffusion.server.app import create_app  # noqa: E402
from nanodiffusion.server.controlnets import ControlNetRegistry  # noqa: E402
from nanodiffusion.weights.controlnet import save_controlnet  # noqa: E402
from nanodiffusion.weights.models import model_hash  # noqa: E402
from fixtures import randomize_  # noqa: E402
from server_fakes import MODEL, b64_image, png, save_tiny_model, serve_process  # noqa: E402
from test_server import pipe  # noqa: E402, F401 (the tiny pipeline fixture)

FAST = {"steps": 3, "width": 16, "height": 16, "seed": 4, "sampler_name": "Euler"}


def square(size: int = 40) -> Image.Image:
    image = np.zeros((size, size, 3), np.uint8)
    image[size // 4:3 * size // 4, size // 4:3 * size // 4] = 255
    return Image.fromarray(image)


@pytest.fixture(scope="module")
def controlnet_dir(tmp_path_factory, pipe):
    folder = tmp_path_factory.mktemp("controlnets")
    network = randomize_(ControlNet.from_unet(pipe.unet, embedding_channels=(8, 16)), 3, fresh=True)
    save_controlnet(network, folder / "control_tiny_canny.safetensors")
    save_controlnet(network, folder / "sub" / "tiny-folder")                 # a diffusers folder
    (folder / "notes.safetensors.txt").write_text("not a ControlNet")
    return folder


@pytest.fixture(scope="module")
def client(pipe, controlnet_dir):
    with TestClient(create_app(pipe, MODEL, controlnets=ControlNetRegistry([controlnet_dir]))) as client:
        yield client


def unit(**fields) -> dict:
    """A unit as webuiapi's ControlNetUnit.to_dict() sends it (its defaults), with `fields` changed."""
    return {"image": b64_image(square()), "mask": None, "module": "canny",
            "model": "control_tiny_canny [0badc0de]", "weight": 0.7, "resize_mode": "Crop and Resize",
            "low_vram": False, "processor_res": 64, "threshold_a": 80, "threshold_b": 160,
            "guidance_start": 0.0, "guidance_end": 1.0, "control_mode": 0, "pixel_perfect": False,
            "hr_option": "Both", "enabled": True, **fields}


def txt2img(client, *units, status: int = 200, **body) -> dict:
    scripts = {"alwayson_scripts": {"ControlNet": {"args": list(units)}}} if units else {}
    answer = client.post("/sdapi/v1/txt2img", json={"prompt": "a box", **FAST, **scripts, **body})
    assert answer.status_code == status, answer.text
    return answer.json()


def test_listings(client, controlnet_dir):
    models = client.get("/controlnet/model_list").json()["model_list"]
    digest = model_hash(controlnet_dir / "control_tiny_canny.safetensors")[:8]
    folder_digest = model_hash(controlnet_dir / "sub" / "tiny-folder")[:8]
    assert models == [f"control_tiny_canny [{digest}]", f"tiny-folder [{folder_digest}]"]
    assert client.get("/controlnet/module_list").json() == {"module_list": ["none", "canny"]}
    assert client.get("/controlnet/version").json()["version"] >= 1


def test_a_unit_steers_txt2img_as_the_pipeline_does_and_is_recorded(client, pipe, controlnet_dir):
    plain = png(txt2img(client)["images"][0])
    result = txt2img(client, unit())
    steered = png(result["images"][0])
    assert np.abs(np.asarray(steered, int) - np.asarray(plain, int)).max() > 5
    text = steered.text
    control, = json.loads(text["nanodiffusion"])["request"]["controls"]
    path = controlnet_dir / "control_tiny_canny.safetensors"
    assert control["model"] == "control_tiny_canny.safetensors" and control["model_hash"] == model_hash(path)
    assert (control["preprocess"], control["processor_res"], control["resize_mode"]) == \
        ("canny", 64, "crop_and_resize")
    assert 'ControlNet 0: "Module: canny, Model: control_tiny_canny' in text["parameters"]
    assert not pipe.controlnets                                      # the server detached its own
    pipe.load_controlnet(str(path))
    try:
        direct = pipe("a box", control_image=square(), control_preprocess="canny", sampler="euler", seed=4,
                      num_steps=3, height=16, width=16, controlnet_conditioning_scale=0.7,
                      control_resize_mode="crop_and_resize", control_processor_res=64,
                      control_low_threshold=80, control_high_threshold=160).images[0]
    finally:
        pipe.controlnets.clear()
    assert np.array_equal(np.asarray(direct), np.asarray(steered))
    assert np.array_equal(np.asarray(png(txt2img(client, unit(enabled=False))["images"][0])),
                          np.asarray(plain))                         # a disabled unit is no unit
    two = txt2img(client, unit(), unit(model="tiny-folder", module="none", weight=0.3, control_mode=1))
    assert len(json.loads(png(two["images"][0]).text["nanodiffusion"])["request"]["controls"]) == 2


def test_img2img_takes_units_too(client):
    body = {"prompt": "a box", "init_images": [b64_image(Image.new("RGB", (16, 16), "gray"))],
            "denoising_strength": 0.7, **FAST, "alwayson_scripts": {"controlnet": {"args": [unit()]}}}
    answer = client.post("/sdapi/v1/img2img", json=body)
    assert answer.status_code == 200, answer.text
    assert "ControlNet 0" in png(answer.json()["images"][0]).text["parameters"]


@pytest.mark.parametrize("fields, message", [
    ({"model": "control_sd15_depth"}, "ControlNet model 'control_sd15_depth' is not here; available: "),
    ({"module": "depth_midas"}, "module 'depth_midas' is not available here; valid: none, canny"),
    ({"image": ""}, "a ControlNet unit needs its control image"),
    ({"image": "***"}, "alwayson_scripts.controlnet.args.0.image: not valid base64"),
    ({"guidance_start": 0.8, "guidance_end": 0.2}, "0 <= start < end <= 1"),
    ({"control_mode": 7}, "control_mode 7 is not one of"),
    ({"weight": "strong"}, "weight"),
    ({"mask": "abcd"}, "inpainting ControlNets are not supported"),
    ({"made_up": 1}, "unknown field made_up"),
])
def test_bad_units_are_422s_that_name_the_problem(client, fields, message):
    answer = txt2img(client, unit(**fields), status=422)
    assert message in json.dumps(answer)


def test_webuiapi_controlnet_unit_against_a_server_process(tmp_path, controlnet_dir):
    webuiapi = pytest.importorskip("webuiapi")
    pytest.importorskip("uvicorn")
    model = save_tiny_model(tmp_path / "tiny-sd")
    with serve_process("--model", str(model), "--controlnet-dir", str(controlnet_dir)) as (url, _):
        host, port = url.removeprefix("http://").split(":")
        api = webuiapi.WebUIApi(host=host, port=int(port), sampler="Euler", steps=2)
        models = api.controlnet_model_list()
        assert models[0].startswith("control_tiny_canny") and "canny" in api.controlnet_module_list()
        controlnet = webuiapi.ControlNetUnit(image=square(), module="canny", model=models[0], weight=0.8,
                                             threshold_a=100, threshold_b=200, pixel_perfect=True)
        # a fresh alwayson_scripts each call: webuiapi writes the units into its default dict, which every
        # later call in this process would then send
        result = api.txt2img(prompt="a box", seed=3, width=16, height=16, controlnet_units=[controlnet],
                             alwayson_scripts={})
        plain = api.txt2img(prompt="a box", seed=3, width=16, height=16, alwayson_scripts={})
    assert result.image.size == (16, 16)
    assert "ControlNet 0: " in result.info["infotexts"][0] and "Weight: 0.8" in result.info["infotexts"][0]
    assert "ControlNet" not in plain.info["infotexts"][0]
    assert np.abs(np.asarray(result.image, int) - np.asarray(plain.image, int)).max() > 5
