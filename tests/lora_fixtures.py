"""LoRA and textual-inversion files in each published layout, written from random tensors (never downloaded).

`lora_layers(networks, ...)` draws a LoRA for our networks' modules, {(network, module): (down, up)}; the
writers store it as kohya/A1111 (diffusers' or the original single-file module names), diffusers/PEFT, or
diffusers < 0.21 keys.
"""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from nanodiffusion.weights.original_keys import PREFIXES, rename_table
from fixtures import ours_from_diffusers, tiny_diffusers_pipeline

# kohya's default targets (the Linear and 1x1-conv layers of the transformers), LoCon's convolution targets
# (3x3 kernels included), and the text encoder's.
ATTENTION = ("proj_in", "proj_out", "to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
CONV = ("conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv")
TEXT = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")

Layers = dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]


def euler_pipelines(folder: Path):
    """diffusers' tiny random pipeline with its Euler scheduler, and ours with the same weights."""
    import diffusers
    reference = tiny_diffusers_pipeline(folder)
    reference.scheduler = diffusers.EulerDiscreteScheduler.from_config(reference.scheduler.config)
    reference.set_progress_bar_config(disable=True)
    ours = ours_from_diffusers(reference)
    ours.show_progress = False
    return reference, ours


def lora_layers(networks: dict[str, nn.Module], *, unet=ATTENTION, text_encoder=TEXT, rank: int = 4,
                seed: int = 0, std: float = 0.15) -> Layers:
    """A random LoRA of `rank` on the modules whose names end with the given suffixes."""
    generator = torch.Generator().manual_seed(seed)
    layers = {}
    for network, suffixes in (("unet", unet), ("text_encoder", text_encoder)):
        for name, module in networks[network].named_modules():
            if not suffixes or not isinstance(module, (nn.Linear, nn.Conv2d)) or not name.endswith(suffixes):
                continue
            out_features, *input_shape = module.weight.shape            # (out, in) or (out, in, kh, kw)
            ones = (1, 1) if len(input_shape) == 3 else ()
            down = torch.randn(rank, *input_shape, generator=generator) * std
            up = torch.randn(out_features, rank, *ones, generator=generator) * std
            layers[(network, name)] = down, up
    return layers


def original_names(unet: nn.Module) -> dict[str, str]:
    """{our UNet module: its single-file (ldm) name}, from the rename table."""
    modules = [name for name, module in unet.named_modules() if isinstance(module, (nn.Linear, nn.Conv2d))]
    table = rename_table("unet", unet.config, [f"{name}.weight" for name in modules])
    return {key.removesuffix(".weight"): value.removeprefix(PREFIXES["unet"]).removesuffix(".weight")
            for key, value in table.items()}


def write_kohya(path: Path, layers: Layers, *, alpha: float | None = None, ldm_names: dict | None = None,
                metadata: dict | None = None) -> Path:
    """kohya/A1111 keys (`lora_unet_..._to_q.lora_down.weight`); `ldm_names` spells UNet modules the
    original way (`original_names`)."""
    tensors = {}
    for (network, name), (down, up) in layers.items():
        if network == "unet" and ldm_names:
            name = ldm_names[name]
        key = ("lora_unet_" if network == "unet" else "lora_te_") + name.replace(".", "_")
        tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = down, up
        if alpha is not None:
            tensors[f"{key}.alpha"] = torch.tensor(float(alpha))
    save_file(tensors, str(path), metadata=metadata)
    return path


def write_peft(path: Path, layers: Layers, *, alpha: float | None = None) -> Path:
    """diffusers/PEFT keys (`unet.....lora_A.weight`), lora_alpha in diffusers' `lora_adapter_metadata`."""
    tensors = {}
    for (network, name), (down, up) in layers.items():
        tensors[f"{network}.{name}.lora_A.weight"], tensors[f"{network}.{name}.lora_B.weight"] = down, up
    metadata = None
    if alpha is not None:                               # a LoraConfig per network, as diffusers saves it
        config = {}
        for (network, name), (down, _) in layers.items():
            config.update({f"{network}.r": down.shape[0], f"{network}.lora_alpha": alpha})
            # transformers >= 5 names the text encoder's modules without `text_model.`; PEFT matches the ends
            config.setdefault(f"{network}.target_modules", []).append(name.removeprefix("text_model."))
        metadata = {"format": "pt", "lora_adapter_metadata": json.dumps(config)}
    save_file(tensors, str(path), metadata=metadata)
    return path


def write_old_diffusers(path: Path, layers: Layers) -> Path:
    """diffusers < 0.21 keys: attention processors' `to_q_lora.down`, else `.lora.down` (UNet) and
    `.lora_linear_layer.down` (text encoder)."""
    projections = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out.0": "to_out",
                   "q_proj": "to_q", "k_proj": "to_k", "v_proj": "to_v", "out_proj": "to_out"}
    tensors = {}
    for (network, name), (down, up) in layers.items():
        stem = f"{network}.{name}.{'lora' if network == 'unet' else 'lora_linear_layer'}"
        for leaf, projection in projections.items():
            if name.endswith(f".{leaf}"):
                processor = ".processor" if network == "unet" else ""
                stem = f"{network}.{name.removesuffix(f'.{leaf}')}{processor}.{projection}_lora"
        tensors[f"{stem}.down.weight"], tensors[f"{stem}.up.weight"] = down, up
    save_file(tensors, str(path))
    return path


def write_a1111_pt(path: Path, vectors: torch.Tensor, name: str) -> Path:
    """An A1111 textual-inversion `.pt`, as its trainer saves it."""
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": name,
                "step": 500, "sd_checkpoint": "0123abcd", "sd_checkpoint_name": "model"}, path)
    return path


def write_a1111_safetensors(path: Path, vectors: torch.Tensor) -> Path:
    save_file({"emb_params": vectors}, str(path))
    return path


def write_diffusers_embedding(path: Path, token: str, vectors: torch.Tensor) -> Path:
    """diffusers' `learned_embeds.safetensors`: {token: vectors}."""
    save_file({token: vectors}, str(path))
    return path
