"""`generate`'s ControlNet flags: `--controlnet PATH --control-image IMG [--control-preprocess canny]
[--control-scale W] ...`, once per ControlNet. A setting flag given once holds for every ControlNet.

The request records each ControlNet by its path and hash and the control image by its path and pixel hash,
so `generate --from IMAGE.png` loads them again; control flags given with --from change the stored ones.
"""

import argparse
import sys
from dataclasses import replace

from nanodiffusion.control_images.resize import RESIZE_MODES
from nanodiffusion.diffusion.denoisers import CONTROL_MODES
from nanodiffusion.errors import UserError
from nanodiffusion.pipelines.request import PREPROCESSORS, GenerationRequest
from nanodiffusion.validation import finite_float

SUPPRESS = argparse.SUPPRESS
# flag destination -> ControlSettings field, for the per-ControlNet settings
SETTING_FLAGS = {"control_preprocess": "preprocess", "control_scale": "scale", "control_start": "start",
                 "control_end": "end", "control_mode": "control_mode", "control_resize": "resize_mode"}


def add_control_arguments(p) -> None:
    """The ControlNet flags, each repeatable (one per ControlNet, in the order of --controlnet)."""
    group = p.add_argument_group("ControlNet (each flag once per --controlnet, or once for all)")
    group.add_argument("--controlnet", action="append", default=SUPPRESS, metavar="PATH",
                       help="a ControlNet: diffusers folder or control_*.safetensors/.pth file")
    group.add_argument("--control-image", dest="control_image", action="append", default=SUPPRESS,
                       metavar="IMG", help="its control image (an OpenPose JSON with --control-preprocess "
                                           "openpose)")
    group.add_argument("--control-preprocess", action="append", choices=PREPROCESSORS, default=SUPPRESS,
                       help="make the control map from the image: none (the image is the map), canny, "
                            "openpose (default: none)")
    group.add_argument("--control-scale", action="append", type=finite_float, default=SUPPRESS, metavar="W",
                       help="conditioning scale, A1111's weight (default: 1)")
    group.add_argument("--control-start", action="append", type=finite_float, default=SUPPRESS, metavar="F",
                       help="fraction of the steps before which it is off (default: 0)")
    group.add_argument("--control-end", action="append", type=finite_float, default=SUPPRESS, metavar="F",
                       help="fraction of the steps after which it is off (default: 1)")
    group.add_argument("--control-mode", action="append", choices=CONTROL_MODES, default=SUPPRESS,
                       help="A1111's control mode: balanced, prompt or controlnet (is more important)")
    group.add_argument("--control-resize", action="append", choices=RESIZE_MODES, default=SUPPRESS,
                       help="how the control image is fitted to the image size (default: just_resize)")
    group.add_argument("--trust-pickle", action="store_true",
                       help="allow .pth/.ckpt ControlNet files (read with weights_only=True)")


def control_values(given: dict, stored: list[dict]) -> list[dict]:
    """The controls (as dicts) from the flags in `given` (argparse's namespace as a dict) over the `stored`
    ones (--from's PNG): --controlnet replaces them, other control flags change them."""
    controls = [{"model": path} for path in given["controlnet"]] if "controlnet" in given else \
        [dict(control) for control in stored]
    flags = [name for name in ("control_image", *SETTING_FLAGS) if name in given]
    if flags and not controls:
        raise UserError(f"--{flags[0].replace('_', '-')} needs --controlnet PATH")
    images = given.get("control_image")
    if "controlnet" in given and images is None or images is not None and len(images) != len(controls):
        raise UserError(f"give one --control-image per --controlnet: got {len(images or [])} for "
                        f"{len(controls)}")
    for control, image in zip(controls, images or []):
        control.update(image=image, image_hash=None)
    for name, field in SETTING_FLAGS.items():
        values = given.get(name, [])
        if len(values) not in (0, 1, len(controls)):
            raise UserError(f"--{name.replace('_', '-')} is given {len(values)} times for {len(controls)} "
                            "ControlNets: give it once per --controlnet, or once for all")
        for control, value in zip(controls, values * len(controls) if len(values) == 1 else values):
            control[field] = value
    return controls


def attach_controls(pipe, request: GenerationRequest, *, trust_pickle: bool,
                    replaying: bool) -> GenerationRequest:
    """Load the request's ControlNets into `pipe` (a TextToImage) and return the request with their hashes;
    when `replaying`, warn on a ControlNet whose hash differs from the recorded one."""
    controls = []
    for control in request.controls:
        if control.model not in pipe.controlnets:
            pipe.load_controlnet(control.model, trust_pickle=trust_pickle)
        digest = pipe.controlnets[control.model].hash
        if replaying and control.model_hash not in (None, digest):
            print(f"warning: the ControlNet {control.model} has hash {digest}, recorded "
                  f"{control.model_hash}: the image will differ", file=sys.stderr)
        controls.append(replace(control, model_hash=digest))
    return replace(request, controls=tuple(controls))
