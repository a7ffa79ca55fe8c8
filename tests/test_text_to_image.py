"""Text-to-image pipeline with tiny random networks: the tutorials' hand-written loop, seeds, batches,
guidance, img2img, inpainting, dtypes, NaN handling and input validation (diffusers parity is in
test_pipeline_parity.py)."""

import numpy as np
import pytest
import torch
from PIL import Image

import nanodiffusion
from nanodiffusion.diffusion.samplers import resolve_sampler
from nanodiffusion.diffusion.schedules import sigma_to_t
from nanodiffusion.errors import UserError
from nanodiffusion.images import to_pil
from nanodiffusion.pipelines.request import GenerationRequest
from nanodiffusion.pipelines.text_to_image import TextToImage
from nanodiffusion.weights import SDComponents, save_diffusers
from fixtures import tiny_ours

SIZE = dict(height=32, width=32)        # latents 16x16: the tiny VAE downsamples 2x


@pytest.fixture(scope="module")
def pipe() -> TextToImage:
    pipe = tiny_ours()
    pipe.show_progress = False
    return pipe


def run(pipe, prompt="a photo of a cat", **kwargs):
    kwargs = {"num_steps": 8, "seed": 0, "output_type": "np", **SIZE, **kwargs}
    return pipe(prompt, **kwargs).images


def test_hand_written_loop_matches_the_pipeline(pipe):
    """The tutorials' loop: tokenize, encode, uncond states, noise, CFG loop on the UNet, decode with
    1/scaling_factor, to PIL; here with Euler steps in sigma, x = x0 + sigma·eps."""
    prompt, negative, steps, scale = "a photo of a cat", "blurry", 10, 7.5
    with torch.no_grad():
        cond = pipe.text_encoder(pipe.tokenizer([prompt])).hidden_states                 # (1, 77, 32)
        uncond = pipe.text_encoder(pipe.tokenizer([negative])).hidden_states
        context = torch.cat([uncond, cond])                                               # (2, 77, 32)
        sigmas = pipe.sigmas("euler", steps)
        table = pipe.denoiser.sigmas                                                      # sigma of each t
        generator = torch.Generator().manual_seed(42)
        latents = torch.randn(1, 4, 16, 16, generator=generator) * sigmas[0]    # Euler: x_T = sigma_max·z
        for i in range(steps):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            x_in = torch.cat([latents] * 2) / (sigma**2 + 1).sqrt()             # the UNet's VP input
            eps_uncond, eps_cond = pipe.unet(x_in.float(), sigma_to_t(sigma, table), context).chunk(2)
            eps = eps_uncond + scale * (eps_cond - eps_uncond)
            latents = (latents + eps * (sigma_next - sigma)).float()
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor)
    ours = pipe(prompt, negative, num_inference_steps=steps, guidance_scale=scale, sampler="euler",
                generator=torch.Generator().manual_seed(42), **SIZE)
    expected = to_pil(image)[0]
    assert ours.images[0].size == expected.size == (32, 32)
    difference = np.abs(np.asarray(ours.images[0], dtype=int) - np.asarray(expected, dtype=int))
    assert difference.max() <= 1
    latent = pipe(prompt, negative, num_steps=steps, sampler="euler", output_type="latent",
                  generator=torch.Generator().manual_seed(42), **SIZE).images
    assert (latent - latents).abs().max() <= 2e-5 * latents.abs().max()        # float32 rounding


def test_top_level_names():
    assert nanodiffusion.image_grid(to_pil(torch.zeros(4, 3, 8, 8)), 2, 2).size == (16, 16)
    assert nanodiffusion.TextToImage is TextToImage and nanodiffusion.GenerationRequest is GenerationRequest
    assert nanodiffusion.resolve_sampler("Euler a") == "euler_ancestral"


def test_same_seed_same_image_and_seed_is_a_cpu_generator(pipe):
    first, second = run(pipe, seed=7), run(pipe, seed=7)
    assert np.array_equal(first, second)
    assert np.array_equal(first, run(pipe, seed=None, generator=torch.Generator().manual_seed(7)))
    assert not np.array_equal(first, run(pipe, seed=8))


def test_random_seed_is_recorded_and_replays(pipe):
    output = pipe("a cat", num_steps=4, output_type="np", **SIZE)
    assert isinstance(output.request.seed, int) and (output.request.height, output.request.width) == (32, 32)
    again = pipe("a cat", num_steps=4, seed=output.request.seed, output_type="np", **SIZE)
    assert np.array_equal(output.images, again.images)


def test_batch_draws_one_noise_tensor_prompt_major(pipe):
    """Two prompts x two images: one draw of (4, 4, h, w); image k of prompt p is row 2p + k."""
    prompts = ["a photo of a cat", "a red car"]
    batch = pipe(prompts, num_images_per_prompt=2, num_steps=6, seed=3, output_type="latent", **SIZE)
    noise = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    for row, prompt in enumerate(["a photo of a cat"] * 2 + ["a red car"] * 2):
        alone = pipe(prompt, num_steps=6, latents=noise[row:row + 1], seed=0, output_type="latent", **SIZE)
        # batched and single-image oneDNN kernels round differently: on a 2-core AVX2 CPU the latents (up to
        # ~29) differ by up to 1.5e-4, about 5e-6 of their scale, whatever the thread count; an elementwise
        # tolerance fails where that error lands on a small value. A wrong row differs by O(10).
        scale = batch.images.abs().max()
        assert (batch.images[row] - alone.images[0]).abs().max() <= 2e-5 * scale          # float32 rounding
    assert (batch.images[0] - batch.images[1]).abs().max() > 1e-2


def test_guidance_one_is_the_conditional_prediction(pipe):
    plain = run(pipe, guidance_scale=1.0)
    assert np.array_equal(plain, run(pipe, "a photo of a cat", guidance_scale=1.0, negative_prompt="blurry"))
    assert not np.array_equal(plain, run(pipe, guidance_scale=7.5))
    assert not np.array_equal(run(pipe, negative_prompt="blurry"), run(pipe))


@pytest.mark.parametrize("alias, name", [("pndm", "plms"), ("euler_a", "euler_ancestral"),
                                         ("Euler a", "euler_ancestral"), ("EulerDiscreteScheduler", "euler"),
                                         ("DPM++ 2M", "dpmpp_2m"), ("k_lms", "lms")])
def test_sampler_aliases(alias, name):
    assert resolve_sampler(alias) == name


def test_pndm_is_plms(pipe):
    assert np.array_equal(run(pipe, sampler="pndm"), run(pipe, sampler="plms"))


def test_output_types_and_native_size(pipe):
    images = pipe("a cat", num_steps=2, seed=0, num_images_per_prompt=2).images
    assert len(images) == 2 and all(isinstance(i, Image.Image) and i.size == (16, 16) for i in images)
    assert run(pipe, width=48).shape == (1, 32, 48, 3)
    assert pipe("a cat", num_steps=2, seed=0, output_type="latent", **SIZE).images.shape == (1, 4, 16, 16)


def test_callback_sees_every_step(pipe):
    calls = []
    run(pipe, num_steps=5, sampler="dpmpp_2m", callback=lambda i, x, denoised: calls.append((i, x.shape)))
    assert calls == [(i, (1, 4, 16, 16)) for i in range(5)]


def test_long_prompts_and_negatives_are_padded_to_the_same_chunks(pipe):
    cond, uncond = pipe.encode_prompt(["cat " * 100], ["blurry"])
    assert cond.shape == uncond.shape == (1, 154, 32)
    assert run(pipe, "cat " * 100, negative_prompt="blurry").shape == (1, 32, 32, 3)


@pytest.mark.parametrize("settings, message", [
    (dict(height=36), "height must be a positive multiple of 8"),
    (dict(width=0), "width must be a positive multiple of 8"),
    (dict(num_steps=0), "number of steps must be an integer >= 1"),
    (dict(guidance_scale=-1.0), "guidance_scale must be >= 0"),
    (dict(sampler="foo"), "unknown sampler 'foo'; valid: ddpm, ddim, plms"),
    (dict(prompt=[]), "non-empty list"),
    (dict(prompt=["a", "b"], negative_prompt=["c"]), "got 2 prompts but 1 negative prompts"),
    (dict(strength=1.5), "strength must be between 0 and 1"),
    (dict(sigma_schedule="cosine"), "unknown sigma schedule"),
    (dict(num_images_per_prompt=0), "num_images_per_prompt must be >= 1"),
    (dict(generator=torch.Generator()), "pass seed or generator, not both"),
    (dict(output_type="pt"), "unknown output_type 'pt'"),
    (dict(latents=torch.zeros(2, 4, 16, 16)), r"latents must have shape \(1, 4, 16, 16\)"),
    (dict(colour="red"), "unknown generation settings: colour"),
    (dict(mask_image=Image.new("L", (32, 32))), "mask_image needs the image"),
])
def test_bad_input_is_a_clear_user_error(pipe, settings, message):
    settings = {"prompt": "a cat", "num_steps": 2, "seed": 0, **SIZE, **settings}
    with pytest.raises(UserError, match=message):
        pipe(**settings)


def test_request_round_trips_through_a_dict():
    request = GenerationRequest("a cat", "blurry", num_steps=20, seed=5, height=64, width=48,
                                sampler="euler_a")
    assert GenerationRequest.from_dict(request.to_dict()) == request
    with pytest.raises(UserError, match=r"unknown GenerationRequest keys \['steps'\]"):
        GenerationRequest.from_dict({**request.to_dict(), "steps": 3})


def _init_image() -> Image.Image:
    pixels = np.zeros((32, 32, 3), dtype=np.uint8)
    pixels[:, :16] = (200, 40, 40)
    pixels[8:24, 16:] = (20, 180, 220)
    return Image.fromarray(pixels)


def test_img2img_strength_zero_is_the_vae_round_trip(pipe):
    image = _init_image()
    out = pipe("a cat", image=image, strength=0.0, num_steps=10, seed=1, sampler="euler",
               output_type="latent").images
    with torch.no_grad():
        pixels = torch.tensor(np.asarray(image)).permute(2, 0, 1)[None].float() / 127.5 - 1   # (1, 3, H, W)
        posterior = pipe.vae.encode(pixels)
    draw = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(1))
    expected = (posterior.mean + posterior.std * draw) * pipe.vae.config.scaling_factor
    assert torch.allclose(out, expected, atol=1e-6)


def test_img2img_runs_the_last_steps_and_checks_its_image(pipe):
    calls = []
    image = _init_image()
    out = pipe("a cat", image=image, strength=0.5, num_steps=10, seed=1, output_type="np",
               callback=lambda i, x, d: calls.append(i)).images
    assert out.shape == (1, 32, 32, 3) and len(calls) == 5
    with pytest.raises(UserError, match="init image is 32x32 but the request asks for 48x32"):
        pipe("a cat", image=image, width=48, num_steps=2, seed=0)
    with pytest.raises(UserError, match="multiples of 8"):
        pipe("a cat", image=image.resize((30, 30)), num_steps=2, seed=0)


def test_inpainting_keeps_the_original_outside_the_mask(pipe):
    image, mask = _init_image(), Image.new("L", (32, 32))
    mask.paste(255, (8, 8, 24, 24))                                  # paint the middle: latent rows 4..11
    for sampler in ("euler", "euler_ancestral", "dpmpp_2m", "ddim"):
        original = pipe("a cat", image=image, strength=0.0, seed=2, num_steps=10, sampler="euler",
                        output_type="latent").images                # the init image's latents
        out = pipe("a cat", image=image, mask_image=mask, strength=0.8, seed=2, num_steps=10, sampler=sampler,
                   output_type="latent").images
        inside = torch.zeros(16, 16, dtype=torch.bool)
        inside[4:12, 4:12] = True
        assert torch.equal(out[..., ~inside], original[..., ~inside])
        assert (out[..., inside] - original[..., inside]).abs().max() > 0.05
    white = Image.new("L", (32, 32), 255)                            # paint everywhere: plain img2img
    everywhere = pipe("a cat", image=image, mask_image=white, seed=2, num_steps=10,
                      output_type="latent").images
    img2img = pipe("a cat", image=image, seed=2, num_steps=10, output_type="latent").images
    assert torch.equal(everywhere, img2img)


def test_bf16_weights_keep_float32_latents_and_stay_close(pipe):
    reference = run(pipe, sampler="euler")
    bf16 = tiny_ours()
    bf16.show_progress = False
    bf16.to(dtype=torch.bfloat16)
    latents = bf16("a photo of a cat", num_steps=8, seed=0, sampler="euler", output_type="latent",
                   **SIZE).images
    assert latents.dtype == torch.float32
    assert np.abs(run(bf16, sampler="euler") - reference).mean() < 0.05


def test_fp16_vae_nan_is_reported_and_retried_in_float32(pipe, monkeypatch):
    vae = tiny_ours().vae.half()
    fp32_decode = type(vae).decode

    def overflowing(self, z):
        out = fp32_decode(self, z)
        return out * float("nan") if z.dtype == torch.float16 else out

    monkeypatch.setattr(type(vae), "decode", overflowing)
    nan_pipe = TextToImage(pipe.unet, vae, pipe.text_encoder, pipe.tokenizer)
    nan_pipe.show_progress = False
    with pytest.warns(UserWarning, match="VAE overflowed"):
        images = run(nan_pipe)
    assert np.isfinite(images).all() and next(vae.parameters()).dtype == torch.float32
    with pytest.raises(UserError, match="latents became NaN or infinite"):
        nan_pipe.decode_latents(torch.full((1, 4, 16, 16), float("nan")))


def test_missing_builtin_model_is_a_clear_error(monkeypatch, tmp_path):
    from nanodiffusion.weights.models import BUILTIN_TEXT_TO_IMAGE
    monkeypatch.setitem(BUILTIN_TEXT_TO_IMAGE, "builtin", tmp_path / "not-installed")
    with pytest.raises(UserError, match=r"built-in text-to-image model \('builtin'\) is not shipped yet"):
        TextToImage.from_pretrained("builtin")


def test_from_pretrained_loads_a_saved_folder_in_any_dtype(pipe, tmp_path):
    save_diffusers(SDComponents(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler_config),
                   tmp_path / "tiny")
    loaded = TextToImage.from_pretrained(tmp_path / "tiny")
    loaded.show_progress = False
    assert np.array_equal(run(loaded), run(pipe))
    bf16 = TextToImage.from_pretrained(tmp_path / "tiny", dtype="bf16")
    assert bf16.dtype == torch.bfloat16 and bf16.schedule.steps_offset == 1
