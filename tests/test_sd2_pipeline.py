"""SD 2.x and SD-Turbo text-to-image end to end: tiny random folders against diffusers'
StableDiffusionPipeline (fp32, same seed and scheduler settings, within 1e-4 per pixel), v prediction through
every sampler and through img2img / inpainting, SD-Turbo's defaults (one step, no guidance batch) and
diffusers' guidance <= 1 rule."""

import numpy as np
import pytest
import torch
from PIL import Image

from nanodiffusion.diffusion.denoisers import Denoiser
from nanodiffusion.diffusion.samplers import SAMPLERS
from nanodiffusion.diffusion.schedules import ScheduleConfig, get_alphas_cumprod
from nanodiffusion.nets.clip_text import TINY_SD2_TEXT, TINY_TEXT
from nanodiffusion.pipelines.text_to_image import TextToImage
from nanodiffusion.weights import load_sd, save_single_file
from nanodiffusion.weights.families import FAMILY_DEFAULTS, detect_family
from fixtures import SCHEDULERS, SD15_SCHEDULER_JSON, save_tiny_sd2

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

# our sampler name -> the diffusers scheduler class it retraces
SCHEDULER_CLASSES = {name: alias for name, sampler in SAMPLERS.items() for alias in sampler.aliases
                     if alias.endswith("Scheduler")}
V_SAMPLERS = ["plms", "ddim", "euler", "euler_ancestral", "heun", "lms", "dpmpp_2m", "unipc", "dpm_2"]
TOLERANCE = 1e-4
PROMPT = dict(prompt=["a photo of a cat", "a red car"], negative_prompt=["blurry", "dark"], height=32,
              width=32)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd2")
    return {kind: save_tiny_sd2(root / kind, kind) for kind in SCHEDULERS}


@pytest.fixture(scope="module")
def pipes(folders):
    """(diffusers, ours) per kind, loaded from the same folder."""
    pairs = {}
    for kind, folder in folders.items():
        reference = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None,
                                                                      requires_safety_checker=False)
        reference.set_progress_bar_config(disable=True)
        ours = TextToImage.from_pretrained(folder)
        ours.show_progress = False
        pairs[kind] = reference, ours
    return pairs


def run_reference(reference, sampler: str | None, seed: int = 0, **settings) -> np.ndarray:
    """diffusers' images with its scheduler swapped for `sampler`'s class (None: the folder's own)."""
    original = reference.scheduler
    if sampler is not None:
        reference.scheduler = getattr(diffusers, SCHEDULER_CLASSES[sampler]).from_config(original.config)
    try:
        return reference(generator=torch.Generator().manual_seed(seed), output_type="np", **settings).images
    finally:
        reference.scheduler = original


@pytest.mark.parametrize("kind, sampler", [("v", name) for name in V_SAMPLERS]
                         + [("epsilon", "plms"), ("epsilon", "euler_ancestral")])
def test_sd2_images_match_diffusers(pipes, kind, sampler):
    reference, ours = pipes[kind]
    expected = run_reference(reference, sampler, num_inference_steps=6, **PROMPT)
    got = ours(num_steps=6, sampler=sampler, seed=0, output_type="np", **PROMPT).images
    assert np.abs(got - expected).max() <= TOLERANCE
    assert expected.std() > 0.05                                    # a picture, not a flat field


@pytest.mark.parametrize("sampler", ["euler", "ddim", "dpmpp_2m"])
def test_v_prediction_img2img_matches_diffusers(folders, pipes, sampler):
    reference = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(
        folders["v"], safety_checker=None, requires_safety_checker=False)
    reference.set_progress_bar_config(disable=True)
    image = torch.linspace(-1, 1, 3 * 32 * 32).reshape(1, 3, 32, 32).sin()
    expected = run_reference(reference, sampler, seed=5, prompt="a photo of a cat", image=(image + 1) / 2,
                             strength=0.6, num_inference_steps=10)
    got = pipes["v"][1]("a photo of a cat", image=image, strength=0.6, num_steps=10, sampler=sampler, seed=5,
                        output_type="np").images
    assert np.abs(got - expected).max() <= TOLERANCE


def test_v_prediction_inpainting_keeps_the_outside_and_equals_img2img_under_a_white_mask(pipes):
    ours = pipes["v"][1]
    image = Image.fromarray((np.indices((32, 32, 3)).sum(0) * 4 % 256).astype(np.uint8))
    mask = Image.new("L", (32, 32))
    mask.paste(255, (8, 8, 24, 24))
    original = ours("a cat", image=image, strength=0.0, seed=2, num_steps=8, sampler="euler",
                    output_type="latent").images                    # the init image's latents
    inside = torch.zeros(16, 16, dtype=torch.bool)                 # the tiny VAE downsamples 2x
    inside[4:12, 4:12] = True
    for sampler in ("euler", "dpmpp_2m", "ddim"):
        out = ours("a cat", image=image, mask_image=mask, seed=2, num_steps=8, sampler=sampler,
                   output_type="latent").images
        assert torch.equal(out[..., ~inside], original[..., ~inside])
        assert (out[..., inside] - original[..., inside]).abs().max() > 0.05
    white = Image.new("L", (32, 32), 255)
    settings = dict(image=image, seed=2, num_steps=8, output_type="latent")
    assert torch.equal(ours("a cat", mask_image=white, **settings).images, ours("a cat", **settings).images)


def test_sd_turbo_defaults_one_step_without_a_guidance_batch(pipes):
    reference, ours = pipes["turbo"]
    assert ours.generation_defaults == FAMILY_DEFAULTS["one-step"]
    batches = []
    hook = ours.unet.register_forward_hook(lambda module, args, output: batches.append(args[0].shape[0]))
    try:
        out = ours("a photo of a cat", seed=0, height=32, width=32, output_type="np")
    finally:
        hook.remove()
    assert (out.request.num_steps, out.request.guidance_scale) == (1, 0.0)
    assert batches == [1]                                           # one UNet call, no unconditional half
    expected = run_reference(reference, None, prompt="a photo of a cat", num_inference_steps=1,
                             guidance_scale=0.0, height=32, width=32)
    assert np.abs(out.images - expected).max() <= TOLERANCE


@pytest.mark.parametrize("guidance", [0.0, 0.5, 1.0])
def test_guidance_at_most_1_is_the_conditional_prediction_as_in_diffusers(pipes, guidance):
    reference, ours = pipes["epsilon"]
    settings = dict(prompt="a photo of a cat", negative_prompt="blurry", height=32, width=32)
    expected = run_reference(reference, "euler", num_inference_steps=4, guidance_scale=guidance, **settings)
    got = ours(num_steps=4, sampler="euler", guidance_scale=guidance, seed=0, output_type="np",
               **settings).images
    assert np.abs(got - expected).max() <= TOLERANCE
    guided = ours(num_steps=4, sampler="euler", guidance_scale=3.0, seed=0, output_type="np", **settings)
    assert np.abs(guided.images - got).max() > 0.01                 # the negative prompt matters above 1


def test_a_v_single_file_generates_the_folders_images(folders, pipes, tmp_path):
    save_single_file(load_sd(folders["v"]), tmp_path / "v.safetensors")
    from_file = TextToImage.from_pretrained(tmp_path / "v.safetensors")
    from_file.show_progress = False
    settings = dict(num_steps=3, sampler="ddim", seed=1, output_type="np", **PROMPT)
    assert np.array_equal(from_file(**settings).images, pipes["v"][1](**settings).images)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_denoiser_is_exact_for_gaussian_data(prediction):
    """For x0 ~ N(0, s²) the optimal denoiser is x·s²/(s²+σ²); wrapping the exact ε- or v-net must give it."""
    s = 0.5
    alphas_cumprod = get_alphas_cumprod(ScheduleConfig("scaled_linear", 1000, beta_start=0.00085,
                                                       beta_end=0.012))

    def net(x_vp, t):
        a = alphas_cumprod[t.round().long()].reshape(-1, 1, 1, 1)
        x0 = x_vp * a.sqrt() * s**2 / (a * s**2 + 1 - a)             # E[x0 | x_vp]
        eps = (x_vp - a.sqrt() * x0) / (1 - a).sqrt()
        return eps if prediction == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0

    denoiser = Denoiser(net, alphas_cumprod, prediction)
    x = torch.randn(4, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3
    for t in (0, 250, 999):
        sigma = denoiser.sigmas[t]
        assert torch.allclose(denoiser(x, sigma), x * s**2 / (s**2 + sigma**2), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("text, scheduler, family", [
    (TINY_TEXT, SD15_SCHEDULER_JSON, "sd1"),
    (TINY_SD2_TEXT, SCHEDULERS["epsilon"], "sd2"),
    (TINY_SD2_TEXT, SCHEDULERS["v"], "sd2-v"),
    (TINY_SD2_TEXT, SCHEDULERS["turbo"], "one-step"),
    (TINY_SD2_TEXT, {**SCHEDULERS["v"], "timestep_spacing": "trailing", "rescale_betas_zero_snr": True},
     "sd2-v"),
    (TINY_TEXT, {**SD15_SCHEDULER_JSON, "_class_name": "LCMScheduler"}, "lcm"),
])
def test_model_family_from_text_encoder_and_scheduler(text, scheduler, family):
    assert detect_family(text, scheduler) == family
