"""Load and save the original single-file layout of SD v1.x and 2.x (`.safetensors` or `.ckpt`).

Keys are renamed through the one table in `original_keys`. Configs come from the file's metadata when we
wrote it, otherwise from tensor shapes; what shapes cannot tell takes the family's values (SD v1.x: 8 UNet
heads; SD 2.x: 64-wide heads; both: 32 GroupNorm groups, SD's VAE scaling factor). Whether an SD 2.x file
predicts ε (512-base, SD-Turbo) or v (768-v) its keys do not say: ComfyUI's `v_pred` marker or, failing
that, one UNet call (`families.probe_prediction`) tells. Other kinds of checkpoint are named, not half-loaded.
"""

import dataclasses
import json
from pathlib import Path

import torch

from nanodiffusion.atomic import atomic_write
from nanodiffusion.errors import UserError
from nanodiffusion.nets.clip_text import CLIPTextConfig
from nanodiffusion.nets.sd_unet import SDUNetConfig
from nanodiffusion.nets.vae import VAEConfig
from nanodiffusion.tokenizer import CLIP_MAX_LENGTH, CLIPTokenizer
from nanodiffusion.weights.components import (SD15_SCHEDULER, SDComponents, build_on_meta, check_state_dict,
                                              expected_shapes, materialize)
from nanodiffusion.weights.families import SD2_V_SCHEDULER, identify_file, probe_prediction
from nanodiffusion.weights.original_keys import (PREFIXES, TEXT_PREFIXES, V_PREDICTION_MARKER, fused_index,
                                                 is_conv_as_linear, is_ignored, rename_table, text_layout)
from nanodiffusion.weights.safe_load import read_weights, write_safetensors

METADATA_KEY = "nanodiffusion"      # safetensors metadata entry holding our configs as JSON
CLIP_SHAPE = (49408, CLIP_MAX_LENGTH)   # (vocab, positions) of the CLIP text towers SD v1.x and 2.x use
CLIP_HEAD_WIDTH = 64                # every released CLIP text tower uses 64-wide heads (ViT-L/14: 768 / 12)
SD2_HEAD_WIDTH = 64                 # SD 2.x's UNet fixes the head width (ldm's num_head_channels)
SD2_V_SAMPLE_SIZE = 96              # SD 2.x's v models are its 768² ones (96² latents)
OPENCLIP_PAD_TOKEN = "!"            # open_clip pads with id 0, "!" (as diffusers' SD 2 tokenizer folders do)
CONFIG_CLASSES = {"unet": SDUNetConfig, "vae": VAEConfig, "text_encoder": CLIPTextConfig}


def _count(keys: set[str], pattern: str) -> int:
    """How many consecutive i make `pattern.format(i)` a prefix of some key."""
    i = 0
    while any(key.startswith(pattern.format(i)) for key in keys):
        i += 1
    return i


def infer_unet_config(shapes: dict[str, torch.Size], head_width: int | None = None) -> SDUNetConfig:
    """SD UNet config from original-layout shapes (keys without prefix): 8 heads per level as in all SD
    v1.x, or with `head_width` (SD 2.x: 64) as many heads as fit each level's width."""
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
    heads = 8
    if head_width is not None:
        per_level = tuple(max(1, width // head_width) for width in widths)
        heads = per_level[0] if len(set(per_level)) == 1 else per_level
    return SDUNetConfig(
        in_channels=in_channels, out_channels=shapes["out.2.weight"][0], model_channels=model_channels,
        channel_mult=tuple(w // model_channels for w in widths), num_res_blocks=counts[0],
        attention_levels=tuple(level for level, a in enumerate(attention) if a),
        transformer_depth=_count(keys, first.rsplit(".", 2)[0] + ".transformer_blocks.{}.") if first else 1,
        context_dim=shapes[attention_keys[0]][1] if attention_keys else SDUNetConfig.context_dim,
        num_heads=heads, linear_projection=first is not None and len(shapes[first]) == 2)


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


def infer_openclip_config(shapes: dict[str, torch.Size]) -> CLIPTextConfig:
    """OpenCLIP text config (SD 2.x) from original-layout shapes (keys without prefix). SD 2 reads the
    penultimate layer: a file with the whole tower (`text_projection` marks it) gives one layer fewer."""
    keys = set(shapes)
    vocab_size, hidden = shapes["token_embedding.weight"]
    blocks = _count(keys, "transformer.resblocks.{}.")
    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_heads=max(1, hidden // CLIP_HEAD_WIDTH),
        num_layers=blocks - 1 if "text_projection" in keys else blocks,
        intermediate_size=shapes["transformer.resblocks.0.mlp.c_fc.weight"][0],
        max_positions=shapes["positional_embedding"][0], activation="gelu",
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=0)


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


def _infer(component: str, layout: str, shapes: dict[str, torch.Size]):
    if component == "unet":
        return infer_unet_config(shapes, SD2_HEAD_WIDTH if layout == "openclip" else None)
    if component == "vae":
        return infer_vae_config(shapes)
    return infer_openclip_config(shapes) if layout == "openclip" else infer_text_config(shapes)


def _configs(tensors: dict[str, torch.Tensor], metadata: dict[str, str], layout: str,
             path: Path) -> tuple[dict, dict | None]:
    """({component: config}, scheduler config): from our metadata if present, else inferred from shapes
    (and None for the scheduler config, which `_scheduler_config` then builds)."""
    if METADATA_KEY in metadata:
        return _stored_configs(metadata[METADATA_KEY], path)
    configs = {}
    for component in CONFIG_CLASSES:
        prefix = TEXT_PREFIXES[layout] if component == "text_encoder" else PREFIXES[component]
        shapes = {key[len(prefix):]: value.shape for key, value in tensors.items() if key.startswith(prefix)}
        try:
            configs[component] = _infer(component, layout, shapes)
        except KeyError as error:
            raise UserError(f"{path}: cannot infer the {component} config, {prefix}{error.args[0]} is "
                            "missing") from None
        except ValueError as error:
            raise UserError(f"{path}: the {component} config inferred from tensor shapes is invalid "
                            f"({error}); what shapes cannot tell takes SD's values (8 UNet heads in SD v1.x, "
                            "64-wide ones in SD 2.x, 32 GroupNorm groups, 64-wide text heads)") from None
    return configs, None


def _scheduler_config(betas: torch.Tensor | None, prediction: str) -> dict:
    """SD's scheduler config for `prediction` (SD 2.1's for v), with the training schedule the file stores
    when it stores one."""
    config = dict(SD2_V_SCHEDULER if prediction == "v_prediction" else SD15_SCHEDULER)
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
    """Load an original-layout SD v1.x or 2.x checkpoint. A single file holds no tokenizer: one whose text
    encoder has CLIP's 49408 ids and 77 positions gets CLIP's BPE (`CLIPTokenizer.clip()`, padding with "!"
    for SD 2.x as open_clip does), others None."""
    path = Path(path)
    tensors, metadata = read_weights(path, trust_pickle=trust_pickle)
    layout = identify_file(path, {key: value.shape for key, value in tensors.items()})
    configs, scheduler = _configs(tensors, metadata, layout, path)
    found = {key: value for key, value in tensors.items()
             if not is_ignored(key) and not _unused_text_layer(key, tensors, configs["text_encoder"])}
    networks = {}
    for component, state in _split(found, configs, path).items():
        networks[component] = materialize(component, configs[component], state, dtype=dtype, device=device,
                                          what=f"{path} ({component})", memory_format=memory_format)
    if scheduler is None:
        scheduler = _scheduler_config(tensors.get("betas"), _prediction(tensors, layout, networks["unet"]))
        if layout == "openclip" and scheduler["prediction_type"] == "v_prediction":
            # only the default image size depends on it; the network is the same
            networks["unet"].config = dataclasses.replace(configs["unet"], sample_size=SD2_V_SAMPLE_SIZE)
    # A single file holds no tokenizer; SD's is CLIP's own, shipped with the package.
    text = configs["text_encoder"]
    tokenizer = None
    if (text.vocab_size, text.max_positions) == CLIP_SHAPE:
        tokenizer = (CLIPTokenizer.clip(pad_token=OPENCLIP_PAD_TOKEN) if text_layout(text) == "openclip"
                     else CLIPTokenizer.clip())
    return SDComponents(**networks, tokenizer=tokenizer, scheduler_config=scheduler)


def _unused_text_layer(key: str, tensors: dict, text: CLIPTextConfig) -> bool:
    """True for the last block of a whole OpenCLIP tower (its text_projection marks it): SD 2 stops before."""
    prefix = TEXT_PREFIXES["openclip"]
    if f"{prefix}text_projection" not in tensors or not key.startswith(f"{prefix}transformer.resblocks."):
        return False
    return int(key[len(f"{prefix}transformer.resblocks."):].split(".")[0]) >= text.num_layers


def _prediction(tensors: dict, layout: str, unet: torch.nn.Module) -> str:
    """ε or v for a file without our metadata: ComfyUI's marker, else SD v1.x's ε, else (SD 2.x) a probe."""
    if V_PREDICTION_MARKER in tensors:
        return "v_prediction"
    return "epsilon" if layout == "clip" else probe_prediction(unet)


def _split(found: dict[str, torch.Tensor], configs: dict, path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Each component's tensors under our names, after one strict check of the whole file in its own names
    (VAE attention weights compared as linears, fused q/k/v as one tensor three times as tall)."""
    tables, expected, owner = {}, {}, {}            # owner: original key -> (component, our key)
    for component, config in configs.items():
        shapes = expected_shapes(build_on_meta(component, config))
        tables[component] = rename_table(component, config, shapes)
        for key, original in tables[component].items():
            shape = shapes[key]
            if fused_index(key, original) is not None:
                shape = torch.Size([3 * shape[0], *shape[1:]])
            expected[original], owner[original] = shape, (component, key)
    found = {key: _to_ours(*owner[key], value) if key in owner else value for key, value in found.items()}
    check_state_dict(expected, found, f"{path}")
    return {component: {key: _take(found[original], key, original) for key, original in table.items()}
            for component, table in tables.items()}


def _take(tensor: torch.Tensor, our_key: str, original_key: str) -> torch.Tensor:
    index = fused_index(our_key, original_key)
    return tensor if index is None else tensor.chunk(3)[index]         # q, k or v rows: a view


def _to_ours(component: str, our_key: str, tensor: torch.Tensor) -> torch.Tensor:
    if is_conv_as_linear(component, our_key) and tensor.ndim == 4 and tensor.shape[2:] == (1, 1):
        return tensor[:, :, 0, 0]                   # (C, C, 1, 1) conv -> (C, C) linear, a view
    return tensor



def to_original(components: SDComponents) -> dict[str, torch.Tensor]:
    """All network weights under their original single-file names (views, but OpenCLIP's fused q/k/v)."""
    state, fused = {}, {}
    for component, network in components.networks().items():
        if not isinstance(network.config, CONFIG_CLASSES[component]):
            raise UserError(f"the original single-file layout has no place for this {component} "
                            f"({type(network).__name__}); save a diffusers folder instead")
        ours = network.state_dict()
        for key, original in rename_table(component, network.config, ours).items():
            tensor, index = ours[key], fused_index(key, original)
            if index is not None:
                fused.setdefault(original, [None] * 3)[index] = tensor
            else:
                state[original] = tensor[:, :, None, None] if is_conv_as_linear(component, key) else tensor
    state.update({original: torch.cat(parts) for original, parts in fused.items()})
    if components.scheduler_config.get("prediction_type") == "v_prediction":
        state[V_PREDICTION_MARKER] = torch.zeros(0)     # ComfyUI's mark, for files read without our metadata
    return state


def save_single_file(components: SDComponents, path: str | Path) -> None:
    """Write the original single-file layout: `.safetensors` (configs in its metadata) or `.ckpt`.

    The `.ckpt` is `{"state_dict": tensors}`, readable with `torch.load(weights_only=True)`; it cannot
    carry the configs, so loading it infers them from shapes (and a v model from its `v_pred` marker).
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
