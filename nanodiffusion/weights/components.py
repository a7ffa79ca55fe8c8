"""The loaded parts of a Stable Diffusion model, and building one network from a state dict without a copy.

Networks are built on the `meta` device (shapes only, no memory), checked key by key and shape by shape
against the state dict, and then take its tensors with `load_state_dict(assign=True)`. The tensors come
memory-mapped from the file (see `safe_load`): when the file's dtype is the one asked for, the parameters
*are* the mapped file pages; otherwise each tensor is converted on its own, so at most one converted copy of
the weights exists, plus one source tensor in flight (whose file pages are then given back: `file_pages`).
"""

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from nanodiffusion.errors import UserError
from nanodiffusion.nets.clip_text import CLIPTextConfig, CLIPTextModel
from nanodiffusion.nets.controlnet import ControlNet, ControlNetConfig
from nanodiffusion.nets.sd_unet import SDUNet, SDUNetConfig
from nanodiffusion.nets.taesd import AutoencoderTiny, AutoencoderTinyConfig
from nanodiffusion.nets.vae import AutoencoderKL, VAEConfig
from nanodiffusion.tokenizer import CLIPTokenizer
from nanodiffusion.weights import file_pages

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
NETWORKS = {"unet": (SDUNet, SDUNetConfig), "vae": (AutoencoderKL, VAEConfig),
            "text_encoder": (CLIPTextModel, CLIPTextConfig),
            "taesd": (AutoencoderTiny, AutoencoderTinyConfig)}        # a replacement VAE
# Networks loaded beside a model rather than as one of its components.
ADDED_NETWORKS = {"controlnet": (ControlNet, ControlNetConfig)}
_SHOWN = 20             # names listed in an error before "... and N more"

# SD v1.x's scheduler/scheduler_config.json (runwayml/stable-diffusion-v1-5), for files that carry none.
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False,
    "trained_betas": None,
}


@dataclass
class SDComponents:
    """A Stable Diffusion v1.x or 2.x model: the three networks (the VAE may be TAESD's tiny one), the
    tokenizer (None when the source has none, as single files) and the diffusers scheduler and pipeline
    configs as plain dicts.
    """

    unet: SDUNet
    vae: AutoencoderKL | AutoencoderTiny
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer | None = None
    scheduler_config: dict = field(default_factory=lambda: dict(SD15_SCHEDULER))
    model_index: dict = field(default_factory=dict)

    def networks(self) -> dict[str, torch.nn.Module]:
        """{"unet": ..., "vae": ..., "text_encoder": ...}."""
        return {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder}


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A torch floating dtype from itself or from "fp32" / "fp16" / "bf16"."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise UserError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
        return DTYPES[dtype]
    if dtype not in DTYPES.values():
        raise UserError(f"dtype must be one of {', '.join(map(str, DTYPES.values()))}, got {dtype}")
    return dtype


def _listing(names) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more


def check_state_dict(expected: Mapping[str, torch.Size], state: Mapping[str, torch.Tensor],
                     what: str) -> None:
    """Raise a UserError naming every missing key, unexpected key and shape mismatch of `state`."""
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    wrong = [f"{key} is {tuple(state[key].shape)}, expected {tuple(shape)}"
             for key, shape in expected.items() if key in state and state[key].shape != shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {_listing(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} with the wrong shape: {_listing(wrong)}")
    if problems:
        raise UserError(f"{what} does not match its config; keys " + "; ".join(problems))


def build_on_meta(component: str, config) -> torch.nn.Module:
    """`component`'s network for `config` (its class follows the config's) on the meta device (no memory)."""
    network_class = next(network for network, config_class in (NETWORKS | ADDED_NETWORKS).values()
                         if isinstance(config, config_class))
    with torch.device("meta"):
        return network_class(config)


def expected_shapes(module: torch.nn.Module) -> dict[str, torch.Size]:
    """{key: shape} of the module's state dict (works on the meta device)."""
    return {key: value.shape for key, value in module.state_dict().items()}


def materialize(component: str, config, state: Mapping[str, torch.Tensor], *, dtype: torch.dtype,
                device: str | torch.device, what: str,
                memory_format: torch.memory_format = torch.preserve_format) -> torch.nn.Module:
    """Build `component`'s network for `config` from `state` (checked strictly), in `dtype` on `device`,
    its 4-D (conv) weights in `memory_format`.

    Tensors already in `dtype` on `device` and in that layout are used as they are (memory-mapped file pages
    stay shared); the others are converted in one copy each.
    """
    module = build_on_meta(component, config)
    check_state_dict(expected_shapes(module), state, what)
    # one tensor at a time, the file pages of each converted source given back: the only new memory is the
    # converted weights themselves
    tensors = file_pages.convert(dict(state), lambda value: value.to(
        device=device, dtype=dtype if value.is_floating_point() else value.dtype,
        memory_format=memory_format if value.dim() == 4 else torch.preserve_format))
    module.load_state_dict(tensors, strict=True, assign=True)
    left = [name for name, tensor in [*module.named_parameters(), *module.named_buffers()] if tensor.is_meta]
    if left:
        # A non-persistent buffer is not in any file: a network must compute such tensors in forward()
        # (as CLIPEmbeddings does with its positions) for meta-device loading to work.
        raise AssertionError(f"{type(module).__name__} tensors not loaded (still on meta): {left}")
    return module.eval()
