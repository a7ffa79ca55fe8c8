"""Load and save a diffusers Stable Diffusion folder: model_index.json plus one subfolder per component.

    model_index.json
    unet/config.json           unet/diffusion_pytorch_model[.fp16].safetensors
    vae/config.json            vae/diffusion_pytorch_model[.fp16].safetensors
    text_encoder/config.json   text_encoder/model[.fp16].safetensors
    tokenizer/                 vocab.json, merges.txt (or tokenizer.json), special tokens
    scheduler/scheduler_config.json

Our module names are diffusers' and transformers', so loading is: config.json into our dataclass, a strict
key and shape check, and the file's tensors assigned in place (see `components.materialize`). SD 2.x folders
have the same layout (an OpenCLIP text encoder stored as a transformers CLIPTextModel); `vae/` may hold
TAESD's AutoencoderTiny, and `load_vae_folder` reads one autoencoder folder on its own (to replace a model's VAE).
"""

import json
from pathlib import Path

import torch

from nanodiffusion.atomic import atomic_write
from nanodiffusion.errors import UserError
from nanodiffusion.nets.clip_text import CLIPTextConfig
from nanodiffusion.nets.sd_unet import SDUNetConfig
from nanodiffusion.nets.taesd import AutoencoderTiny, AutoencoderTinyConfig
from nanodiffusion.nets.vae import AutoencoderKL, VAEConfig
from nanodiffusion.tokenizer import CLIP_MAX_LENGTH, CLIPTokenizer
from nanodiffusion.weights.components import SDComponents, materialize
from nanodiffusion.weights.families import check_pipeline_class, check_unet_inputs
from nanodiffusion.weights.original_keys import DEPRECATED_VAE_ATTENTION, IGNORED_DIFFUSERS_KEYS
from nanodiffusion.weights.safe_load import read_pickle, read_safetensors, sniff, write_safetensors

WEIGHT_NAMES = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model",
                "controlnet": "diffusion_pytorch_model"}
CONFIG_READERS = {"unet": SDUNetConfig.from_diffusers_config, "vae": VAEConfig.from_diffusers_config,
                  "text_encoder": CLIPTextConfig.from_transformers_config}
# The autoencoders a `vae/` folder may hold, by config.json's _class_name.
VAE_READERS = {"AutoencoderKL": VAEConfig.from_diffusers_config,
               "AutoencoderTiny": AutoencoderTinyConfig.from_diffusers_config}
LIBRARIES = {"unet": ("diffusers", "UNet2DConditionModel"), "vae": ("diffusers", "AutoencoderKL"),
             "text_encoder": ("transformers", "CLIPTextModel"),
             "tokenizer": ("transformers", "CLIPTokenizer")}
PIPELINE_CLASS = "StableDiffusionPipeline"


def weight_files(folder: Path, base: str, variant: str | None) -> list[Path]:
    """The weight file(s) of one component, safetensors first: one file, the shards of an index, or a .bin."""
    suffix = f".{variant}" if variant else ""
    single = folder / f"{base}{suffix}.safetensors"
    index = folder / f"{base}.safetensors.index{suffix}.json"
    legacy = folder / f"{base}{suffix}.bin"
    if single.is_file():
        return [single]
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    if legacy.is_file():
        return [legacy]
    present = sorted(p.name for p in folder.glob("*") if p.suffix in (".safetensors", ".bin"))
    hint = (f"; found {', '.join(present)}" + ("" if variant else " (pass variant=... for a variant file)")
            if present else "")
    raise UserError(f"no {single.name} in {folder}{hint}")


def read_component(folder: Path, component: str, variant: str | None) -> dict[str, torch.Tensor]:
    """The component's tensors (memory-mapped) under our key names."""
    tensors = {}
    for path in weight_files(folder, WEIGHT_NAMES[component], variant):
        # a diffusers .bin is read with weights_only=True, which only rebuilds tensors and plain containers
        tensors.update(read_safetensors(path)[0] if sniff(path) == "safetensors" else read_pickle(path))
    if component == "text_encoder" and not any(key.startswith("text_model.") for key in tensors):
        # transformers >= 5 writes CLIPTextModel keys without `text_model.`; published files have it
        tensors = {f"text_model.{key}": value for key, value in tensors.items()}
    ignored = IGNORED_DIFFUSERS_KEYS.get(component, frozenset())
    tensors = {key: value for key, value in tensors.items() if key not in ignored}
    if component == "vae":
        tensors = {_modern_vae_name(key): value for key, value in tensors.items()}
    return tensors


def _modern_vae_name(key: str) -> str:
    module, _, leaf = key.rpartition(".")
    parent, _, name = module.rpartition(".")
    if ".mid_block.attentions." in module and name in DEPRECATED_VAE_ATTENTION:
        return f"{parent}.{DEPRECATED_VAE_ATTENTION[name]}.{leaf}"
    return key


def read_json(path: Path) -> dict:
    """A JSON object from `path`, with a clear error when it is missing or malformed."""
    if not path.is_file():
        raise UserError(f"missing {path}: not a complete diffusers folder")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a JSON object")
    return data


def read_tokenizer(folder: Path) -> CLIPTokenizer:
    """The CLIP tokenizer of `folder`: vocab.json + merges.txt, or only tokenizer.json (transformers >= 5)."""
    if (folder / "vocab.json").is_file() or not (folder / "tokenizer.json").is_file():
        return CLIPTokenizer.from_pretrained(folder)
    stored = read_json(folder / "tokenizer.json")
    model = stored.get("model", {})
    if model.get("type") != "BPE":
        raise UserError(f"{folder / 'tokenizer.json'} does not hold a BPE tokenizer")
    merges = [tuple(pair) if isinstance(pair, list) else tuple(pair.split(" ")) for pair in model["merges"]]
    config_file = folder / "tokenizer_config.json"
    config = read_json(config_file) if config_file.is_file() else {}
    specials = {name: value["content"] if isinstance(value, dict) else value for name, value in config.items()
                if name in ("bos_token", "eos_token", "pad_token", "unk_token") and value}
    return CLIPTokenizer(model["vocab"], merges, model_max_length=_context_length(folder, config, stored),
                         **specials)


def _context_length(folder: Path, config: dict, tokenizer: dict) -> int:
    """Tokens per prompt, from wherever the folder states it: tokenizer_config.json's model_max_length,
    tokenizer.json's truncation or fixed padding, the text encoder's max_position_embeddings; else CLIP's."""
    padding = (tokenizer.get("padding") or {}).get("strategy")
    encoder = folder.parent / "text_encoder" / "config.json"
    for length in (config.get("model_max_length"), (tokenizer.get("truncation") or {}).get("max_length"),
                   padding.get("Fixed") if isinstance(padding, dict) else None,
                   read_json(encoder).get("max_position_embeddings") if encoder.is_file() else None):
        # transformers writes a huge integer when a tokenizer has no limit: that says nothing
        if isinstance(length, int) and not isinstance(length, bool) and 3 <= length <= 1_000_000:
            return length
    return CLIP_MAX_LENGTH


def load_diffusers(folder: str | Path, *, dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu", variant: str | None = None,
                   memory_format: torch.memory_format = torch.preserve_format) -> SDComponents:
    """Load a diffusers SD v1.x / 2.x folder into our networks, tokenizer and config dicts."""
    folder = Path(folder)
    model_index = read_json(folder / "model_index.json")
    check_pipeline_class(model_index, folder)
    configs = {component: read_config(read_json(folder / component / "config.json"))
               for component, read_config in CONFIG_READERS.items() if component != "vae"}
    configs["vae"] = read_vae_config(read_json(folder / "vae" / "config.json"))
    check_unet_inputs(configs["unet"].in_channels, configs["vae"].latent_channels, f"{folder / 'unet'}")
    networks = {}
    for component, config in configs.items():
        state = read_component(folder / component, component, variant)
        networks[component] = materialize(component, config, state, dtype=dtype, device=device,
                                          what=f"{folder / component}", memory_format=memory_format)
    return SDComponents(**networks, tokenizer=read_tokenizer(folder / "tokenizer"),
                        scheduler_config=read_json(folder / "scheduler" / "scheduler_config.json"),
                        model_index=model_index)


def read_vae_config(data: dict) -> VAEConfig | AutoencoderTinyConfig:
    """Our config for a diffusers autoencoder config.json: AutoencoderKL's or TAESD's AutoencoderTiny's."""
    name = data.get("_class_name", "AutoencoderKL")
    if name not in VAE_READERS:
        raise UserError(f"unsupported autoencoder {name!r}; valid: {', '.join(VAE_READERS)}")
    return VAE_READERS[name](data)


def load_vae_folder(folder: str | Path, *, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu", variant: str | None = None,
                    memory_format: torch.memory_format = torch.preserve_format,
                    ) -> AutoencoderKL | AutoencoderTiny:
    """Load one diffusers autoencoder folder (config.json + diffusion_pytorch_model.safetensors), such as
    madebyollin/taesd or stabilityai/sd-vae-ft-mse; a model folder's `vae/` is taken too."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"no such autoencoder folder: {folder}")
    if not (folder / "config.json").is_file() and (folder / "vae" / "config.json").is_file():
        folder = folder / "vae"
    config = read_vae_config(read_json(folder / "config.json"))
    state = read_component(folder, "vae", variant)
    return materialize("vae", config, state, dtype=dtype, device=device, what=f"{folder}",
                       memory_format=memory_format)


def write_json(path: Path, data: dict) -> None:
    """Write `data` as indented JSON, atomically."""
    with atomic_write(path) as file:
        file.write((json.dumps(data, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def save_diffusers(components: SDComponents, folder: str | Path, *, variant: str | None = None) -> None:
    """Write `components` as a diffusers folder that `StableDiffusionPipeline.from_pretrained` loads.

    Weights are written in their current dtype (`variant="fp16"` names the files `*.fp16.safetensors`);
    model_index.json comes last, so an interrupted save does not look like a complete folder.
    """
    if components.tokenizer is None:
        raise UserError("these components have no tokenizer (a single file holds none, and its text encoder "
                        "is not CLIP's): load one with CLIPTokenizer.from_pretrained(folder) and set "
                        "components.tokenizer (CLI: --tokenizer)")
    folder = Path(folder)
    suffix = f".{variant}" if variant else ""
    configs = {"unet": components.unet.config.to_diffusers_config(),
               "vae": components.vae.config.to_diffusers_config(),
               "text_encoder": components.text_encoder.config.to_transformers_config()}
    for component, network in components.networks().items():
        write_json(folder / component / "config.json", configs[component])
        weights = folder / component / f"{WEIGHT_NAMES[component]}{suffix}.safetensors"
        write_safetensors(network.state_dict(), weights, metadata={"format": "pt"})
    components.tokenizer.save_pretrained(folder / "tokenizer")
    scheduler = components.scheduler_config
    write_json(folder / "scheduler" / "scheduler_config.json", scheduler)
    libraries = {**LIBRARIES, "vae": ("diffusers", configs["vae"]["_class_name"])}
    write_json(folder / "model_index.json", {
        "_class_name": PIPELINE_CLASS, **{name: list(library) for name, library in libraries.items()},
        "scheduler": ["diffusers", scheduler.get("_class_name", "PNDMScheduler")],
        "safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False,
    })
