"""ControlNets in the text-to-image pipeline: parity with diffusers' StableDiffusionControlNetPipeline on a
tiny random SD folder (one and two ControlNets, scales, start/end, guess mode, img2img), the request that
records the control images, replay from it, and the errors a user can meet."""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from nanodiffusion.control_images.resize import fit_control_image
from nanodiffusion.errors import UserError
from nanodiffusion.nets.controlnet import ControlNet
from nanodiffusion.pipelines.control import canny_map
from nanodiffusion.pipelines.request import ControlSettings, GenerationRequest
from nanodiffusion.pipelines.text_to_image import TextToImage
from nanodiffusion.weights.controlnet import save_controlnet
from fixtures import randomize_, save_tiny_diffusers, tiny_ours

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
EMBEDDING = (8, 16)                     # the tiny VAE halves once: control images are 2x the latents
SIZE = dict(height=32, width=32)
SCHEDULERS = {"pndm": "PNDMScheduler", "euler": "EulerDiscreteScheduler", "ddim": "DDIMScheduler"}
# diffusers counts the start/end window over model evaluations, we (and A1111) over sampler steps: the
# two agree for samplers with one evaluation per step (not PNDM's first step, nor Heun's)
CASES = {
    "one": (1, "pndm", {}),
    "one-window": (1, "euler", dict(controlnet_conditioning_scale=0.6, control_guidance_start=0.2,
                                    control_guidance_end=0.8)),
    "two": (2, "euler", dict(controlnet_conditioning_scale=[0.7, 1.3], control_guidance_start=[0.0, 0.3],
                             control_guidance_end=[0.7, 1.0])),
    "guess-mode": (1, "ddim", dict(guess_mode=True, controlnet_conditioning_scale=0.8)),
}


def random_controlnet(pipe: TextToImage, seed: int) -> ControlNet:
    """A ControlNet for `pipe` with small random weights everywhere (zero convolutions included)."""
    return randomize_(ControlNet.from_unet(pipe.unet, embedding_channels=EMBEDDING), seed, fresh=True)


def control_images(count: int, seed: int = 5) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(1, 3, 32, 32, generator=generator) for _ in range(count)]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny SD folder and two random ControlNet folders for it."""
    root = tmp_path_factory.mktemp("control")
    folder = save_tiny_diffusers(root / "tiny-sd")
    pipe = TextToImage.from_pretrained(folder)
    controlnets = []
    for seed in (1, 2):
        save_controlnet(random_controlnet(pipe, seed), root / f"controlnet-{seed}")
        controlnets.append(root / f"controlnet-{seed}")
    return folder, controlnets


@pytest.fixture(scope="module")
def pipe():
    pipe = tiny_ours()
    pipe.show_progress = False
    return pipe


@pytest.mark.parametrize("case", CASES)
def test_images_match_diffusers_controlnet_pipeline(folders, case):
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    count, sampler, settings = CASES[case]
    folder, controlnet_folders = folders
    reference_nets = [diffusers.ControlNetModel.from_pretrained(path) for path in controlnet_folders[:count]]
    reference = diffusers.StableDiffusionControlNetPipeline.from_pretrained(
        folder, controlnet=reference_nets if count > 1 else reference_nets[0], safety_checker=None,
        requires_safety_checker=False)
    reference.scheduler = getattr(diffusers, SCHEDULERS[sampler]).from_config(reference.scheduler.config)
    reference.set_progress_bar_config(disable=True)
    ours = TextToImage.from_pretrained(folder, controlnet=[str(path) for path in controlnet_folders[:count]])
    ours.show_progress = False
    images = control_images(count)
    images = images if count > 1 else images[0]
    common = dict(num_inference_steps=6, guidance_scale=7.5, output_type="np", **SIZE, **settings)
    expected = reference("a red square", image=images, generator=torch.Generator().manual_seed(0),
                         **common).images
    got = ours("a red square", control_image=images, seed=0, sampler=sampler, **common).images
    plain = TextToImage.from_pretrained(folder)
    plain.show_progress = False
    without = plain("a red square", seed=0, sampler=sampler, num_inference_steps=6, guidance_scale=7.5,
                    output_type="np", **SIZE)
    assert np.abs(got - expected).max() <= 1e-4
    assert np.abs(without.images - expected).max() > 0.05            # the ControlNets do steer the picture


def test_img2img_matches_diffusers_controlnet_img2img_pipeline(folders):
    diffusers = pytest.importorskip("diffusers")
    folder, controlnet_folders = folders
    reference = diffusers.StableDiffusionControlNetImg2ImgPipeline.from_pretrained(
        folder, controlnet=diffusers.ControlNetModel.from_pretrained(controlnet_folders[0]),
        safety_checker=None, requires_safety_checker=False)
    reference.scheduler = diffusers.EulerDiscreteScheduler.from_config(reference.scheduler.config)
    reference.set_progress_bar_config(disable=True)
    ours = TextToImage.from_pretrained(folder, controlnet=str(controlnet_folders[0]))
    ours.show_progress = False
    init = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    control = control_images(1)[0]
    common = dict(strength=0.6, num_inference_steps=8, guidance_scale=7.5, output_type="np",
                  controlnet_conditioning_scale=0.9, control_guidance_end=0.75)
    expected = reference("a blue circle", image=init, control_image=control,
                         generator=torch.Generator().manual_seed(0), **common).images
    got = ours("a blue circle", image=init * 2 - 1, control_image=control, seed=0, sampler="euler",
               **common).images
    assert np.abs(got - expected).max() <= 1e-4


def test_a_controlnet_fresh_from_the_unet_changes_nothing(pipe):
    """Zero convolutions: a ControlNet just copied from the UNet adds exact zeros."""
    plain = pipe("a cat", seed=1, num_steps=4, output_type="np", **SIZE).images
    pipe.load_controlnet(ControlNet.from_unet(pipe.unet, embedding_channels=EMBEDDING))
    try:
        steered = pipe("a cat", seed=1, num_steps=4, output_type="np", control_image=control_images(1)[0],
                       **SIZE).images
    finally:
        pipe.controlnets.clear()
    assert np.array_equal(plain, steered)


def test_the_request_records_the_control_image_and_replays_it(pipe, tmp_path):
    source = Image.fromarray((np.random.default_rng(0).random((40, 48, 3)) * 255).astype(np.uint8))
    source.save(tmp_path / "photo.png")
    name, = pipe.load_controlnet(random_controlnet(pipe, 3))
    try:
        out = pipe("a cat", seed=2, num_steps=3, output_type="np", control_image=str(tmp_path / "photo.png"),
                   control_preprocess="canny", controlnet_conditioning_scale=0.5, **SIZE)
        control, = out.request.controls
        assert (control.model, control.preprocess, control.scale) == (name, "canny", 0.5)
        assert control.image == str(tmp_path / "photo.png") and len(control.image_hash) == 16
        request = GenerationRequest.from_dict(out.request.to_dict())            # as the PNG keeps it
        assert request == out.request
        assert np.array_equal(pipe.generate(request, output_type="np").images, out.images)
        # the Canny map made by hand and given as the map itself steers the same way
        edges = np.array(canny_map(fit_control_image(source, 32, 32), control))    # (32, 32, 3) uint8
        as_map = torch.from_numpy(edges).permute(2, 0, 1)[None].float() / 255
        again = pipe("a cat", seed=2, num_steps=3, output_type="np", control_image=as_map,
                     controlnet_conditioning_scale=0.5, **SIZE)
        assert np.abs(again.images - out.images).max() <= 1e-6
        Image.new("RGB", (48, 40), "white").save(tmp_path / "photo.png")
        with pytest.warns(UserWarning, match="not the one recorded"):
            pipe.generate(request, output_type="np")
    finally:
        pipe.controlnets.clear()


def test_mistakes_fail_with_a_clear_message(pipe):
    image = control_images(1)[0]
    with pytest.raises(UserError, match="control_image needs a ControlNet"):
        pipe("a cat", control_image=image, num_steps=2, **SIZE)
    pipe.load_controlnet([random_controlnet(pipe, 1), random_controlnet(pipe, 2)])
    try:
        with pytest.raises(UserError, match="pass control_image="):
            pipe("a cat", num_steps=2, **SIZE)
        with pytest.raises(UserError, match=r"control_image: give one value, or one per ControlNet \(2\)"):
            pipe("a cat", control_image=[image] * 3, num_steps=2, **SIZE)
        with pytest.raises(UserError, match="controlnet_conditioning_scale: give one value"):
            pipe("a cat", control_image=image, controlnet_conditioning_scale=[1.0], num_steps=2, **SIZE)
        with pytest.raises(UserError, match="unknown control preprocess 'sobel'"):
            pipe("a cat", control_image=[image, image], control_preprocess="sobel", num_steps=2, **SIZE)
        with pytest.raises(UserError, match="0 <= start < end <= 1"):
            pipe("a cat", control_image=[image, image], control_guidance_start=0.5, control_guidance_end=0.5,
                 num_steps=2, **SIZE)
        with pytest.raises(UserError, match="the generated size 32x32"):
            pipe("a cat", control_image=[image, torch.rand(1, 3, 16, 16)], num_steps=2, **SIZE)
        with pytest.raises(UserError, match="no such control image file: nowhere.png"):
            pipe("a cat", control_image=[image, "nowhere.png"], num_steps=2, **SIZE)
        with pytest.raises(UserError, match="is not loaded in this pipeline"):
            request = GenerationRequest("a cat", num_steps=2, controls=(ControlSettings("other"),), **SIZE)
            pipe.generate(request, control_image=[image])
    finally:
        pipe.controlnets.clear()
    with pytest.raises(UserError, match="takes control images 8x its latents"):
        pipe.load_controlnet(ControlNet.from_unet(pipe.unet))
    wide = dataclasses.replace(pipe.unet.config, model_channels=64)
    with pytest.raises(UserError, match="residuals do not fit the UNet"):
        pipe.load_controlnet(ControlNet(dataclasses.replace(random_controlnet(pipe, 0).config, unet=wide)))


def test_loras_change_the_unet_and_leave_the_controlnet_alone(pipe, tmp_path):
    from lora_fixtures import lora_layers, write_kohya
    controlnet = random_controlnet(pipe, 4)
    before = {key: value.clone() for key, value in controlnet.state_dict().items()}
    settings = dict(seed=3, num_steps=3, output_type="np", **SIZE)
    pipe.load_controlnet(controlnet)
    try:
        steered = pipe("a cat", control_image=control_images(1)[0], **settings).images
        layers = lora_layers({"unet": pipe.unet, "text_encoder": pipe.text_encoder}, text_encoder=())
        pipe.load_lora_weights(write_kohya(tmp_path / "style.safetensors", layers))
        both = pipe("a cat", control_image=control_images(1)[0], **settings).images
        pipe.unload_lora_weights()
        again = pipe("a cat", control_image=control_images(1)[0], **settings).images
    finally:
        pipe.controlnets.clear()
    assert np.abs(both - steered).max() > 1e-3 and np.array_equal(again, steered)
    assert all(torch.equal(value, before[key]) for key, value in controlnet.state_dict().items())


def test_pipe_to_moves_and_casts_the_controlnets_and_files_load_in_the_unet_layout(tmp_path):
    pipe = tiny_ours()
    save_controlnet(random_controlnet(pipe, 1), tmp_path / "controlnet")
    pipe.load_controlnet(random_controlnet(pipe, 2))
    pipe.to(dtype=torch.bfloat16, memory_format=torch.channels_last)
    name, = pipe.load_controlnet(str(tmp_path / "controlnet"))              # loaded as the UNet now is
    for attached in pipe.controlnets.values():
        weight = attached.network.conv_in.weight
        assert weight.dtype == torch.bfloat16 and weight.is_contiguous(memory_format=torch.channels_last)
        assert not weight.is_contiguous()


def test_inpainting_with_a_controlnet_repaints_the_mask_only(pipe):
    init = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1                                       # repaint the middle
    settings = dict(image=init, mask_image=mask, strength=0.8, seed=2, num_steps=4, output_type="latent")
    plain = pipe("a cat", **settings).images
    pipe.load_controlnet(random_controlnet(pipe, 5))
    try:
        steered = pipe("a cat", control_image=control_images(1)[0], **settings).images
    finally:
        pipe.controlnets.clear()
    keep = torch.ones_like(plain, dtype=torch.bool)
    keep[..., 4:12, 4:12] = False                                   # the mask at the latents' size
    assert torch.equal(steered[keep], plain[keep])                  # the original latents outside
    assert (steered[~keep] - plain[~keep]).abs().max() > 1e-3
