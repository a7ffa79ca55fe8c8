"""ControlNets in the text-to-image pipeline (Zhang et al. 2023): attaching the networks, the per-call
settings (diffusers' names) as the request's `ControlSettings`, control images made into control maps, and
the denoiser that adds the residuals (diffusion/denoisers.py's `controlled_unet` and `control_denoiser`).

A control image is a PIL image, an image file, an OpenPose keypoint JSON (preprocess "openpose"), or a float
tensor (1 or B, 3, H, W) in [0, 1] used as the map itself. The map is made at the generated size: Canny
edges of the image fitted to it (or at `processor_res`, then fitted), a skeleton drawn and fitted, or the
image fitted as it is; fitting follows the resize mode (control_images/resize.py).
"""

import hashlib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from nanodiffusion.control_images.canny import canny
from nanodiffusion.control_images.openpose import openpose_image
from nanodiffusion.control_images.resize import control_tensor, fit_control_image, to_rgb
from nanodiffusion.diffusion.denoisers import ControlUnit, Denoiser, control_denoiser, controlled_unet
from nanodiffusion.errors import UserError
from nanodiffusion.nets.controlnet import ControlNet
from nanodiffusion.pipelines.request import ControlSettings, GenerationRequest
from nanodiffusion.weights.controlnet import load_controlnet
from nanodiffusion.weights.models import model_hash

ControlImage = Image.Image | torch.Tensor | str | Path | dict
# diffusers' per-call names (and ours for what it lacks) -> ControlSettings fields; a value is one for all
# ControlNets or a list with one per ControlNet
CALL_SETTINGS = {"controlnet_conditioning_scale": "scale", "control_guidance_start": "start",
                 "control_guidance_end": "end", "guess_mode": "guess_mode", "control_mode": "control_mode",
                 "control_preprocess": "preprocess", "control_resize_mode": "resize_mode",
                 "control_processor_res": "processor_res", "control_low_threshold": "low_threshold",
                 "control_high_threshold": "high_threshold"}


@dataclass(frozen=True)
class AttachedControlNet:
    """A ControlNet in a pipeline, with the hash of the files it came from (None for a module)."""

    network: ControlNet
    hash: str | None = None


def attach_controlnets(pipe, sources, *, trust_pickle: bool = False, name: str | None = None,
                       digest: str | None = None) -> list[str]:
    """Load (or take) ControlNets and attach them to `pipe.controlnets` under their names: the path as
    given, or "controlnet-K" for a module; a single module may be given its `name` and the `digest` of the
    files it came from. Each must fit the pipeline's UNet and VAE."""
    sources = list(sources) if isinstance(sources, (list, tuple)) else [sources]
    if (name or digest) and (len(sources) != 1 or not isinstance(sources[0], ControlNet)):
        raise UserError("name= and digest= label a single ControlNet module")
    names = []
    for source in sources:
        if isinstance(source, ControlNet):
            network, label = source, name or f"controlnet-{len(pipe.controlnets)}"
        else:
            network = load_controlnet(source, dtype=pipe.dtype, device=pipe.device, trust_pickle=trust_pickle,
                                      unet=pipe.unet.config, memory_format=memory_format(pipe.unet))
            digest, label = model_hash(source), str(source)
        check_fits(network, pipe, label)
        pipe.controlnets[label] = AttachedControlNet(network.eval(), digest)
        names.append(label)
    return names


def memory_format(unet) -> torch.memory_format:
    """The layout of the UNet's conv weights (channels_last on the bf16 CPU path), for its ControlNets."""
    weight = unet.conv_in.weight
    nhwc = weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    return torch.channels_last if nhwc else torch.preserve_format


def check_fits(network: ControlNet, pipe, name: str) -> None:
    """A UserError naming `name` unless the ControlNet's residuals and control-image scale fit `pipe`."""
    try:
        network.config.check_fits(pipe.unet.config)
    except UserError as error:
        raise UserError(f"ControlNet {name}: {error}") from None
    if network.config.downscale != pipe.vae_factor:
        raise UserError(f"ControlNet {name} takes control images {network.config.downscale}x its latents, "
                        f"but this model's latents are 1/{pipe.vae_factor} of the image")


def call_settings(pipe, settings: dict, control_image) -> list:
    """Move a pipeline call's control arguments out of `settings` into `settings["controls"]`, one
    ControlSettings per attached ControlNet; return the control images, one per ControlNet ([] if none)."""
    given = {name: settings.pop(name) for name in list(settings) if name in CALL_SETTINGS}
    if control_image is None:
        if pipe.controlnets and "controls" not in settings:
            raise UserError(f"this pipeline has ControlNets attached ({', '.join(pipe.controlnets)}): pass "
                            "control_image= (one per ControlNet), or detach them (pipe.controlnets.clear())")
        if given:
            raise UserError(f"{', '.join(given)} need control_image= and a ControlNet")
        return []
    if "controls" in settings:
        raise UserError("pass control_image= with the ControlNets attached, or controls=, not both")
    count = len(pipe.controlnets)
    if count == 0:
        raise UserError("control_image needs a ControlNet: from_pretrained(..., controlnet=PATH) or "
                        "pipe.load_controlnet(PATH)")
    images = control_image if isinstance(control_image, (list, tuple)) else [control_image]
    values = {field: per_controlnet(name, value, count) for name, value in given.items()
              for field in [CALL_SETTINGS[name]]}
    per_controlnet("control_image", images, count)
    settings["controls"] = tuple(
        ControlSettings(name, attached.hash, image=str(image) if isinstance(image, (str, Path)) else None,
                        **{field: value[k] for field, value in values.items()})
        for k, ((name, attached), image) in enumerate(zip(pipe.controlnets.items(), images)))
    return list(images)


def per_controlnet(name: str, value, count: int) -> list:
    """`value` as one entry per ControlNet: a list of `count`, or one value for all."""
    if not isinstance(value, (list, tuple)):
        return [value] * count
    if len(value) != count:
        raise UserError(f"{name}: give one value, or one per ControlNet ({count}), got {len(value)}")
    return list(value)


def control_units(pipe, request: GenerationRequest,
                  control_image: Sequence | None) -> tuple[list[ControlUnit], GenerationRequest]:
    """The request's ControlUnits, their control maps made at its (settled) size, and the request with the
    control images' hashes filled in. Images come from `control_image` (one per control), else from the
    files the request names."""
    controls = request.controls
    if control_image is not None and len(control_image) != len(controls):
        raise UserError(f"got {len(control_image)} control images for {len(controls)} ControlNets")
    units, done = [], []
    for k, settings in enumerate(controls):
        attached = pipe.controlnets.get(settings.model)
        if attached is None:
            loaded = ", ".join(pipe.controlnets) or "none"
            raise UserError(f"ControlNet {settings.model!r} is not loaded in this pipeline "
                            f"(loaded: {loaded})")
        source = control_image[k] if control_image is not None else settings.image
        if source is None:
            raise UserError(f"ControlNet {k} ({settings.model}) has no control image: pass control_image=")
        image, digest = read_control_image(source, settings.preprocess)
        if control_image is None and settings.image_hash not in (None, digest):
            warnings.warn(f"the control image {settings.image} is not the one recorded (hash {digest}, "
                          f"recorded {settings.image_hash}): the picture will differ", stacklevel=3)
        done.append(replace(settings, image_hash=digest))
        network = attached.network
        units.append(ControlUnit(_in_dtype(network), control_map(image, done[-1], request.width,
                                                                 request.height).to(pipe.device),
                                 scale=settings.scale, start=settings.start, end=settings.end,
                                 guess_mode=settings.guess_mode, pooled=network.config.global_pool,
                                 control_mode=settings.control_mode))
    return units, replace(request, controls=tuple(done))


def _in_dtype(network: ControlNet):
    """The ControlNet called with its inputs in its own dtype (latents stay float32 outside)."""
    dtype = next(network.parameters()).dtype
    return lambda x, t, context, image: network(x.to(dtype), t, context.to(dtype), image)


def read_control_image(source: ControlImage, preprocess: str) -> tuple[Image.Image | torch.Tensor, str]:
    """The control image (PIL, or a tensor passed through) and the hash of its pixels; a pose JSON (file,
    text or parsed) is drawn first."""
    if isinstance(source, torch.Tensor):
        if source.ndim != 4 or source.shape[1] != 3 or not source.is_floating_point():
            raise UserError(f"a control image tensor must be float (B, 3, H, W) in [0, 1], got "
                            f"{source.dtype} {tuple(source.shape)}")
        data = source.detach().float().cpu().contiguous().numpy()
        return source, _digest(str(tuple(source.shape)).encode(), data.tobytes())
    if preprocess == "openpose":
        if isinstance(source, Image.Image):
            raise UserError("the openpose preprocessor reads OpenPose keypoint JSON, not an image: give the "
                            "skeleton image with preprocess none")
        image = openpose_image(source)
    elif isinstance(source, Image.Image):
        image = source
    elif isinstance(source, (str, Path)):
        image = open_image(source)
    else:
        raise UserError(f"a control image must be a PIL image, a file or a tensor, "
                        f"got {type(source).__name__}")
    image = to_rgb(image)
    return image, _digest(f"{image.width}x{image.height}".encode(), image.tobytes())


def open_image(path: str | Path) -> Image.Image:
    """An image file read fully; a UserError naming the file when it is missing or unreadable."""
    if not Path(path).is_file():
        raise UserError(f"no such control image file: {path}")
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except Exception as error:                      # Pillow raises many kinds on broken files
        raise UserError(f"cannot read the control image {path}: {type(error).__name__}: {error}") from None


def _digest(*parts: bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return digest.hexdigest()[:16]


def control_map(image: Image.Image | torch.Tensor, settings: ControlSettings, width: int,
                height: int) -> torch.Tensor:
    """The control map (1 or B, 3, height, width) in [0, 1] that the ControlNet takes (see the module)."""
    if isinstance(image, torch.Tensor):
        if settings.preprocess != "none" or tuple(image.shape[2:]) != (height, width):
            raise UserError(f"a control image tensor is used as the map itself: it needs preprocess none and "
                            f"the generated size {width}x{height}, got {tuple(image.shape)}")
        return image.float()
    if settings.preprocess == "canny":
        if settings.processor_res is None:
            image = canny_map(fit_control_image(image, width, height, settings.resize_mode), settings)
        else:
            scale = settings.processor_res / min(image.size)
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            image = canny_map(fit_control_image(image, *size), settings)
    return control_tensor(fit_control_image(image, width, height, settings.resize_mode))


def canny_map(image: Image.Image, settings: ControlSettings) -> Image.Image:
    """Canny edges of an RGB image as a white-on-black RGB map (A1111's "canny" module)."""
    edges = canny(np.asarray(image), settings.low_threshold, settings.high_threshold)
    return Image.fromarray(edges).convert("RGB")


def control_model(pipe, units: list[ControlUnit], sigmas: torch.Tensor, cond: dict,
                  uncond: dict | None) -> tuple:
    """The denoiser with the units' residuals, and the CFG branches marked conditional (1) or not (0), as
    `cfg_denoiser` takes them (diffusion/denoisers.py)."""
    net = controlled_unet(pipe._eps, units)
    denoiser = control_denoiser(Denoiser(net, pipe.schedule.alphas_cumprod, pipe.schedule.prediction), units,
                                sigmas)
    rows = len(cond["context"])
    cond = {**cond, "conditional": torch.ones(rows)}
    uncond = None if uncond is None else {**uncond, "conditional": torch.zeros(rows)}
    return denoiser, cond, uncond
