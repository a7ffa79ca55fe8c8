"""Parity with diffusers' `load_lora_weights` (PEFT backend, STYLE §8.2): the same LoRA file on the same tiny
random SD pipeline gives the same images within 1e-4 (fp32), for kohya and PEFT files, UNet and text-encoder
LoRAs, LoCon conv LoRAs with 3x3 kernels, two LoRAs with weights, fuse/unfuse, and an LCM-LoRA with the LCM
sampler against LCMScheduler.

diffusers runs each LoRA beside its layer (x·W + scale·B·A·x), we fuse it into W: the images agree to float
rounding. Each case also checks that the LoRA changes the image, so that the comparison can fail.
"""

import numpy as np
import pytest
import torch

from lora_fixtures import ATTENTION, CONV, euler_pipelines, lora_layers, write_kohya, write_peft

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning",
                                        "ignore::UserWarning")

TOLERANCE = 1e-4
SETTINGS = dict(prompt="a photo of a cat", guidance_scale=7.5, height=32, width=32)


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    return euler_pipelines(tmp_path_factory.mktemp("lora-parity"))


@pytest.fixture
def both(pipes):
    yield pipes
    for pipe in pipes:
        pipe.unload_lora_weights()


def images(reference, ours):
    settings = dict(SETTINGS)
    prompt = settings.pop("prompt")
    expected = reference(prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                         output_type="np", **settings).images
    got = ours(prompt, num_steps=2, sampler="euler", seed=0, output_type="np", **settings).images
    return expected, got


@pytest.fixture(scope="module")
def base(pipes):
    return images(*pipes)[1]


def assert_same_changed_images(reference, ours, base):
    expected, got = images(reference, ours)
    assert float(np.abs(got - expected).max()) <= TOLERANCE
    assert float(np.abs(got - base).max()) > 0.01                        # the LoRA did change the image


def networks(ours):
    return {"unet": ours.unet, "text_encoder": ours.text_encoder}


def load_both(both, path, name):
    reference, ours = both
    reference.load_lora_weights(str(path), adapter_name=name)
    ours.load_lora_weights(path, adapter_name=name)


@pytest.mark.parametrize("case", ["unet+text", "text-only", "locon"])
def test_kohya_lora_matches_diffusers(both, base, tmp_path, case):
    ours = both[1]
    if case == "locon":          # 3x3 down convs, two ranks: kohya's conv_dim beside network_dim
        convs = lora_layers(networks(ours), unet=CONV, text_encoder=(), rank=2, seed=1, std=0.08)
        layers = {**lora_layers(networks(ours), rank=4), **convs}
    else:
        layers = lora_layers(networks(ours), unet=ATTENTION if case == "unet+text" else ())
    load_both(both, write_kohya(tmp_path / "kohya.safetensors", layers, alpha=2.0), "kohya")
    assert_same_changed_images(*both, base)


def test_peft_lora_matches_diffusers(both, base, tmp_path):
    layers = lora_layers(networks(both[1]), unet=ATTENTION + CONV, rank=3, std=0.08)
    load_both(both, write_peft(tmp_path / "peft.safetensors", layers, alpha=6.0), "peft")
    assert_same_changed_images(*both, base)


def test_two_loras_with_weights_and_fusing_match_diffusers(both, base, tmp_path):
    ours = both[1]
    load_both(both, write_kohya(tmp_path / "a.safetensors", lora_layers(networks(ours), seed=2), alpha=1.0),
              "a")
    load_both(both, write_peft(tmp_path / "b.safetensors", lora_layers(networks(ours), unet=ATTENTION + CONV,
                                                                        seed=3, std=0.08)), "b")
    for pipe in both:
        pipe.set_adapters(["a", "b"], adapter_weights=[0.7, 0.4])
    assert_same_changed_images(*both, base)
    for pipe in both:
        pipe.fuse_lora(lora_scale=1.0)
    assert_same_changed_images(*both, base)
    for pipe in both:
        pipe.unfuse_lora()
        pipe.set_adapters("b", adapter_weights=0.5)
    assert_same_changed_images(*both, base)


def test_fused_lora_scale_matches_diffusers(both, base, tmp_path):
    load_both(both, write_kohya(tmp_path / "a.safetensors", lora_layers(networks(both[1])), alpha=4.0), "a")
    for pipe in both:
        pipe.fuse_lora(lora_scale=0.5)
    assert_same_changed_images(*both, base)


def test_lcm_lora_with_the_lcm_sampler_matches_diffusers(both, tmp_path):
    """The LCM-LoRA recipe (Luo et al. 2023): an LCM-LoRA-shaped file (attention and conv layers, PEFT keys),
    diffusers' LCMScheduler against our `lcm` sampler, 4 steps, guidance 1 (one UNet call per step)."""
    import diffusers
    reference, ours = both
    layers = lora_layers(networks(ours), unet=ATTENTION + CONV, text_encoder=(), rank=4, std=0.08)
    path = write_peft(tmp_path / "lcm-lora-sdv1-5.safetensors", layers, alpha=8.0)
    euler = reference.scheduler
    reference.scheduler = diffusers.LCMScheduler.from_config({**euler.config, "timestep_spacing": "leading"})
    try:
        settings = dict(guidance_scale=1.0, height=32, width=32, output_type="np")
        plain = ours("a photo of a cat", num_steps=4, sampler="lcm", seed=0, **settings).images
        load_both(both, path, "lcm")
        assert ours.lora.adapters["lcm"].file.is_lcm
        assert ours.lora.lcm_hint("lcm", 4, 1.0) is None
        assert "--sampler lcm" in ours.lora.lcm_hint("euler", 20, 7.5)
        expected = reference("a photo of a cat", num_inference_steps=4,
                             generator=torch.Generator().manual_seed(0), **settings).images
        got = ours("a photo of a cat", num_steps=4, sampler="lcm", seed=0, **settings).images
    finally:
        reference.scheduler = euler
    assert float(np.abs(got - expected).max()) <= TOLERANCE
    assert float(np.abs(got - plain).max()) > 0.01
