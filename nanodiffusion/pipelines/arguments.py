"""The checks at the pipelines' public boundary, in one place: what `TextToImage.generate` takes besides its
GenerationRequest (whose fields check themselves), and what `DDPMPipeline.__call__` takes. Each failure is a
UserError, or a UserTypeError (also a TypeError) for a wrong type, naming the argument, its value and what is
valid; and what NaN latents after sampling say about the inputs that caused them.
"""

from collections.abc import Sequence

import torch
from PIL import Image

from nanodiffusion.diffusion.sampler_options import check_options
from nanodiffusion.diffusion.samplers import SAMPLERS, resolve_sampler
from nanodiffusion.diffusion.schedules import check_num_steps
from nanodiffusion.errors import UserError, UserTypeError
from nanodiffusion.pipelines.request import OUTPUT_TYPES, GenerationRequest
from nanodiffusion.validation import check_float, check_int, check_seed, check_text


def check_generate_inputs(pipe, request, *, generator, latents, image, mask_image, output_type: str,
                          callback) -> None:
    """The arguments of `pipe.generate` (a TextToImage; the request's fields check themselves); the
    latents' shape and the mask's size are checked once the image size is known."""
    if not isinstance(request, GenerationRequest):
        raise UserTypeError(f"request must be a GenerationRequest, got {_describe(request)}")
    check_request_for_model(pipe, request)
    device = pipe.device
    if not isinstance(output_type, str) or output_type not in OUTPUT_TYPES:
        raise UserError(f"unknown output_type {output_type!r}; valid: {', '.join(OUTPUT_TYPES)}")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise UserTypeError(f"generator must be a torch.Generator, got {generator!r}")
        if generator.device.type not in ("cpu", device.type):
            raise UserError(f"generator is on {generator.device} but the pipeline on {device}: pass a CPU "
                            "generator (the same images on every device) or one on the pipeline's device")
    if latents is not None:
        if not isinstance(latents, torch.Tensor) or not latents.is_floating_point():
            raise UserTypeError(f"latents must be a float tensor, got {_describe(latents)}")
        if not latents.isfinite().all():
            raise UserError("latents hold NaN or infinite values")
    if mask_image is not None and image is None:
        raise UserError("mask_image needs the image to inpaint: pass image= too")
    for name, value, channels, low in (("image", image, 3, -1), ("mask_image", mask_image, 1, 0)):
        if value is not None:
            _check_image_input(name, value, channels, low)
    if callback is not None and not callable(callback):
        raise UserTypeError(f"callback must be callable as callback(i, x, denoised), got {callback!r}")


def check_request_for_model(pipe, request: GenerationRequest) -> None:
    """The settings whose range depends on `pipe`'s model: steps within its schedule, clip_skip within its
    text encoder's layers; checked before any work (the sigma grid and the encoder check them again)."""
    check_num_steps(request.num_steps, len(pipe.schedule.alphas_cumprod))
    layers = pipe.text_encoder.config.num_layers
    if request.clip_skip > layers:
        raise UserError(f"clip_skip must be between 1 and {layers} (this model's text encoder layers), "
                        f"got {request.clip_skip}")


def _check_image_input(name: str, value, channels: int, low: int) -> None:
    """A PIL image, a list of them, or a float (B, channels, H, W) tensor with values in [low, 1]."""
    if isinstance(value, torch.Tensor):
        if value.ndim != 4 or value.shape[1] != channels or not value.is_floating_point():
            raise UserError(f"{name} as a tensor must be float (B, {channels}, H, W), got {_describe(value)}")
        if not value.isfinite().all():
            raise UserError(f"{name} holds NaN or infinite values")
        # a little rounding beyond the range is harmless; 0..255 pixels or a wrong scale are not
        if value.min() < low - 1e-3 or value.max() > 1 + 1e-3:
            raise UserError(f"{name} as a tensor must hold values in [{low}, 1], got "
                            f"{value.min().item():g} to {value.max().item():g}")
        return
    pictures = [value] if isinstance(value, Image.Image) else value
    if isinstance(value, (str, bytes)) or not isinstance(pictures, Sequence) \
            or not all(isinstance(picture, Image.Image) for picture in pictures):
        raise UserTypeError(f"{name} must be a PIL image, a list of them or a (B, {channels}, H, W) tensor, "
                            f"got {_describe(value)}" + (" (open a file with PIL.Image.open)"
                                                         if isinstance(value, str) else ""))
    if not pictures:
        raise UserError(f"{name} is an empty list: pass at least one image")


def check_ddpm_call(num_images: int, *, sampler: str, num_steps: int, seed: int, guidance_scale: float,
                    labels, gif_frames: int, options: dict) -> str:
    """The arguments of `DDPMPipeline.__call__`, the extra `options` among the sampler's; returns the
    sampler's canonical name."""
    check_int("num_images", num_images, minimum=1)
    sampler = resolve_sampler(check_text("sampler", sampler))
    check_int("num_steps", num_steps, minimum=1)
    check_seed(seed)
    check_float("guidance_scale", guidance_scale, minimum=0)
    check_int("gif_frames", gif_frames, minimum=0)
    if labels is not None and (isinstance(labels, (str, bytes)) or not isinstance(labels, Sequence)
                               or not all(_is_label(label) for label in labels)):
        raise UserTypeError(f"labels must be a list of class indices or class names, got {labels!r}")
    check_options(sampler, SAMPLERS[sampler].function, options)
    return sampler


def diverged_message(dtype: torch.dtype, guidance_scale: float | None = None) -> str:
    """What NaN or infinite latents after sampling mean, for the error that reports them."""
    if dtype != torch.float32:
        return f"the latents became NaN or infinite: the UNet overflowed in {dtype} (try float32)"
    if guidance_scale is not None and guidance_scale > 30:
        cause = f"guidance_scale {guidance_scale:g} is far above the usual 1 to 30"
    else:
        cause = "a very large guidance scale or prompt emphasis weight does that (usual: 1 to 30, 0.5 to 1.5)"
    return f"the latents became NaN or infinite while sampling in float32: {cause}"


def _is_label(label) -> bool:
    return isinstance(label, str) or (isinstance(label, int) and not isinstance(label, bool))


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"
