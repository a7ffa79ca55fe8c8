"""`nanodiffusion serve --models-dir` driven by `webuiapi`, a real A1111 client nobody here wrote: txt2img,
img2img with and without a mask, png_info, skip and interrupt (the images come back), switching between the
two tiny models of the folder, every listed sampler, and the listing calls clients make at start-up.
"""

import shutil
import threading

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
webuiapi = pytest.importorskip("webuiapi")

from nanodiffusion.pipelines.text_to_image import TextToImage  # noqa: E402
from server_fakes import WAIT, save_tiny_model, serve_process, wait_until  # noqa: E402

SIZE = {"width": 16, "height": 16}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    save_tiny_model(folder / "tiny-a", seed=0)
    save_tiny_model(folder / "more" / "tiny-b", seed=1)
    return folder


@pytest.fixture(scope="module")
def api(models):
    with serve_process("--models-dir", str(models), "--model", str(models / "tiny-a")) as (url, process):
        host, port = url.removeprefix("http://").split(":")
        yield webuiapi.WebUIApi(host=host, port=int(port), sampler="Euler a", steps=2)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_txt2img_and_png_info(api):
    result = api.txt2img(prompt="a red fox, (snow:1.2)", negative_prompt="blurry", seed=5, batch_size=2,
                         cfg_scale=6, **SIZE)
    assert len(result.images) == 2 and result.image.size == (16, 16)
    assert result.info["all_seeds"] == [5, 6] and result.info["sampler_name"] == "Euler a"
    # webuiapi sends eta and the s_* options always: Euler a takes eta (and s_noise), not the churn
    assert {"s_churn", "enable_hr"} <= set(result.info["ignored_fields"])
    assert "eta" not in result.info["ignored_fields"]
    info = api.png_info(result.images[1])
    assert info.info == result.info["infotexts"][1]
    parsed = info.json["parameters"]
    assert (parsed["Prompt"], parsed["Negative prompt"]) == ("a red fox, (snow:1.2)", "blurry")
    assert parsed["Seed"] == "6"
    assert (parsed["Steps"], parsed["CFG scale"], parsed["Size-1"]) == ("2", "6", "16")


def test_sampler_options_reach_the_sampler(api, models):
    churned = api.txt2img(prompt="a cat", sampler_name="Euler", s_churn=2, seed=3, **SIZE)
    assert "Sigma churn: 2.0" in churned.info["infotexts"][0]
    assert "s_churn" not in churned.info["ignored_fields"]
    assert "eta" in churned.info["ignored_fields"]                  # Euler draws no ancestral noise
    plain = api.txt2img(prompt="a cat", sampler_name="Euler", seed=3, **SIZE)
    pipe = TextToImage.from_pretrained(models / "tiny-a")
    pipe.show_progress = False
    direct = pipe("a cat", seed=3, num_steps=2, guidance_scale=7.0, sampler="euler",
                  sampler_options={"s_churn": 2.0}, **SIZE).images[0]
    assert np.array_equal(pixels(churned.image), pixels(direct))
    assert not np.array_equal(pixels(churned.image), pixels(plain.image))
    quiet = api.txt2img(prompt="a cat", sampler_name="Euler a", eta=0.0, seed=3, **SIZE)
    assert "Eta: 0.0" in quiet.info["infotexts"][0]


def test_img2img_with_and_without_a_mask(api):
    init = Image.new("RGB", (40, 24), (30, 140, 220))
    plain = api.img2img(images=[init], prompt="a boat", denoising_strength=0.6, seed=1, steps=4, **SIZE)
    assert plain.image.size == (16, 16) and plain.info["denoising_strength"] == 0.6
    mask = Image.new("L", (40, 24), 0)
    mask.paste(255, (14, 6, 26, 18))
    painted = api.img2img(images=[init], mask_image=mask, mask_blur=1, prompt="a boat", seed=1, steps=4,
                          **SIZE)
    result = pixels(painted.image)
    assert painted.image.size == (40, 24)            # only-masked (webuiapi's default) keeps the init size
    assert (result[:, :6] == pixels(init)[:, :6]).all()          # far from the mask: the original exactly
    assert not (result[10:14, 18:22] == pixels(init)[10:14, 18:22]).all()   # inside: repainted
    whole = api.img2img(images=[init], mask_image=mask, mask_blur=1, inpaint_full_res=False,
                        inpainting_fill=1, prompt="a boat", seed=1, steps=4, width=40, height=24)
    assert whole.image.size == (40, 24) and (pixels(whole.image)[:, :6] == pixels(init)[:, :6]).all()


def test_skip_and_interrupt_return_the_images_so_far(api):
    results = []
    call = threading.Thread(target=lambda: results.append(api.txt2img(
        prompt="a slow one", steps=150, batch_size=8, seed=11, width=64, height=64)))
    call.start()
    wait_until(lambda: api.get_progress()["state"]["sampling_step"] >= 2, WAIT * 3)
    api.skip()                                       # image 0 ends as far as it got, image 1 starts
    wait_until(lambda: api.get_progress()["state"]["job_no"] == 1 and
               api.get_progress()["state"]["sampling_step"] >= 2, WAIT * 3)
    api.interrupt()
    call.join(WAIT * 3)
    [result] = results
    assert len(result.images) == 2 and result.image.size == (64, 64)
    assert result.info["interrupted"] and result.info["partial_images"] == [0, 1]
    assert result.info["all_seeds"] == [11, 12]


def test_switching_between_the_folders_models(api, models):
    titles = api.util_get_model_names()
    assert [title.split(" [")[0] for title in titles] == ["builtin", "more/tiny-b", "tiny-a"]
    assert all(str(models) not in model["filename"] for model in api.get_sd_models())  # no absolute paths
    before = api.txt2img(prompt="a cat", seed=3, **SIZE)
    assert api.get_options()["sd_model_checkpoint"].startswith("tiny-a [")
    api.util_set_model("more/tiny-b")
    assert api.get_options()["sd_model_checkpoint"].startswith("more/tiny-b [")
    after = api.txt2img(prompt="a cat", seed=3, **SIZE)
    assert after.info["sd_model_name"] == "tiny-b" and not np.array_equal(pixels(before.image),
                                                                          pixels(after.image))
    assert "no model" in str(api.set_options({"sd_model_checkpoint": "../../etc/passwd"})["detail"])
    shutil.copytree(models / "tiny-a", models / "tiny-c")
    assert len(api.get_sd_models()) == 3
    api.refresh_checkpoints()
    assert len(api.get_sd_models()) == 4
    api.util_set_model("tiny-a")
    assert np.array_equal(pixels(api.txt2img(prompt="a cat", seed=3, **SIZE).image), pixels(before.image))


def test_every_listed_sampler_generates(api):
    names = api.util_get_sampler_names()
    assert {"Euler a", "DPM++ 2M", "DDIM"} <= set(names)
    for name in names:
        result = api.txt2img(prompt="a cat", sampler_name=name, seed=1, **SIZE)
        assert result.image.size == (16, 16) and result.info["sampler_name"] == name
    for scheduler in api.util_get_scheduler_names():         # A1111's names, sent back as it sends them
        result = api.txt2img(prompt="a cat", sampler_name="Euler", scheduler=scheduler, seed=1, **SIZE)
        assert result.info["scheduler"].lower().replace(" ", "_") == scheduler


def test_the_listing_calls_answer(api, models):
    for call in ("get_sd_vae", "get_loras", "get_upscalers", "get_prompt_styles", "get_face_restorers",
                 "get_hypernetworks", "get_latent_upscale_modes", "get_realesrgan_models"):
        assert getattr(api, call)() == [], call
    assert api.get_embeddings() == {"loaded": {}, "skipped": {}}
    assert api.get_scripts() == {"txt2img": [], "img2img": []}
    assert {"automatic", "karras", "exponential"} <= set(api.util_get_scheduler_names())
    assert api.get_memory()["ram"]["total"] > 0
    flags = api.get_cmd_flags()
    assert flags["models_dir"] == [models.name] and flags["api_key"] is False     # names, not paths
    api.util_wait_for_ready(check_interval=0.1)
