"""The web page end to end in headless Chromium (Debian's /usr/bin/chromium, driven by Playwright; it never
downloads a browser of its own): type a prompt, click Generate, see the images appear with their parameters
and download links. Skips when Chromium or Playwright is missing (`.ci/install-browser` installs Chromium).
"""

import threading
import time
from pathlib import Path

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

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
TIMEOUT_MS = 30_000


@pytest.fixture(scope="module")
def base_url():
    """A uvicorn server in a thread of this process, on a free port of 127.0.0.1, serving a tiny model."""
    pipe = tiny_ours()
    pipe.show_progress = False
    model = ModelRecord("tiny-sd", Path("tiny-sd"), "0123456789", "fp32", "cpu")
    server = uvicorn.Server(uvicorn.Config(create_app(pipe, model), host="127.0.0.1", port=0,
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
    page.wait_for_selector("#generate:not([disabled])")
    assert page.text_content("#status").startswith("done in")
    captions = page.locator("#gallery figcaption pre").all_text_contents()
    assert [caption.split("\n")[0] for caption in captions] == ["a watercolour fox, 狐"] * 2
    assert "Steps: 2, Sampler: DPM++ 2M" in captions[0] and "Seed: 7," in captions[0]
    assert "Seed: 8," in captions[1]
    links = page.locator("#gallery a[download]")
    assert links.count() == 2 and links.first.get_attribute("href").endswith("/images/0.png")
    assert page.is_hidden("#error") and not errors


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
