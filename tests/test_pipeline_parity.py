"""End-to-end parity with diffusers' StableDiffusionPipeline (STYLE §8.2), on a tiny random SD v1.x folder.

diffusers loads the folder, swaps its scheduler with `from_config(pipe.scheduler.config)` (the documented
way); we load the same folder with `TextToImage.from_pretrained` and pick our sampler by name. The same
seed must give the same images, within 1/255 per pixel, for every case and sampler below. Prompts here hold
no emphasis brackets (diffusers reads those as plain text) and fit in 77 tokens (diffusers cuts the rest).
"""

import numpy as np
import pytest
import torch

from nanodiffusion.pipelines.text_to_image import TextToImage
from fixtures import save_tiny_diffusers

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

SCHEDULERS = {"pndm": "PNDMScheduler", "ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler",
              "euler_ancestral": "EulerAncestralDiscreteScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler",
              "lms": "LMSDiscreteScheduler", "heun": "HeunDiscreteScheduler",
              "unipc": "UniPCMultistepScheduler"}
CASES = {
    "prompt": dict(prompt="a photo of a cat"),
    "negative": dict(prompt="a photo of a cat", negative_prompt="blurry, low quality"),
    "batch": dict(prompt=["a photo of a cat", "an astronaut riding a horse"], num_images_per_prompt=2,
                  negative_prompt=["blurry", "cartoon"]),
    "guidance-1": dict(prompt="a photo of a cat", guidance_scale=1.0),
    "non-square": dict(prompt="a red car", height=32, width=48),
}
STEPS = 8
TOLERANCE = 1 / 255
RESULTS: dict[str, float] = {}          # sampler/case -> max-abs difference, printed at the end


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_diffusers(tmp_path_factory.mktemp("parity") / "tiny-sd")


@pytest.fixture(scope="module")
def reference(folder):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None,
                                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def ours(folder):
    pipe = TextToImage.from_pretrained(folder)
    pipe.show_progress = False
    return pipe


def run_both(reference, ours, sampler: str, case: dict, seed: int = 0):
    settings = {"guidance_scale": 7.5, "height": 32, "width": 32, **case}
    prompt = settings.pop("prompt")
    original = reference.scheduler
    reference.scheduler = getattr(diffusers, SCHEDULERS[sampler]).from_config(original.config)
    try:
        expected = reference(prompt, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(seed),
                             output_type="np", **settings).images
    finally:
        reference.scheduler = original
    got = ours(prompt, num_inference_steps=STEPS, sampler=sampler, seed=seed, output_type="np",
               **settings).images
    return expected, got


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("sampler", SCHEDULERS)
def test_images_match_diffusers(reference, ours, sampler, case):
    expected, got = run_both(reference, ours, sampler, CASES[case])
    assert got.shape == expected.shape
    difference = float(np.abs(got - expected).max())
    RESULTS[f"{sampler}/{case}"] = difference
    assert difference <= TOLERANCE
    assert 0.05 < expected.std() and (expected > 0.01).mean() > 0.5       # a real picture, not black or flat


def test_the_picture_depends_on_prompt_negative_and_sampler(reference, ours):
    """Guards the parity test against a degenerate tiny model that ignores what the cases vary."""
    base = run_both(reference, ours, "euler", CASES["prompt"])[1]
    for other in (CASES["negative"], dict(prompt="a red car")):
        assert np.abs(run_both(reference, ours, "euler", other)[1] - base).max() > 0.05
    assert np.abs(run_both(reference, ours, "dpmpp_2m", CASES["prompt"])[1] - base).max() > 0.01


@pytest.mark.parametrize("sampler", ["euler", "ddim", "dpmpp_2m"])
def test_img2img_matches_diffusers(folder, ours, sampler):
    reference = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(folder, safety_checker=None,
                                                                         requires_safety_checker=False)
    reference.set_progress_bar_config(disable=True)
    reference.scheduler = getattr(diffusers, SCHEDULERS[sampler]).from_config(reference.scheduler.config)
    image = torch.linspace(-1, 1, 3 * 32 * 32).reshape(1, 3, 32, 32).sin()
    expected = reference("a photo of a cat", image=(image + 1) / 2, strength=0.6, num_inference_steps=10,
                         generator=torch.Generator().manual_seed(5), output_type="np").images
    got = ours("a photo of a cat", image=image, strength=0.6, num_steps=10, sampler=sampler, seed=5,
               output_type="np").images
    RESULTS[f"img2img {sampler}"] = float(np.abs(got - expected).max())
    assert np.abs(got - expected).max() <= TOLERANCE


def test_report_differences():
    """Prints the max-abs differences (run with -s to see them)."""
    for key, value in sorted(RESULTS.items()):
        print(f"{key:32s} {value:.2e}")
