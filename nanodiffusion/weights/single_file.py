"""Load and save the original single-file Stable Diffusion v1.x layout (`.safetensors` or `.ckpt`).

Keys are renamed through the one table in `original_keys`. Configs come from the file's metadata when we
wrote it, otherwise from tensor shapes; what shapes cannot tell (head counts, GroupNorm groups, the VAE's
scaling factor) takes SD v1.x's values. Checkpoints of other model families are named, not half-loaded.
"""

import json
from pathlib import Path

import torch

from nanodiffusion.atomic import atomic_write
from nanodiffusion.errors import UserError
from nanodiffusion.nets.clip_text import CLIPTextConfig
from nanodiffusion.nets.sd_unet import SDUNetConfig
from nanodiffusion.nets.vae import VAEConfig
from nanodiffusion.tokenizer import CLIP_MAX_LENGTH, CLIPTokenizer
from nanodiffusion.weights.components import (NETWORKS, SD15_SCHEDULER, SDComponents, build_on_meta,
                                              check_state_dict, expected_shapes, materialize)
from nanodiffusion.weights.original_keys import PREFIXES, is_conv_as_linear, is_ignored, rename_table
from nanodiffusion.weights.safe_load import read_weights, write_safetensors

METADATA_KEY = "nanodiffusion"      # safetensors metadata entry holding our configs as JSON
CLIP_SHAPE = (49408, CLIP_MAX_LENGTH)   # (vocab, positions) of the CLIP text towers SD v1.x uses
CLIP_HEAD_WIDTH = 64                # every released CLIP text tower uses 64-wide heads (ViT-L/14: 768 / 12)


def identify(path: Path, shapes: dict[str, torch.Size]) -> None:
    """Raise a UserError that names the checkpoint's kind when it is not an SD v1.x text-to-image model."""
    keys, unet = set(shapes), PREFIXES["unet"]
    if any(key.startswith("conditioner.embedders.") for key in keys) or f"{unet}label_emb.0.0.weight" in keys:
        raise UserError(f"{path} is an SDXL checkpoint (conditioner.embedders.*, a label_emb UNet); only "
                        "SD v1.x is supported")
    contexts = {shapes[key][1] for key in keys if key.startswith(unet) and key.endswith("attn2.to_k.weight")}
    openclip = any(key.startswith("cond_stage_model.model.") for key in keys)
    if openclip or 1024 in contexts:
        cue = "an OpenCLIP text encoder, cond_stage_model.model.*" if openclip else "a 1024-wide text context"
        raise UserError(f"{path} is an SD 2.x checkpoint ({cue}); only SD v1.x is supported")
    conv_in = shapes.get(f"{unet}input_blocks.0.0.weight")
    if conv_in is None:
        raise UserError(f"{path} holds no SD UNet ({unet}*): {_guess_other_kind(keys)}")
    if conv_in[1] != 4:
        kinds = {9: "an inpainting checkpoint (9 input channels: latents, mask, masked-image latents)",
                 8: "an InstructPix2Pix checkpoint (8 input channels: latents and image latents)",
                 5: "a depth-conditioned checkpoint (5 input channels)"}
        kind = kinds.get(conv_in[1], f"a UNet with {conv_in[1]} input channels")
        raise UserError(f"{path} is {kind}; the SD v1.x text-to-image loader needs 4")


def _guess_other_kind(keys: set[str]) -> str:
    if any(key.startswith(("lora_unet_", "lora_te_")) or ".lora_" in key for key in keys):
        return "it looks like a LoRA, which adds to a full model rather than being one"
    if "encoder.conv_in.weight" in keys and "decoder.conv_in.weight" in keys:
        return "it looks like a standalone VAE file"
    if "conv_in.weight" in keys and any(key.startswith("down_blocks.") for key in keys):
        return "it looks like one component of a diffusers folder: pass the folder with model_index.json"
    return f"first keys: {', '.join(sorted(keys)[:5])}"


def _count(keys: set[str], pattern: str) -> int:
    """How many consecutive i make `pattern.format(i)` a prefix of some key."""
    i = 0
    while any(key.startswith(pattern.format(i)) for key in keys):
        i += 1
    return i


def infer_unet_config(shapes: dict[str, torch.Size]) -> SDUNetConfig:
    """SD UNet config from original-layout shapes (keys without prefix); num_heads=8 as in all SD v1.x."""
    keys = set(shapes)
    model_channels, in_channels = shapes["input_blocks.0.0.weight"][:2]
    widths, attention, counts, current = [], [], [], 0
    for n in range(1, _count(keys, "input_blocks.{}.")):
        if f"input_blocks.{n}.0.op.weight" in keys:          # a downsampler closes a level
            counts.append(current)
            current = 0
            continue
        if current == 0:
            widths.append(shapes[f"input_blocks.{n}.0.out_layers.3.weight"][0])
            attention.append(f"input_blocks.{n}.1.proj_in.weight" in keys)
        current += 1
    counts.append(current)
    if len(set(counts)) != 1 or any(w % model_channels for w in widths):
        raise UserError(f"unsupported UNet layout: resnets per level {counts}, widths {widths}")
    attention_keys = sorted(key for key in keys if key.endswith("attn2.to_k.weight"))
    first = next((key for key in sorted(keys) if key.endswith(".proj_in.weight")), None)
    return SDUNetConfig(
        in_channels=in_channels, out_channels=shapes["out.2.weight"][0], model_channels=model_channels,
        channel_mult=tuple(w // model_channels for w in widths), num_res_blocks=counts[0],
        attention_levels=tuple(level for level, a in enumerate(attention) if a),
        transformer_depth=_count(keys, first.rsplit(".", 2)[0] + ".transformer_blocks.{}.") if first else 1,
        context_dim=shapes[attention_keys[0]][1] if attention_keys else SDUNetConfig.context_dim,
        linear_projection=first is not None and len(shapes[first]) == 2)


def infer_vae_config(shapes: dict[str, torch.Size]) -> VAEConfig:
    """Autoencoder config from original-layout shapes (keys without prefix)."""
    keys = set(shapes)
    levels = _count(keys, "encoder.down.{}.")
    return VAEConfig(
        in_channels=shapes["encoder.conv_in.weight"][1], out_channels=shapes["decoder.conv_out.weight"][0],
        latent_channels=shapes["decoder.conv_in.weight"][1],
        block_channels=tuple(shapes[f"encoder.down.{i}.block.0.conv2.weight"][0] for i in range(levels)),
        layers_per_block=_count(keys, "encoder.down.0.block.{}."))


def infer_text_config(shapes: dict[str, torch.Size]) -> CLIPTextConfig:
    """CLIP text config from shapes (transformers' keys); special tokens end the vocabulary, as in CLIP."""
    vocab_size, hidden = shapes["text_model.embeddings.token_embedding.weight"]
    if hidden % CLIP_HEAD_WIDTH:
        raise UserError(f"cannot infer the head count of a {hidden}-wide text encoder (not a multiple of "
                        f"{CLIP_HEAD_WIDTH}): write the file with save_single_file, which stores the configs")
    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_heads=hidden // CLIP_HEAD_WIDTH,
        num_layers=_count(set(shapes), "text_model.encoder.layers.{}."),
        intermediate_size=shapes["text_model.encoder.layers.0.mlp.fc1.weight"][0],
        max_positions=shapes["text_model.embeddings.position_embedding.weight"][0],
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)


INFER = {"unet": infer_unet_config, "vae": infer_vae_config, "text_encoder": infer_text_config}
CONFIG_CLASSES = {component: config_class for component, (_, config_class) in NETWORKS.items()}


def _stored_configs(text: str, path: Path) -> tuple[dict, dict]:
    """The configs our `save_single_file` stored as JSON; a UserError naming the file when they are broken."""
    try:
        stored = json.loads(text)
        configs = {name: CONFIG_CLASSES[name].from_dict(stored[name]) for name in CONFIG_CLASSES}
        if not isinstance(stored["scheduler"], dict):
            raise TypeError(f"the scheduler config is a {type(stored['scheduler']).__name__}, not an object")
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        what = f"no {error}" if isinstance(error, KeyError) else str(error)
        raise UserError(f"{path}: its {METADATA_KEY!r} metadata, the networks' configs, is broken ({what}): "
                        "convert the model again from its source") from None
    return configs, stored["scheduler"]


def _configs(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> tuple[dict, dict]:
    """({component: config}, scheduler config): from our metadata if present, else inferred from shapes."""
    if METADATA_KEY in metadata:
        return _stored_configs(metadata[METADATA_KEY], path)
    configs = {}
    for component, infer in INFER.items():
        prefix = PREFIXES[component]
        shapes = {key[len(prefix):]: value.shape for key, value in tensors.items() if key.startswith(prefix)}
        try:
            configs[component] = infer(shapes)
        except KeyError as error:
            raise UserError(f"{path}: cannot infer the {component} config, {prefix}{error.args[0]} is "
                            "missing") from None
        except UserError as error:
            raise UserError(f"{path}: the {component} config inferred from tensor shapes is invalid "
                            f"({error}); what shapes cannot tell takes SD v1.x's values (8 UNet heads, "
                            "32 GroupNorm groups, 64-wide text heads)") from None
    return configs, _scheduler_config(tensors.get("betas"))


def _scheduler_config(betas: torch.Tensor | None) -> dict:
    """SD v1.x's scheduler config, with the training schedule the file stores when it stores one."""
    config = dict(SD15_SCHEDULER)
    if betas is None:
        return config
    betas = betas.double()
    start, end = betas[0].item(), betas[-1].item()
    scaled_linear = torch.linspace(start ** 0.5, end ** 0.5, len(betas), dtype=torch.float64) ** 2
    config["num_train_timesteps"] = len(betas)
    if torch.allclose(betas, scaled_linear, rtol=1e-4, atol=0):
        config.update(beta_start=start, beta_end=end)
    else:
        config["trained_betas"] = betas.tolist()
    return config


def load_single_file(path: str | Path, *, dtype: torch.dtype = torch.float32,
                     device: str | torch.device = "cpu", trust_pickle: bool = False,
                     memory_format: torch.memory_format = torch.preserve_format) -> SDComponents:
    """Load an original-layout SD v1.x checkpoint. A single file holds no tokenizer: one whose text encoder
    is CLIP's (49408 ids, 77 positions) gets CLIP's BPE tokenizer (`CLIPTokenizer.clip()`), others None."""
    path = Path(path)
    tensors, metadata = read_weights(path, trust_pickle=trust_pickle)
    identify(path, {key: value.shape for key, value in tensors.items()})
    configs, scheduler = _configs(tensors, metadata, path)
    tables, expected, owner = {}, {}, {}            # owner: original key -> (component, our key)
    for component, config in configs.items():
        shapes = expected_shapes(build_on_meta(component, config))
        tables[component] = rename_table(component, config, shapes)
        for key, original in tables[component].items():
            expected[original], owner[original] = shapes[key], (component, key)
    # One check of the whole file, in its own key names; VAE attention weights are compared as linears.
    found = {key: _to_ours(*owner[key], value) if key in owner else value
             for key, value in tensors.items() if not is_ignored(key)}
    check_state_dict(expected, found, f"{path}")
    networks = {}
    for component, table in tables.items():
        state = {key: found[original] for key, original in table.items()}
        networks[component] = materialize(component, configs[component], state, dtype=dtype, device=device,
                                          what=f"{path} ({component})", memory_format=memory_format)
    # A single file holds no tokenizer; SD v1.x's is CLIP's own, shipped with the package.
    text = configs["text_encoder"]
    tokenizer = CLIPTokenizer.clip() if (text.vocab_size, text.max_positions) == CLIP_SHAPE else None
    return SDComponents(**networks, tokenizer=tokenizer, scheduler_config=scheduler)


def _to_ours(component: str, our_key: str, tensor: torch.Tensor) -> torch.Tensor:
    if is_conv_as_linear(component, our_key) and tensor.ndim == 4 and tensor.shape[2:] == (1, 1):
        return tensor[:, :, 0, 0]                   # (C, C, 1, 1) conv -> (C, C) linear, a view
    return tensor


def to_original(components: SDComponents) -> dict[str, torch.Tensor]:
    """All network weights under their original single-file names (views, no copies)."""
    state = {}
    for component, network in components.networks().items():
        ours = network.state_dict()
        for key, original in rename_table(component, network.config, ours).items():
            tensor = ours[key]
            state[original] = tensor[:, :, None, None] if is_conv_as_linear(component, key) else tensor
    return state


def save_single_file(components: SDComponents, path: str | Path) -> None:
    """Write the original single-file layout: `.safetensors` (configs in its metadata) or `.ckpt`.

    The `.ckpt` is `{"state_dict": tensors}`, readable with `torch.load(weights_only=True)`; it cannot
    carry the configs, so loading it infers them from shapes.
    """
    path = Path(path)
    state = to_original(components)
    if path.suffix == ".safetensors":
        configs = {name: network.config.to_dict() for name, network in components.networks().items()}
        configs["scheduler"] = components.scheduler_config
        write_safetensors(state, path, metadata={"format": "pt", METADATA_KEY: json.dumps(configs)})
    elif path.suffix == ".ckpt":
        with atomic_write(path) as file:
            torch.save({"state_dict": {key: value.contiguous() for key, value in state.items()}}, file)
    else:
        raise UserError(f"a single file must end with .safetensors or .ckpt, got {path.name!r}")
