"""The diffusion side of img2img and inpainting (sampling_plan.img2img_sigmas, denoisers.inpainting_denoiser)
on closed-form cases."""

import torch

from nanodiffusion.diffusion.denoisers import inpainting_denoiser
from nanodiffusion.diffusion.sampling_plan import img2img_sigmas


def test_img2img_runs_the_last_strength_fraction_of_the_steps():
    sigmas = torch.linspace(10, 0, 11)                                  # 10 steps
    assert torch.equal(img2img_sigmas(sigmas, 1.0), sigmas)
    assert torch.equal(img2img_sigmas(sigmas, 0.55), sigmas[5:])        # int(10 * 0.55) = 5 steps
    assert torch.equal(img2img_sigmas(sigmas, 0.0), sigmas[10:])        # no step: only the last sigma
    assert len(img2img_sigmas(sigmas, 0.99)) - 1 == 9


def test_inpainting_denoiser_keeps_the_original_outside_the_mask():
    generator = torch.Generator().manual_seed(0)
    original, noise, x = (torch.randn(1, 4, 8, 8, generator=generator) for _ in range(3))
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4] = 1                                                   # paint the left half
    seen = []

    def model(x_in, sigma):                                             # a denoiser that records its input
        seen.append(x_in)
        return torch.full_like(x_in, 7.0)

    out = inpainting_denoiser(model, original, noise, mask)(x, 2.0)
    assert torch.equal(out[..., :4], torch.full_like(out[..., :4], 7.0))    # the model paints inside
    assert torch.equal(out[..., 4:], original[..., 4:])                     # the original outside
    # the network sees x inside and the original re-noised to sigma = 2 with the start noise outside
    assert torch.equal(seen[0][..., :4], x[..., :4])
    assert torch.allclose(seen[0][..., 4:], original[..., 4:] + 2.0 * noise[..., 4:])
