"""Read LoRA files (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", eq. 3).

For each adapted layer with weight W (out, in) or (out, in, kh, kw), a LoRA stores `down` A (r, in[, kh, kw])
and `up` B (out, r[, 1, 1]); the adapted weight is W + scale·B·A, with scale = alpha / r (alpha defaults to
r). Files name the layers in one of two layouts, `.safetensors` only (a pickle could run code):

    lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight     kohya / A1111: module paths with "_"
    lora_unet_input_blocks_1_1_proj_in.lora_up.weight                 for ".", in diffusers' or the original
    lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha         single-file names; alpha per layer
    unet.down_blocks.0.attentions.0.proj_in.lora_A.weight             diffusers / PEFT, with lora_B; alpha in
    text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_B.weight    the `lora_adapter_metadata` header entry
    unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight   (< 0.21)

`read_lora_file` returns the layers under the file's own names; lora_targets.py maps them onto a model.
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from nanodiffusion.errors import UserError
from nanodiffusion.weights.safe_load import PICKLE, read_safetensors, sniff

# A diffusers LoRA folder holds its weights in this file (what `save_lora_weights` writes).
DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"

_KOHYA_KEY = re.compile(r"lora_(unet|te|te1|te2)_(\w+?)\.(lora_down\.weight|lora_up\.weight|alpha|"
                        r"lora_mid\.weight|dora_scale)")
_DIFFUSERS_KEY = re.compile(r"(?:(unet|text_encoder|text_encoder_2)\.)?([\w.]+?)\.(lora_A\.weight|"
                            r"lora_B\.weight|lora\.down\.weight|lora\.up\.weight|"
                            r"lora_linear_layer\.down\.weight|lora_linear_layer\.up\.weight|alpha|"
                            r"lora_magnitude_vector|lora_B\.bias)")
# diffusers < 0.21 saved attention-processor LoRAs: `attn1.processor.to_q_lora.down.weight`.
_PROCESSOR_KEY = re.compile(r"(?:(unet|text_encoder)\.)?([\w.]+?)\.(?:processor\.)?(to_q|to_k|to_v|to_out)"
                            r"_lora\.(down|up)\.weight")
_PROCESSOR_MODULES = {"unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
                      "text_encoder": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj",
                                       "to_out": "out_proj"}}
_KOHYA_NETWORKS = {"unet": "unet", "te": "text_encoder", "te1": "text_encoder", "te2": "text_encoder_2"}
_PARTS = {"lora_down.weight": "down", "lora_A.weight": "down", "lora.down.weight": "down",
          "lora_linear_layer.down.weight": "down", "lora_up.weight": "up", "lora_B.weight": "up",
          "lora.up.weight": "up", "lora_linear_layer.up.weight": "up", "alpha": "alpha"}
# Parts of LoRA variants that a plain W + scale·B·A cannot express.
_UNSUPPORTED_PARTS = {"lora_mid.weight": "LyCORIS LoCon's CP decomposition (lora_mid)",
                      "dora_scale": "DoRA (dora_scale)",
                      "lora_magnitude_vector": "DoRA (lora_magnitude_vector)",
                      "lora_B.bias": "LoRA bias terms (lora_B.bias)"}
# Key patterns of other formats, and what to call them in the error.
_OTHER_FORMATS = {r"\.hada_w1_a$": "a LyCORIS LoHa file (Hadamard products of low-rank factors)",
                  r"\.lokr_w[12]": "a LyCORIS LoKr file (Kronecker products)",
                  r"\.diff(_b)?$": "a LyCORIS full-difference file (.diff weights)",
                  r"\.oft_": "an OFT/BOFT file (orthogonal finetuning)", r"\.w_norm$": "a LyCORIS norm file",
                  r"\.a1\.weight$": "a GLoRA file", r"\.on_input$": "an (IA)³ file",
                  r"^(emb_params|string_to_param)": "a textual-inversion embedding",
                  r"^clip_[lg]$": "an SDXL textual-inversion embedding",
                  r"^(model\.diffusion_model|first_stage_model|cond_stage_model)\.":
                      "a full model checkpoint",
                  r"lora_controlnet": "a Control-LoRA"}
_LCM_WORDS = re.compile(r"(?<![a-z])lcm(?![a-z])|latent[ _-]?consistency", re.IGNORECASE)


@dataclass(frozen=True)
class LoRALayer:
    """One adapted layer: its weight gains scale · up @ down (Hu et al. 2021, eq. 3)."""

    down: torch.Tensor          # (r, in) or (r, in, kh, kw)
    up: torch.Tensor            # (out, r) or (out, r, 1, 1)
    scale: float                # alpha / r

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """scale · up @ down in float32 on `device`, shaped (out, in) or (out, in, kh, kw) as `down`."""
        up = self.up.to(device, torch.float32).flatten(1)                        # (out, r)
        down = self.down.to(device, torch.float32).flatten(1)                    # (r, in·kh·kw)
        return (up @ down).mul_(self.scale).view(len(up), *self.down.shape[1:])


@dataclass(frozen=True)
class LoRAFile:
    """A LoRA file's layers keyed by (network, name in the file), e.g. ("unet", "down_blocks_0_...")."""

    path: Path
    layout: str                                     # "kohya" or "diffusers"
    layers: dict[tuple[str, str], LoRALayer]
    metadata: dict[str, str]                        # the safetensors header's `__metadata__`

    @property
    def is_lcm(self) -> bool:
        """True when the file says it is an LCM-LoRA (Luo et al. 2023), in its name or its metadata; a file
        with diffusers' default name is named by its folder, or its Hub cache folder (`models--org--name`)."""
        names = [self.path.stem]
        if self.path.name == DIFFUSERS_LORA_FILE:
            names = [self.path.parent.name, *(part for part in self.path.parts if part.startswith("models--"))]
        return any(_LCM_WORDS.search(text) for text in (*names, *self.metadata.values()))


def resolve_lora_path(path: str | Path) -> Path:
    """The `.safetensors` file of `path`: the file itself, or a diffusers LoRA folder's weights file."""
    path = Path(path)
    if path.is_dir():
        if not (path / DIFFUSERS_LORA_FILE).is_file():
            raise UserError(f"{path} is a folder without {DIFFUSERS_LORA_FILE}: pass the LoRA's "
                            ".safetensors file")
        path = path / DIFFUSERS_LORA_FILE
    if sniff(path) == PICKLE:
        raise UserError(f"{path} is a pickle file: LoRAs are read from .safetensors only (unpickling can run "
                        "code hidden in the file); use the .safetensors version of this LoRA")
    return path


def read_lora_file(path: str | Path) -> LoRAFile:
    """Parse a kohya/A1111 or diffusers/PEFT LoRA file; any other layout is a UserError saying what it is."""
    path = resolve_lora_path(path)
    tensors, metadata = read_safetensors(path)
    if not tensors:
        raise UserError(f"{path} holds no tensors: not a LoRA")
    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    layouts = set()
    for key, tensor in tensors.items():
        layout, network, name, part = _split_key(path, key, tensors)
        layouts.add(layout)
        parts.setdefault((network, name), {})[part] = tensor
    if len(layouts) > 1:
        raise UserError(f"{path} mixes kohya (lora_unet_...) and diffusers (unet....lora_A) keys: not a LoRA "
                        "layout any tool writes")
    layout = layouts.pop()
    alphas = _metadata_alphas(path, metadata) if layout == "diffusers" else None
    layers = {where: _layer(path, where, found, alphas) for where, found in parts.items()}
    return LoRAFile(path, layout, layers, metadata)


def _split_key(path: Path, key: str, tensors: dict) -> tuple[str, str, str, str]:
    """(layout, network, layer name, part) of one key; a key of another format is a UserError."""
    match = _KOHYA_KEY.fullmatch(key)
    if match:
        network, name, part = match.groups()
        return "kohya", _KOHYA_NETWORKS[network], name, _part(path, key, part)
    key = key.removeprefix("base_model.model.")             # PEFT's own save of a wrapped UNet
    match = _PROCESSOR_KEY.fullmatch(key)
    if match:
        network, name, projection, part = match.groups()
        network = network or "unet"
        return "diffusers", network, f"{name}.{_PROCESSOR_MODULES[network][projection]}", part
    match = _DIFFUSERS_KEY.fullmatch(key)
    if match:
        network, name, part = match.groups()
        # keys without a network prefix are one network's own save: the UNet's, or the text encoder's
        network = network or ("text_encoder" if name.startswith("text_model.") else "unet")
        return "diffusers", network, name, _part(path, key, part)
    raise UserError(_unknown_layout(path, key, tensors))


def _part(path: Path, key: str, part: str) -> str:
    if part in _UNSUPPORTED_PARTS:
        raise UserError(f"{path} uses {_UNSUPPORTED_PARTS[part]} (key {key!r}), which is not plain LoRA: "
                        "nanodiffusion applies weight + scale·up·down only")
    return _PARTS[part]


def _unknown_layout(path: Path, key: str, tensors: dict) -> str:
    """The error for a file that is not a LoRA in a known layout: what it looks like, why it can't apply."""
    for pattern, kind in _OTHER_FORMATS.items():
        hit = next((k for k in tensors if re.search(pattern, k)), None)
        if hit is not None:
            what = ("load it with load_textual_inversion" if "embedding" in kind else "nanodiffusion "
                    "applies LoRA files only (kohya lora_down/lora_up or diffusers lora_A/lora_B)")
            return f"{path} is {kind} (key {hit!r}), not a LoRA: {what}"
    sample = ", ".join(repr(k) for k in list(tensors)[:3])
    return (f"{path} is not a LoRA in a layout nanodiffusion knows: key {key!r} is neither kohya's "
            f"(lora_unet_..., lora_te_... with lora_down/lora_up/alpha) nor diffusers' (unet...., "
            f"text_encoder.... with lora_A/lora_B); first keys: {sample}")


def _layer(path: Path, where: tuple[str, str], found: dict[str, torch.Tensor], alphas) -> LoRALayer:
    """Check one layer's down/up pair and compute its scale (kohya's alpha, or diffusers' metadata)."""
    name = ".".join(where)
    if "down" not in found or "up" not in found:
        missing = "down" if "down" not in found else "up"
        raise UserError(f"{path}: layer {name} has no {missing} matrix (lora_{missing} / "
                        f"lora_{'A' if missing == 'down' else 'B'}): the file is incomplete")
    down, up = found["down"], found["up"]
    if down.dim() not in (2, 4) or up.dim() != down.dim() or up.shape[2:] not in ((), (1, 1)):
        raise UserError(f"{path}: layer {name} has down {tuple(down.shape)} and up {tuple(up.shape)}: "
                        "expected (r, in) and (out, r), or (r, in, kh, kw) and (out, r, 1, 1)")
    if up.shape[1] != down.shape[0]:
        raise UserError(f"{path}: layer {name} has rank {down.shape[0]} in its down matrix "
                        f"{tuple(down.shape)} but {up.shape[1]} in its up matrix {tuple(up.shape)}")
    rank = down.shape[0]
    if "alpha" in found:                    # alpha 0 scales by 0, as A1111 and diffusers read it
        return LoRALayer(down, up, float(found["alpha"].float()) / rank)
    return LoRALayer(down, up, alphas(where, rank) if alphas else 1.0)


def _metadata_alphas(path: Path, metadata: dict[str, str]):
    """scale(where, rank) from diffusers' `lora_adapter_metadata` (PEFT's LoraConfig per network), or None.

    PEFT scales by lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora (Kalajdzievski 2023); per-module
    values come from `alpha_pattern`, whose keys match a module name's end (peft's get_pattern_key).
    """
    if DIFFUSERS_METADATA_KEY not in metadata:
        return None
    try:
        config = json.loads(metadata[DIFFUSERS_METADATA_KEY])
    except json.JSONDecodeError as error:
        raise UserError(f"{path}: its {DIFFUSERS_METADATA_KEY} header entry is not JSON ({error})") from None

    def scale(where: tuple[str, str], rank: int) -> float:
        network, name = where
        settings = {key.removeprefix(f"{network}."): value for key, value in config.items()
                    if key.startswith(f"{network}.")}
        # a pipeline's save prefixes each network's LoraConfig; a single model's save (unet.save_lora_adapter)
        # writes it bare
        settings = settings or {key: value for key, value in config.items() if "." not in key}
        alpha = settings.get("lora_alpha", settings.get("r", rank))
        for pattern, value in (settings.get("alpha_pattern") or {}).items():
            if re.match(rf"(.*\.)?({pattern})$", name):
                alpha = value
                break
        return alpha / (rank ** 0.5 if settings.get("use_rslora") else rank)
    return scale
