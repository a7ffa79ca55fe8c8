"""Token merging (ToMe for SD): the merge/unmerge plan, the opt-in pipeline setting (ratio 0 is the plain
path, bit for bit; ratio > 0 changes the image a little), and `generate --tome`."""

import json
import math

import numpy as np
import pytest
import torch

from nanodiffusion.cli import main
from nanodiffusion.errors import UserError
from nanodiffusion.images import read_png_text
from nanodiffusion.nets.sd_unet import SDUNetConfig
from nanodiffusion.nets.token_merging import TokenMerge, full_resolution_transformers
from nanodiffusion.pipelines.text_to_image import TextToImage
from nanodiffusion.weights import save_diffusers
from fixtures import random_components

# A tiny UNet with attention at its full latent resolution (level 0), where tokens are merged.
TOME_UNET = SDUNetConfig(model_channels=32, channel_mult=(1, 2), attention_levels=(0, 1), num_heads=2,
                         context_dim=32, norm_groups=8, sample_size=8)
SETTINGS = dict(num_steps=4, sampler="euler", guidance_scale=5.0, height=48, width=48, output_type="np")


def test_merge_then_unmerge_restores_tokens_that_repeat_in_each_window():
    # every 2x2 window holds one token four times: each source merges into its own window's destination
    windows = torch.randn(2, 3, 4, 8, generator=torch.Generator().manual_seed(0))       # (B, H/2, W/2, C)
    x = windows.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2).flatten(1, 2)   # (B, 6*8, C)
    plan = TokenMerge(x, 6, 8, 0.75, torch.Generator().manual_seed(1))
    merged = plan.merge(x)
    assert plan.r == 36 and merged.shape == (2, 12, 8)
    assert torch.allclose(plan.unmerge(merged), x, atol=1e-6)


def test_merging_nothing_is_a_permutation_and_back():
    x = torch.randn(2, 5 * 7, 4, generator=torch.Generator().manual_seed(0))           # odd sides
    plan = TokenMerge(x, 5, 7, 0.0, torch.Generator().manual_seed(1))
    assert plan.r == 0 and torch.equal(plan.unmerge(plan.merge(x)), x)
    half = TokenMerge(x, 5, 7, 0.5, torch.Generator().manual_seed(1))
    assert half.merge(x).shape == (2, 35 - 17, 4) and half.unmerge(half.merge(x)).shape == x.shape


@pytest.fixture(scope="module")
def pipe():
    parts = random_components(unet=TOME_UNET)
    pipe = TextToImage(parts.unet, parts.vae, parts.text_encoder, parts.tokenizer)
    pipe.show_progress = False
    return pipe


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return 10 * math.log10(1 / np.square(a - b).mean())


def test_ratio_zero_is_the_plain_path_and_merging_changes_the_image_a_little(pipe):
    assert len(full_resolution_transformers(pipe.unet)) == 5           # down level 0: 2, up level 0: 3
    plain = pipe("a red circle", seed=3, **SETTINGS).images
    assert np.array_equal(pipe("a red circle", seed=3, tome_ratio=0.0, **SETTINGS).images, plain)
    merged = {ratio: pipe("a red circle", seed=3, tome_ratio=ratio, **SETTINGS).images for ratio in (0.3, 0.6)}
    assert all(transformer.token_merging is None for transformer in full_resolution_transformers(pipe.unet))
    assert not np.array_equal(merged[0.3], plain)
    assert 25 < psnr(merged[0.6], plain) < psnr(merged[0.3], plain)    # more merging, further away
    again = pipe("a red circle", seed=3, tome_ratio=0.6, **SETTINGS).images
    assert np.array_equal(again, merged[0.6])                          # the same seed, the same image


@pytest.mark.parametrize("ratio", [-0.1, 0.8])
def test_ratios_out_of_range_are_clear_errors(pipe, ratio):
    with pytest.raises(UserError, match="token merging ratio"):
        pipe("a cat", tome_ratio=ratio, **SETTINGS)


def test_generate_tome_is_recorded_and_replayed(pipe, tmp_path):
    save_diffusers(random_components(unet=TOME_UNET), tmp_path / "model")
    out, again = tmp_path / "tome.png", tmp_path / "again.png"
    argv = ["generate", "a cat", "--model", tmp_path / "model", "--steps", 3, "--size", 32, "--seed", 1]
    assert main([str(a) for a in [*argv, "--tome", 0.5, "--out", out]]) == 0
    text = read_png_text(out)
    assert ", Token merging ratio: 0.5," in text["parameters"]
    assert json.loads(text["nanodiffusion"])["request"]["tome_ratio"] == 0.5
    assert main(["generate", "--from", str(out), "--out", str(again)]) == 0
    assert read_png_text(again) == text and again.read_bytes() == out.read_bytes()
