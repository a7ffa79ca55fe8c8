"""The fast CPU inference path of the SD networks (issue 6): bf16 and channels_last stay close to fp32, the
transposed-conv upsampling is the nearest+conv map, chunked attention is attention, and tiled or sliced VAE
decoding matches whole-batch decoding."""

import math

import pytest
import torch

from nanodiffusion.nets import blocks
from nanodiffusion.nets.sd_blocks import Upsample, attention, nearest_upsampling_kernel
from nanodiffusion.nets.sd_unet import TINY_UNET, SDUNet
from nanodiffusion.nets.vae import TINY_VAE, AutoencoderKL, VAEConfig
from nanodiffusion.nets.vae_tiling import decode_sliced, decode_tiled, tile_spans
from fixtures import randomize_, tiny_ours

# bf16 keeps 8 significant bits: a tiny UNet's eps stays within 3% of its largest value, and a decoded image
# within the PSNR the SD v1.5 benchmark asks of the bf16 path (35 dB on the [0, 1] scale).
EPS_TOLERANCE = 0.03
IMAGE_PSNR_DB = 35.0


def _psnr(images: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR (dB) of images in [-1, 1], on the [0, 1] scale."""
    mse = ((images.float() - reference) / 2).clamp(-1, 1).square().mean().item()
    return 10 * math.log10(1 / mse)


def _unet_inputs(batch: int = 2, side: int = 8):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, TINY_UNET.in_channels, side, side, generator=generator)
    context = torch.randn(batch, 7, TINY_UNET.context_dim, generator=generator)
    return x, torch.tensor([10.0, 700.0][:batch]), context


def test_bf16_channels_last_unet_stays_close_to_fp32():
    model = randomize_(SDUNet(TINY_UNET), seed=0)
    x, t, context = _unet_inputs(side=16)
    with torch.no_grad():
        expected = model(x, t, context)
        model.to(torch.bfloat16, memory_format=torch.channels_last)
        fast = model(x.bfloat16(), t, context.bfloat16())
    assert fast.dtype == torch.bfloat16 and fast.is_contiguous(memory_format=torch.channels_last)
    assert (fast.float() - expected).abs().max() <= EPS_TOLERANCE * expected.abs().max()


def test_bf16_channels_last_vae_decode_keeps_35_db():
    vae = randomize_(AutoencoderKL(TINY_VAE), seed=0)
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = vae.decode(z)
        vae.to(torch.bfloat16, memory_format=torch.channels_last)
        fast = vae.decode(z.bfloat16())
    assert _psnr(fast, expected) >= IMAGE_PSNR_DB


@pytest.mark.parametrize("dtype, memory_format", [(torch.float32, torch.contiguous_format),
                                                  (torch.float32, torch.channels_last),
                                                  (torch.bfloat16, torch.channels_last)])
def test_transposed_conv_upsampling_is_nearest_upsampling_then_conv(dtype, memory_format):
    torch.manual_seed(0)
    upsample = Upsample(6).to(dtype, memory_format=memory_format).eval()
    reference = blocks.Upsample(6).to(dtype)
    reference.load_state_dict(upsample.state_dict())
    x = torch.randn(2, 6, 5, 7).to(dtype).contiguous(memory_format=memory_format)
    with torch.no_grad():
        fast, expected = upsample(x, (10, 14)), reference(x.float().to(dtype), (10, 14))
    tolerance = 1e-5 if dtype == torch.float32 else 0.02
    assert fast.shape == expected.shape == (2, 6, 10, 14)
    assert (fast.float() - expected.float()).abs().max() <= tolerance * expected.abs().max().float()


def test_upsampling_kernel_taps():
    weight = torch.arange(9.0).reshape(1, 1, 3, 3)                   # w[i, j] = 3 i + j
    kernel = nearest_upsampling_kernel(weight)[0, 0]
    rows = torch.tensor([[0, 0, 1.0], [0, 1, 1], [1, 1, 0], [1, 0, 0]])   # taps [w2, w1+w2, w0+w1, w0]
    assert torch.equal(kernel, rows @ weight[0, 0] @ rows.T)


def test_upsampling_odd_target_uses_the_general_path_and_gradients_reach_the_weight():
    torch.manual_seed(0)
    upsample, reference = Upsample(4), blocks.Upsample(4)
    reference.load_state_dict(upsample.state_dict())
    x = torch.randn(1, 4, 4, 4)
    assert torch.equal(upsample(x, (7, 7)), reference(x, (7, 7)))   # 7 -> 4 -> 7: not an exact 2x
    upsample(x, (8, 8)).square().sum().backward()
    reference(x, (8, 8)).square().sum().backward()
    assert torch.allclose(upsample.conv.weight.grad, reference.conv.weight.grad, rtol=1e-4, atol=1e-5)


def test_cached_upsampling_kernel_follows_weight_changes():
    torch.manual_seed(0)
    upsample, reference = Upsample(4).eval(), blocks.Upsample(4)
    x = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        upsample(x, (8, 8))                                            # caches the kernel
        upsample.conv.weight.mul_(2)                                   # in place: a new tensor version
        reference.load_state_dict(upsample.state_dict())
        assert torch.allclose(upsample(x, (8, 8)), reference(x, (8, 8)), atol=1e-5)
        upsample.to(torch.bfloat16)                                    # a new tensor of another dtype
        assert torch.allclose(upsample(x.bfloat16(), (8, 8)).float(), reference(x, (8, 8)), atol=0.05)


def test_cached_upsampling_kernel_follows_swapped_weights():
    """A weight swapped for a new tensor (as LoRAs do) may get a freed weight's id and memory: no stale kernel.

    The reuse is up to Python's and the allocator's free lists, so it is provoked many times over."""
    torch.manual_seed(0)
    upsample, reference = Upsample(4).eval(), blocks.Upsample(4)
    x = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        for _ in range(300):
            upsample.conv.weight = torch.nn.Parameter(torch.randn(4, 4, 3, 3))
            upsample(x, (8, 8))                                        # caches the kernel of this weight
            del upsample.conv.weight                                   # frees it: its id and memory are free
            upsample.conv.weight = torch.nn.Parameter(torch.randn(4, 4, 3, 3))
            reference.load_state_dict(upsample.state_dict())
            assert torch.allclose(upsample(x, (8, 8)), reference(x, (8, 8)), atol=1e-5)


def test_in_place_inference_matches_autograd_forward():
    model = randomize_(SDUNet(TINY_UNET), seed=0)
    x, t, context = _unet_inputs()
    with torch.no_grad():
        inference = model(x, t, context)
    training = model(x, t, context)
    training.square().mean().backward()                            # the autograd path does not write in place
    assert torch.allclose(inference, training.detach(), atol=1e-6)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_chunked_attention_equals_full_attention():
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 50, 24, generator=generator) for _ in range(3))
    full = attention(q, k, v, num_heads=3)
    for chunk in (1, 7, 49, 50, 64):
        assert (attention(q, k, v, num_heads=3, query_chunk_size=chunk) - full).abs().max() <= 1e-6


def test_tile_spans_cover_with_the_overlap():
    for size in range(1, 200):
        for tile_size, overlap in ((64, 16), (24, 8), (10, 0)):
            starts, length = tile_spans(size, tile_size, overlap)
            assert length <= tile_size and starts[0] == 0 and starts[-1] + length == size
            assert all(b - a <= length - overlap for a, b in zip(starts, starts[1:]))
            assert len(starts) == 1 or len(starts) == math.ceil((size - overlap) / (tile_size - overlap))


def test_tiled_decode_is_exact_on_one_tile_and_close_on_many():
    vae = AutoencoderKL(TINY_VAE).eval()
    z = torch.randn(2, 4, 48, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = vae.decode(z)
        assert torch.equal(decode_tiled(vae.decode, z, tile_size=48, factor=2), whole)
        errors = [(decode_tiled(vae.decode, z, tile_size=32, overlap=overlap, factor=2) - whole).abs()
                  for overlap in (4, 16)]
    # Tiles see their own GroupNorm statistics and attention context, so tiling is an approximation: on
    # white-noise latents the mean error stays below 10% of the image's spread, and more overlap helps.
    assert errors[1].mean() <= 0.1 * whole.std()
    assert errors[1].mean() < errors[0].mean() and errors[1].max() < errors[0].max()


def test_sliced_decode_equals_batched_decode():
    vae = randomize_(AutoencoderKL(VAEConfig(block_channels=(8, 16), layers_per_block=1, norm_groups=4)), 0)
    z = torch.randn(3, 4, 8, 12, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (decode_sliced(vae.decode, z) - vae.decode(z)).abs().max() <= 1e-5


def test_pipeline_tiling_and_slicing_settings():
    pipe = tiny_ours(seed=0)
    pipe.show_progress = False
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    whole = pipe.decode_latents(latents)
    pipe.vae_tile_size, pipe.vae_slicing = 16, True                 # one tile: exactly the whole decode
    assert (pipe.decode_latents(latents) - whole).abs().max() <= 1e-5
    pipe.vae_tile_size, pipe.vae_tile_overlap, pipe.vae_slicing = 12, 4, False
    z = latents / pipe.vae.config.scaling_factor
    with torch.no_grad():
        expected = decode_tiled(pipe.vae.decode, z, tile_size=12, overlap=4, factor=pipe.vae_factor)
    assert torch.equal(pipe.decode_latents(latents), expected)


def test_pipeline_fast_path_stays_close_to_fp32():
    pipe = tiny_ours(seed=0)
    pipe.show_progress = False
    settings = dict(num_steps=4, seed=0, height=32, width=32, output_type="np")
    expected = torch.from_numpy(pipe("a red car", **settings).images)
    pipe.to(dtype=torch.bfloat16, memory_format=torch.channels_last)
    fast = torch.from_numpy(pipe("a red car", **settings).images)
    mse = (fast - expected).square().mean().item()
    assert 10 * math.log10(1 / mse) >= IMAGE_PSNR_DB
