"""A1111's img2img inputs (server/a1111_images.py): base64 PNG/JPEG/WebP with or without a data URL,
`resize_mode` 0/1/2, the mask (invert, alpha, fill, only-masked box), the paste-back that keeps unmasked
pixels; and through the app, the pipeline's own img2img image for the prepared init image, image k of a
batch from init image k."""

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from nanodiffusion.cli import main
from nanodiffusion.errors import UserError
from nanodiffusion.server.a1111_images import crop_region, decode_image, prepare, read_mask, resize
from server_fakes import MODEL, b64_image, png

GREEN, GREY, RED = (0, 200, 0), (128, 128, 128), (220, 0, 0)
BIG = 10_000


def banded(width: int = 40, height: int = 20) -> Image.Image:
    """Grey with a green band at the left (x < 10)."""
    image = Image.new("RGB", (width, height), GREY)
    image.paste(GREEN, (0, 0, 10, height))
    return image


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.mark.parametrize("format, prefix", [("PNG", ""), ("PNG", "data:image/png;base64,"),
                                            ("JPEG", ""), ("WEBP", "data:image/webp;base64,")])
def test_init_images_decode_with_or_without_a_data_url(format, prefix):
    image = decode_image(prefix + b64_image(banded(), format), "init_images.0", BIG)
    assert image.size == (40, 20)
    assert np.abs(pixels(image) - pixels(banded())).max() <= (0 if format == "PNG" else 40)


@pytest.mark.parametrize("data, message", [
    ("not base64!", "init_images.0: not valid base64"),
    (base64.b64encode(b"GIF89a...").decode(), "init_images.0: not a readable PNG/JPEG/WEBP image"),
    (b64_image(banded()), "init_images.0: the image is 40x20, more than the 100 pixels allowed"),
])
def test_unreadable_or_oversized_images_are_user_errors(data, message):
    with pytest.raises(UserError, match=message):
        decode_image(data, "init_images.0", 100)


def near(part: np.ndarray, colour) -> bool:
    return np.abs(part - colour).max() <= 10                    # Lanczos rings a little at an edge


def test_resize_modes_stretch_crop_or_fill():
    stretched = pixels(resize(banded(), 0, 20, 20))             # the band keeps its quarter of the width
    assert near(stretched[:, :3], GREEN) and near(stretched[:, 7:], GREY)
    assert near(pixels(resize(banded(), 1, 20, 20)), GREY)      # the centre 20 of 40 columns: no band
    red_top = Image.new("RGB", (40, 20), GREY)
    red_top.paste(RED, (0, 0, 40, 5))
    assert near(pixels(resize(red_top, 0, 20, 20))[5:], GREY)   # rows stay: 5 red rows
    filled = pixels(resize(red_top, 2, 20, 20))                 # fitted 20x10 at rows 5..15 under its top
    assert near(filled[:6], RED) and near(filled[10:], GREY)    # row stretched over the 5-row band
    assert resize(banded(), 0, 40, 20).size == (40, 20)


def test_the_mask_is_read_from_alpha_or_brightness_rounded_and_inverted():
    grey = Image.new("L", (8, 8), 100)
    grey.paste(200, (0, 0, 4, 8))
    assert np.unique(np.asarray(read_mask(grey, False, 0))).tolist() == [0, 255]
    assert np.asarray(read_mask(grey, False, 0))[0, 0] == 255
    assert np.asarray(read_mask(grey, True, 0))[0, 0] == 0
    transparent = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    transparent.paste((0, 0, 0, 255), (4, 0, 8, 8))              # opaque where to paint, black in colour
    assert np.asarray(read_mask(transparent, False, 0))[0, 6] == 255
    assert np.asarray(read_mask(transparent, False, 0))[0, 0] == 0


def test_only_masked_paints_a_box_of_the_target_aspect_and_keeps_the_rest():
    mask = Image.new("L", (40, 20), 0)
    mask.paste(255, (20, 8, 24, 12))
    assert crop_region(mask, 2, 16, 16) == (18, 6, 26, 14)     # 4x4 padded to 8x8
    assert crop_region(mask, 2, 32, 16) == (14, 6, 30, 14)     # grown to 2:1 around its centre
    assert crop_region(Image.new("L", (40, 20), 0), 2, 32, 16) is None
    edit = prepare(banded(), mask, 32, 16, resize_mode=0, fill=1, full_res=True, padding=2)
    assert edit.init.size == (32, 16) and edit.box == (14, 6, 30, 14)
    out = pixels(edit.finish(Image.new("RGB", (32, 16), (255, 0, 0))))
    assert out.shape == (20, 40, 3) and (out[:, :14] == pixels(banded())[:, :14]).all()
    assert (out[9:11, 21:23] == (255, 0, 0)).all()


def test_fill_paints_the_masked_area_from_its_surroundings():
    mask = Image.new("L", (40, 20), 0)
    mask.paste(255, (0, 0, 10, 20))                             # over the green band, beside grey
    whole = prepare(banded(), mask, 40, 20, resize_mode=0, fill=0, full_res=False, padding=0)
    kept = prepare(banded(), mask, 40, 20, resize_mode=0, fill=1, full_res=False, padding=0)
    assert (pixels(kept.init)[:, :10] == GREEN).all()           # original: the image as it is
    assert near(pixels(whole.init)[:, :10], GREY)               # fill: the grey around it
    assert (pixels(whole.init) == pixels(kept.init))[:, 10:].all()


@pytest.fixture(scope="module")
def served():
    testclient = pytest.importorskip("fastapi.testclient")
    from nanodiffusion.server.app import create_app
    from fixtures import tiny_ours
    pipe = tiny_ours()
    pipe.show_progress = False
    with testclient.TestClient(create_app(pipe, MODEL)) as client:
        yield pipe, client


SETTINGS = {"prompt": "a boat", "steps": 3, "cfg_scale": 5.0, "sampler_name": "Euler", "seed": 4,
            "denoising_strength": 0.6, "width": 16, "height": 16}


def img2img(client, **body) -> list[np.ndarray]:
    answer = client.post("/sdapi/v1/img2img", json={**SETTINGS, **body})
    assert answer.status_code == 200, answer.text
    assert json.loads(answer.json()["info"])["denoising_strength"] == 0.6
    return [pixels(png(image)) for image in answer.json()["images"]]


@pytest.mark.parametrize("resize_mode", [0, 1, 2])
def test_the_api_runs_the_pipelines_img2img_on_the_resized_init_image(served, resize_mode):
    pipe, client = served
    [image] = img2img(client, init_images=[b64_image(banded(), "JPEG")], resize_mode=resize_mode)
    init = resize(decode_image(b64_image(banded(), "JPEG"), "", BIG), resize_mode, 16, 16)
    direct = pipe("a boat", image=init, strength=0.6, num_steps=3, guidance_scale=5.0, sampler="euler",
                  seed=4).images[0]
    assert np.array_equal(image, pixels(direct))


def test_image_k_of_a_batch_starts_from_init_image_k(served):
    _, client = served
    other = Image.new("RGB", (16, 16), (250, 30, 30))
    pair = img2img(client, init_images=[b64_image(banded(16, 16)), b64_image(other)], batch_size=2)
    [alone] = img2img(client, init_images=[b64_image(other)], seed=5)
    assert np.array_equal(pair[1], alone) and not np.array_equal(pair[0], pair[1])


def test_img2img_pngs_state_their_strength_and_are_not_replayed_as_text_to_image(served, tmp_path, capsys):
    _, client = served
    answer = client.post("/sdapi/v1/img2img", json={**SETTINGS, "init_images": [b64_image(banded(16, 16))]})
    path = tmp_path / "edited.png"
    path.write_bytes(base64.b64decode(answer.json()["images"][0]))
    infotext = json.loads(answer.json()["info"])["infotexts"][0]
    assert ", Model: tiny-sd, Denoising strength: 0.6, Version:" in infotext
    with pytest.raises(SystemExit):
        main(["generate", "--from", str(path), "--out", str(tmp_path / "again.png")])
    assert "made by img2img from an init image that the PNG does not hold" in capsys.readouterr().err
    assert not (tmp_path / "again.png").exists()
