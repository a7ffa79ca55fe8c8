"""The web page end to end in headless Chromium (Debian's /usr/bin/chromium, driven by Playwright; it never
downloads a browser of its own): type a prompt, click Generate, see the images appear at their aspect ratio
with their parameters and download links, previews while sampling, and an img2img round with a painted mask.
Skips when Chromium or Playwright is missing (`.ci/install-browser` installs Chromium).
"""

import base64
import io
import threading
import time
from pathlib import Path

from PIL import Image

import pytest

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip(f"no {CHROMIUM} (Debian's chromium package)", allow_module_level=True)
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
sync_api = pytest.importorskip("playwright.sync_api")

from nanodiffusion.pipelines.metadata import ModelRecord  # noqa: E402
from nanodiffusion.server.app import create_app  # noqa: E402
from fixtures import tiny_ours  # noqa: E402

STEP_SECONDS = 0.15                 # slows the tiny model's steps so that the page sees previews


class SlowPipe:
    """The tiny pipeline with each sampler step slowed down (what a real model's steps take is longer)."""

    def __init__(self, pipe):
        self.pipe = pipe

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def generate(self, request, callback=None, **inputs):
        def slow(i, x, denoised):
            time.sleep(STEP_SECONDS)
            callback(i, x, denoised)
        return self.pipe.generate(request, callback=slow, **inputs)

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
TIMEOUT_MS = 30_000
# the served model's generation_defaults.json, which the page shows when it loads
MODEL_DEFAULTS = {"num_steps": 3, "guidance_scale": 2.5, "sampler": "euler_ancestral",
                  "sigma_schedule": "sgm_uniform"}


@pytest.fixture(scope="module")
def base_url():
    """A uvicorn server in a thread of this process, on a free port of 127.0.0.1, serving a tiny model."""
    pipe = tiny_ours()
    pipe.show_progress = False
    pipe.generation_defaults = MODEL_DEFAULTS
    model = ModelRecord("tiny-sd", Path("tiny-sd"), "0123456789", "fp32", "cpu")
    server = uvicorn.Server(uvicorn.Config(create_app(SlowPipe(pipe), model), host="127.0.0.1", port=0,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def page():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS,
                                             headless=True)
        page = browser.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        yield page
        browser.close()


def test_type_a_prompt_click_generate_and_see_the_images(base_url, page):
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(base_url)
    page.wait_for_selector("#sampler option", state="attached")     # filled from /sdapi/v1/samplers
    assert page.input_value("#width") == "16"                      # the model's native size
    page.fill("#prompt", "a watercolour fox, 狐")
    page.select_option("#num-images", "2")
    page.fill("#steps", "2")
    page.select_option("#sampler", "DPM++ 2M")
    page.uncheck("#seed-random")
    page.fill("#seed", "7")
    page.click("#generate")
    page.wait_for_function("document.querySelectorAll('#gallery img').length === 2 && "
                           "[...document.querySelectorAll('#gallery img')].every(i => i.complete && "
                           "i.naturalWidth === 16)")
    links = page.locator("#gallery a[download]")
    assert links.first.get_attribute("download") == "00000-7.png"         # as docs/server.md says
    page.wait_for_selector("#generate:not([disabled])")
    assert page.text_content("#status").startswith("done in")
    captions = page.locator("#gallery figcaption pre").all_text_contents()
    assert [caption.split("\n")[0] for caption in captions] == ["a watercolour fox, 狐"] * 2
    assert "Steps: 2, Sampler: DPM++ 2M" in captions[0] and "Seed: 7," in captions[0]
    assert "Seed: 8," in captions[1]
    assert links.count() == 2 and links.first.get_attribute("href").endswith("/images/0.png")
    assert page.is_hidden("#error") and not errors


def test_the_page_shows_the_models_defaults(base_url, page):
    page.goto(base_url)
    page.wait_for_selector("#sampler option", state="attached")
    shown = [page.input_value(f"#{name}") for name in ("steps", "guidance", "sampler", "scheduler")]
    assert shown == ["3", "2.5", "Euler a", "SGM Uniform"]


def test_a_bad_setting_shows_the_servers_message(base_url, page):
    page.goto(base_url)
    page.wait_for_selector("#sampler option", state="attached")
    page.fill("#prompt", "a cat")
    page.fill("#width", "20")                                      # not a multiple of 8: the form refuses
    page.click("#generate")
    assert not page.evaluate("document.getElementById('form').checkValidity()")
    page.fill("#width", "16")
    page.fill("#guidance", "31")
    page.evaluate("document.getElementById('guidance').removeAttribute('max')")   # let the server refuse
    page.click("#generate")
    page.wait_for_selector("#error:not([hidden])")
    assert "cfg_scale" in page.text_content("#error")


def rendered_and_natural(page, selector: str) -> list[tuple[float, float, int, int]]:
    script = ("images => images.map(i => { const r = i.getBoundingClientRect();"
              " return [r.width, r.height, i.naturalWidth, i.naturalHeight]; })")
    return page.eval_on_selector_all(selector, script)


def test_images_keep_their_aspect_and_previews_show_while_sampling(base_url, page):
    page.goto(base_url)
    page.wait_for_selector("#sampler option", state="attached")
    page.fill("#prompt", "a wide landscape")
    page.fill("#steps", "12")
    page.fill("#width", "32")
    page.fill("#height", "16")
    page.click("#generate")
    page.wait_for_selector("#preview:not([hidden]) #preview-image")         # a decoded denoised estimate
    assert page.text_content("#preview-caption").startswith("preview at step ")
    page.wait_for_function("[...document.querySelectorAll('#gallery img')].some(i => i.complete && "
                           "i.naturalWidth === 32)")
    page.wait_for_selector("#generate:not([disabled])")
    assert page.is_hidden("#preview")
    width, height, natural_width, natural_height = rendered_and_natural(page, "#gallery img")[0]
    assert (natural_width, natural_height) == (32, 16)
    assert abs(width / height - 2) < 0.02 and width >= 4 * natural_width     # its aspect, enlarged
    assert page.eval_on_selector("#gallery img", "i => getComputedStyle(i).imageRendering") == "pixelated"
    assert page.evaluate("fetch('/favicon.ico').then(r => r.status)") == 200


def test_img2img_with_a_painted_mask(base_url, page, tmp_path):
    init = tmp_path / "init.png"
    Image.new("RGB", (45, 30), (20, 120, 200)).save(init)
    page.goto(base_url)
    page.wait_for_selector("#sampler option", state="attached")
    page.fill("#prompt", "a red balloon")
    page.fill("#steps", "4")
    page.click("#edit summary")
    page.set_input_files("#init-file", str(init))
    page.wait_for_selector("#canvas-box:not([hidden])")
    assert (page.input_value("#width"), page.input_value("#height")) == ("40", "24")   # multiples of 8
    page.fill("#brush", "64")                                             # display pixels
    box = page.locator("#mask-canvas").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.5)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.6, box["y"] + box["height"] * 0.5, steps=5)
    page.mouse.up()
    with page.expect_request("**/api/jobs/img2img") as sent:
        page.click("#generate")
    body = sent.value.post_data_json
    assert body["init_images"][0].startswith("data:image/png;base64,")
    defaults = page.evaluate("fetch('/api/info').then(r => r.json())")["defaults"]
    assert body["denoising_strength"] == defaults["denoising_strength"]         # the page shows the defaults
    mask = Image.open(io.BytesIO(base64.b64decode(body["mask"].partition(",")[2]))).getchannel("A")
    assert mask.size == (40, 24) and mask.getpixel((18, 12)) == 255 and mask.getpixel((2, 2)) == 0
    page.wait_for_function("[...document.querySelectorAll('#gallery img')].some(i => i.complete && "
                           "i.naturalWidth === 40 && i.naturalHeight === 24)")
    page.wait_for_selector("#generate:not([disabled])")
    assert page.text_content("#status").startswith("done in") and page.is_hidden("#error")


def test_the_api_docs_page_works_offline(base_url, page):
    outside = []
    page.on("request", lambda request: outside.append(request.url)
            if not request.url.startswith(base_url) else None)
    page.goto(f"{base_url}/docs")
    page.wait_for_selector("h2:has-text('/sdapi/v1/img2img')")
    fields = page.locator("h2:has-text('/sdapi/v1/img2img') + p + table td:text-is('denoising_strength')")
    assert fields.count() == 1
    assert outside == []                                                  # nothing from a CDN


def test_the_seed_label_is_not_clipped_in_a_narrow_window(base_url, page):
    page.set_viewport_size({"width": 360, "height": 800})
    try:
        page.goto(base_url)
        page.wait_for_selector("#sampler option", state="attached")
        cell = page.locator(".grid > label:has(#seed)").bounding_box()
        label = page.locator("label.inline:has(#seed-random)").bounding_box()
        assert label["x"] >= cell["x"] and label["x"] + label["width"] <= cell["x"] + cell["width"] + 0.5
        assert page.eval_on_selector(".seed", "e => e.scrollWidth <= e.clientWidth")
    finally:
        page.set_viewport_size({"width": 1280, "height": 720})
