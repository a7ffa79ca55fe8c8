"""What a generated PNG says about itself: AUTOMATIC1111's `parameters` text and our exact settings as JSON.

The `parameters` chunk is what A1111, ComfyUI, Civitai and most image viewers read:

    a photo of a cat
    Negative prompt: blurry
    Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 42, Size: 512x512, Model hash: 6ce0161689, Model: v1-5

The `nanodiffusion` chunk holds the GenerationRequest, the model and the dtype as JSON: enough for
`nanodiffusion generate --from IMAGE.png` to make the same image again, bit for bit on the same device.
"""

import json
from dataclasses import dataclass
from pathlib import Path

from nanodiffusion import __version__
from nanodiffusion.diffusion.samplers import SAMPLERS, resolve_sampler, sampler_options
from nanodiffusion.diffusion.sampling_plan import SIGMA_SCHEDULES
from nanodiffusion.errors import UserError
from nanodiffusion.validation import json_object

PARAMETERS_KEY = "parameters"
SETTINGS_KEY = "nanodiffusion"
SETTINGS_FORMAT = 1
# A1111's infotext names of the standard sampler options (its k-diffusion samplers' "Eta", its DDIM's
# "Eta DDIM"); like A1111 the text names an option only where it differs from the sampler's default.
OPTION_LABELS = {"eta": "Eta", "s_churn": "Sigma churn", "s_tmin": "Sigma tmin", "s_tmax": "Sigma tmax",
                 "s_noise": "Sigma noise"}

@dataclass(frozen=True)
class ModelRecord:
    """The model as the PNG text records it."""

    argument: str                   # the model as given (--model): a built-in name, a path or a repo id
    path: Path                      # where it was loaded from
    hash: str | None                # A1111's "Model hash"
    dtype: str                      # "fp32", "fp16" or "bf16"
    device: str                     # device type: "cpu", "cuda"
    vae_tile: int | None = None     # latent pixels per tile when the VAE decoded in tiles
    loras: tuple[tuple[str, float], ...] = ()   # LoRA files applied to every image (generate --lora PATH:W)
    lora_dir: str | None = None     # where <lora:NAME:W> in prompts was looked up
    embeddings_dir: str | None = None   # the textual-inversion embeddings loaded
    vae: str | None = None          # the autoencoder that replaced the model's (--vae), as given
    vae_hash: str | None = None     # A1111's "VAE hash" of its weights

    @property
    def name(self) -> str:
        """A1111's "Model": the file's stem or the folder's name."""
        return self.path.stem if self.path.is_file() else Path(self.argument).name


def png_text(request, model: ModelRecord, *, img2img: bool = False,
             lora_hashes: dict[str, str] | None = None) -> dict[str, str]:
    """Both text chunks of an image of `request` (one prompt, its seed filled in) made by `model`, from an
    init image if `img2img`, with the LoRAs `lora_hashes` ({name: A1111 short hash}) active."""
    vae = {"vae_name": Path(model.vae).name, "vae_hash": model.vae_hash} if model.vae is not None else {}
    return {PARAMETERS_KEY: a1111_parameters(request, model.name, model.hash, img2img=img2img,
                                             lora_hashes=lora_hashes, **vae),
            SETTINGS_KEY: settings_json(request, model, img2img=img2img, lora_hashes=lora_hashes)}


def a1111_parameters(request, model_name: str | None, model_hash: str | None, *,
                     img2img: bool = False, lora_hashes: dict[str, str] | None = None,
                     vae_name: str | None = None, vae_hash: str | None = None) -> str:
    """A1111's infotext for one image of `request` (a GenerationRequest with one prompt and seed filled in),
    with its "Denoising strength" if it was made from an init image (`img2img`), its "Lora hashes" if any,
    and the VAE that replaced the model's (`vae_name`, `vae_hash`).

    As A1111: no negative line when there is no negative prompt, no schedule type for the sampler's own, and
    values holding a comma, colon or newline are written as JSON strings.
    """
    lines = [request.prompts[0]]
    negative = request.negative_prompts[0]
    if negative:
        lines.append(f"Negative prompt: {negative}")
    settings = {
        "Steps": request.num_steps,
        "Sampler": SAMPLERS[resolve_sampler(request.sampler)].a1111,
        "Schedule type": SIGMA_SCHEDULES[request.sigma_schedule].a1111 if request.sigma_schedule != "default"
        else None,
        "CFG scale": f"{request.guidance_scale:g}",
        "Seed": request.seed,
        "Size": f"{request.width}x{request.height}",
        "Model hash": model_hash,
        "Model": model_name,
        "VAE hash": vae_hash,
        "VAE": vae_name,
        "Denoising strength": f"{request.strength:g}" if img2img else None,
        "Clip skip": request.clip_skip if request.clip_skip != 1 else None,
        "Token merging ratio": f"{request.tome_ratio:g}" if request.tome_ratio else None,
        **_option_labels(request),
        "Lora hashes": ", ".join(f"{name}: {digest}" for name, digest in lora_hashes.items())
        if lora_hashes else None,
        **{f"ControlNet {k}": control_parameters(control) for k, control in enumerate(request.controls)},
        "Version": f"nanodiffusion {__version__}",
    }
    lines.append(", ".join(f"{key}: {_quote(str(value))}" for key, value in settings.items()
                           if value is not None))
    return "\n".join(lines)


# A1111's ControlNet extension writes its units into the infotext in these words
A1111_RESIZE_NAMES = {"just_resize": "Just Resize", "crop_and_resize": "Crop and Resize",
                      "resize_and_fill": "Resize and Fill"}
A1111_CONTROL_MODE_NAMES = {"balanced": "Balanced", "prompt": "My prompt is more important",
                            "controlnet": "ControlNet is more important"}


def control_parameters(control) -> str:
    """One ControlNet unit (a ControlSettings) as the A1111 extension's infotext value."""
    name = Path(control.model).stem if Path(control.model).suffix else Path(control.model).name
    model = f"{name} [{control.model_hash[:8]}]" if control.model_hash else name
    fields = {"Module": control.preprocess, "Model": model, "Weight": f"{control.scale:g}",
              "Resize Mode": A1111_RESIZE_NAMES[control.resize_mode],
              "Processor Res": control.processor_res or None, "Threshold A": None, "Threshold B": None,
              "Guidance Start": f"{control.start:g}", "Guidance End": f"{control.end:g}",
              "Pixel Perfect": control.preprocess != "none" and control.processor_res is None,
              "Control Mode": A1111_CONTROL_MODE_NAMES[control.control_mode]}
    if control.preprocess == "canny":
        fields.update({"Threshold A": f"{control.low_threshold:g}",
                       "Threshold B": f"{control.high_threshold:g}"})
    return ", ".join(f"{key}: {value}" for key, value in fields.items() if value is not None)
def _option_labels(request) -> dict[str, object]:
    """A1111's infotext entries of the request's sampler options that differ from the sampler's defaults."""
    sampler = resolve_sampler(request.sampler)
    defaults = sampler_options(sampler)
    labels = {**OPTION_LABELS, "eta": "Eta DDIM" if sampler == "ddim" else "Eta"}
    return {labels[name]: value for name, value in request.sampler_options.items()
            if name in labels and value != defaults[name]}


def _quote(value: str) -> str:
    return json.dumps(value, ensure_ascii=False) if any(c in value for c in ",:\n") else value


def settings_json(request, model: ModelRecord, *, img2img: bool = False,
                  lora_hashes: dict[str, str] | None = None) -> str:
    """Our own text chunk: the request and what else decides the pixels (model, dtype, device, the VAE tile
    size when the image was decoded in tiles, the autoencoder when --vae replaced the model's, whether an
    init image, which the PNG does not hold, did, and the adapters when there are any)."""
    run = {"model": model.argument, "model_hash": model.hash, "dtype": model.dtype, "device": model.device}
    if model.vae_tile is not None:
        run["vae_tile"] = model.vae_tile
    if model.vae is not None:
        run.update(vae=model.vae, vae_hash=model.vae_hash)
    if img2img:
        run["img2img"] = True
    adapters = {"loras": [list(lora) for lora in model.loras], "lora_dir": model.lora_dir,
                "embeddings_dir": model.embeddings_dir, "lora_hashes": lora_hashes}
    run.update({key: value for key, value in adapters.items() if value})
    return json.dumps({"format": SETTINGS_FORMAT, "version": __version__, "request": request.to_dict(),
                       **run}, ensure_ascii=False)


def read_settings(text: dict[str, str], source: str) -> dict:
    """The `nanodiffusion` settings from a PNG's text chunks; a UserError when there are none."""
    if SETTINGS_KEY not in text:
        raise UserError(f"{source} holds no nanodiffusion settings: it was not written by "
                        "`nanodiffusion generate`")
    settings = json_object(text[SETTINGS_KEY], f"{source}: the nanodiffusion settings text")
    if settings.get("format") != SETTINGS_FORMAT:
        raise UserError(f"{source}: unknown settings format {settings.get('format')!r}; "
                        f"this version reads format {SETTINGS_FORMAT}")
    for key, kinds in _SETTINGS_TYPES.items():
        value = settings.get(key)
        if not isinstance(value, kinds) or isinstance(value, bool):
            names = " or ".join("null" if kind is type(None) else _JSON_NAMES[kind] for kind in kinds)
            raise UserError(f"{source}: the nanodiffusion settings' {key!r} must be {names}, got {value!r}")
    return settings


# format 1: what each entry of our text chunk holds (null: not recorded); a tampered chunk is an error
_SETTINGS_TYPES = {"request": (dict,), "model": (str,), "dtype": (str,), "model_hash": (str, type(None)),
                   "device": (str, type(None)), "vae_tile": (int, type(None))}
_JSON_NAMES = {dict: "an object", str: "a string", int: "an integer"}
