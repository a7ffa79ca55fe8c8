"""ControlNets in the server, in the shape of A1111's ControlNet extension: the files of `serve
--controlnet-dir` folders (`GET /controlnet/model_list`), the units of a txt2img/img2img body
(`alwayson_scripts: {"controlnet": {"args": [unit, ...]}}`) read into our ControlSettings, and the networks
loaded for the worker.

Clients name a ControlNet by its file name, its name or A1111's title "name [hash]" (the hash part is not
compared: clients keep titles written on other machines); a name is looked up among the files found, never
opened as a path. Pickled files (.pth) are not served.
"""

import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from nanodiffusion.control_images.resize import A1111_RESIZE_MODES
from nanodiffusion.errors import UserError
from nanodiffusion.pipelines.request import ControlSettings
from nanodiffusion.weights.diffusers_folder import read_json
from nanodiffusion.weights.models import model_hash

MODULES = ("none", "canny")             # the extension's preprocessors we run (others need a model download)
CONTROL_MODES = {0: "balanced", 1: "prompt", 2: "controlnet", "Balanced": "balanced",
                 "My prompt is more important": "prompt", "ControlNet is more important": "controlnet"}
DEFAULT_PROCESSOR_RES = 512             # the extension's -1
CANNY_DEFAULTS = (100.0, 200.0)         # its thresholds for canny when a unit sends -1
MAX_UNITS = 4
MAX_LOADED = 4                          # ControlNets kept in memory between jobs
IGNORED_UNIT_FIELDS = frozenset((
    "low_vram hr_option is_ui loopback save_detected_map guessmode input_mode batch_images output_dir "
    "loopback_image inpaint_crop_input_image"
).split())


class ControlNetUnitBody(BaseModel):
    """One unit of the extension's API (`webuiapi.ControlNetUnit.to_dict()` sends these fields); fields we
    do not implement are accepted when they are the extension's and ask nothing we cannot do."""

    model_config = ConfigDict(strict=True, extra="allow")

    enabled: bool = True
    image: str | dict[str, Any] | None = Field(None, description='base64 image, or {"image": ...}')
    input_image: str | None = Field(None, description="the extension's older name for image")
    mask: str | None = Field(None, description="not supported (inpainting ControlNets)")
    module: str = Field("none", description=f"preprocessor: {', '.join(MODULES)}")
    model: str = Field("None", description="a ControlNet of GET /controlnet/model_list")
    weight: float = Field(1.0, ge=0, le=10)
    resize_mode: str | int = Field("Crop and Resize", description="Just Resize, Crop and Resize, Resize and "
                                                                  "Fill (or 0, 1, 2)")
    processor_res: int = Field(-1, ge=-1, le=4096, description="canny's resolution; -1: 512")
    threshold_a: float = Field(-1, description="canny's low threshold; -1: 100")
    threshold_b: float = Field(-1, description="canny's high threshold; -1: 200")
    guidance_start: float = Field(0.0, ge=0, le=1)
    guidance_end: float = Field(1.0, ge=0, le=1)
    control_mode: str | int = Field(0, description="0 Balanced, 1 My prompt is more important, 2 ControlNet "
                                                   "is more important (or those names)")
    pixel_perfect: bool = False

    @model_validator(mode="after")
    def _supported(self):
        unknown = sorted(set(self.model_extra) - IGNORED_UNIT_FIELDS)
        problems = [f"unknown field {', '.join(unknown)}"] if unknown else []
        if self.module not in MODULES:
            problems.append(f"module {self.module!r} is not available here; valid: {', '.join(MODULES)} "
                            "(send a finished map, e.g. a pose skeleton, with module none)")
        if A1111_RESIZE_MODES.get(self.resize_mode) is None:
            problems.append(f"resize_mode {self.resize_mode!r} is not one of "
                            f"{', '.join(map(repr, A1111_RESIZE_MODES))}")
        if self.control_mode not in CONTROL_MODES:
            problems.append(f"control_mode {self.control_mode!r} is not one of "
                            f"{', '.join(map(repr, CONTROL_MODES))}")
        if self.mask or isinstance(self.image, dict) and self.image.get("mask"):
            problems.append("mask: inpainting ControlNets are not supported")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def image_data(self) -> str | None:
        image = self.image.get("image") if isinstance(self.image, dict) else self.image
        return image or self.input_image or None

    def settings(self, model: str, digest: str | None) -> ControlSettings:
        """Our settings for this unit, run by the ControlNet `model` (its file name) of hash `digest`."""
        canny = self.module == "canny"
        low, high = (value if value >= 0 else default
                     for value, default in zip((self.threshold_a, self.threshold_b), CANNY_DEFAULTS))
        processor_res = None if not canny or self.pixel_perfect else \
            (self.processor_res if self.processor_res > 0 else DEFAULT_PROCESSOR_RES)
        return ControlSettings(model, digest, preprocess=self.module, scale=self.weight,
                               start=self.guidance_start, end=self.guidance_end,
                               control_mode=CONTROL_MODES[self.control_mode],
                               resize_mode=A1111_RESIZE_MODES[self.resize_mode],
                               processor_res=processor_res, **(dict(low_threshold=low, high_threshold=high)
                                                               if canny else {}))


def controlnet_units(alwayson_scripts: dict[str, Any]) -> list[ControlNetUnitBody]:
    """The enabled ControlNet units of a body's `alwayson_scripts` (the script's name in any case, as the
    extension matches it); a UserError names a malformed one."""
    scripts = {name.lower(): value for name, value in alwayson_scripts.items()}
    script = scripts.get("controlnet")
    if script is None:
        return []
    args = script.get("args") if isinstance(script, dict) else None
    if not isinstance(args, list):
        raise UserError('alwayson_scripts.controlnet: expected {"args": [unit, ...]}')
    units = []
    for k, unit in enumerate(args):
        try:
            units.append(ControlNetUnitBody.model_validate(unit))
        except ValueError as error:             # pydantic's ValidationError is a ValueError
            lines = [line for line in str(error).splitlines()[1:] if line.strip()]
            raise UserError(f"alwayson_scripts.controlnet.args.{k}: {' '.join(lines)}") from None
    units = [unit for unit in units if unit.enabled and unit.model not in ("None", "")]
    if len(units) > MAX_UNITS:
        raise UserError(f"alwayson_scripts.controlnet: at most {MAX_UNITS} enabled units, got {len(units)}")
    return units


@dataclass(frozen=True)
class ControlNetEntry:
    """A ControlNet file or diffusers folder that clients may use: `filename` relative to its folder."""

    filename: str
    path: Path

    @property
    def name(self) -> str:
        return Path(self.filename).stem if self.path.is_file() else Path(self.filename).name


class ControlNetRegistry:
    """The ControlNets of the `dirs` (`.safetensors` files and diffusers ControlNet folders), and the last
    MAX_LOADED of them loaded."""

    def __init__(self, dirs: list[Path] = ()):
        self.dirs = list(dirs)
        self.hashes: dict[Path, str] = {}
        self.loaded: OrderedDict[tuple, object] = OrderedDict()
        self.refresh()

    def refresh(self) -> None:
        """Scan the folders again."""
        self.entries = {}
        for root in self.dirs:
            folders = []                            # a diffusers folder's own files are not listed
            for path in sorted(root.rglob("*")):
                if any(folder in path.parents for folder in folders):
                    continue
                is_file = path.suffix == ".safetensors" and path.is_file()
                is_folder = (path / "config.json").is_file() and _is_controlnet_config(path / "config.json")
                folders += [path] if is_folder else []
                if is_file or is_folder:
                    filename = path.relative_to(root).as_posix()
                    self.entries.setdefault(filename, ControlNetEntry(filename, path))

    def title(self, entry: ControlNetEntry) -> str:
        """The extension's "name [hash]" (8 hex digits; hashes are cached with the files' sizes and times)."""
        return f"{entry.name} [{self.hash(entry)[:8]}]"

    def hash(self, entry: ControlNetEntry) -> str:
        """A1111's hash of the entry's weights (weights.models.model_hash)."""
        if entry.path not in self.hashes:
            self.hashes[entry.path] = model_hash(entry.path)
        return self.hashes[entry.path]

    def find(self, name: str) -> ControlNetEntry:
        """The ControlNet a unit names; a UserError listing them if none."""
        bare = re.sub(r"\s*\[[0-9a-fA-F]*\]$", "", name)
        for entry in self.entries.values():
            if bare in (entry.filename, entry.name):
                return entry
        names = ", ".join(self.title(entry) for entry in self.entries.values()) or "none (serve with " \
                                                                                   "--controlnet-dir DIR)"
        raise UserError(f"ControlNet model {name!r} is not here; available: {names}")

    def network(self, entry: ControlNetEntry, pipe):
        """The ControlNet of `entry` loaded for `pipe` (its dtype and device; checked to fit its UNet)."""
        from nanodiffusion.weights.controlnet import load_controlnet

        key = (entry.path, pipe.dtype, str(pipe.device), pipe.unet.config)
        if key not in self.loaded:
            try:
                self.loaded[key] = load_controlnet(entry.path, dtype=pipe.dtype, device=pipe.device,
                                                   unet=pipe.unet.config)
            except UserError as error:              # its message names the file: not its folder
                raise UserError(str(error).replace(str(entry.path), entry.filename)) from None
            while len(self.loaded) > MAX_LOADED:
                self.loaded.popitem(last=False)
        self.loaded.move_to_end(key)
        return self.loaded[key]


@dataclass(frozen=True)
class ControlInput:
    """A unit made ready for the worker: its settings, its control image and its network."""

    settings: ControlSettings
    image: object                       # PIL image
    network: object                     # ControlNet


def read_controls(units: list[ControlNetUnitBody], registry: ControlNetRegistry, pipe,
                  max_pixels: int) -> list[ControlInput]:
    """The units' images decoded and networks loaded (slow: run off the event loop); a UserError names the
    unit at fault."""
    from nanodiffusion.server.a1111_images import decode_image

    inputs = []
    for k, unit in enumerate(units):
        where = f"alwayson_scripts.controlnet.args.{k}"
        if unit.image_data is None:
            raise UserError(f"{where}.image: a ControlNet unit needs its control image")
        image = decode_image(unit.image_data, f"{where}.image", max_pixels)
        entry = registry.find(unit.model)
        network = registry.network(entry, pipe)
        inputs.append(ControlInput(unit.settings(entry.filename, registry.hash(entry)), image, network))
    return inputs


def _is_controlnet_config(path: Path) -> bool:
    try:
        return read_json(path).get("_class_name") == "ControlNetModel"
    except (UserError, OSError, ValueError, AttributeError):
        return False
