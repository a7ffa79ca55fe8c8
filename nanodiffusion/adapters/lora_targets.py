"""Map a LoRA file's layer names onto our networks' modules and check that each layer fits its weight.

kohya names are module paths with "_" for "." (`down_blocks_0_attentions_0_proj_in`), diffusers names are
the paths themselves. Either may use diffusers' module names (ours) or the original single-file ones
(`input_blocks_1_1_proj_in`, as LoRAs extracted from a checkpoint are named); those go through
weights/original_keys.py's rename table. A layer that fits nothing is an error that says, where the shapes
tell, which model family the LoRA was made for.
"""

from torch import nn

from nanodiffusion.adapters.lora_files import LoRAFile, LoRALayer
from nanodiffusion.errors import UserError
from nanodiffusion.weights.original_keys import PREFIXES, rename_table

# The width of the text states a family's UNet attends to, and of its (first) text encoder.
CONTEXT_FAMILIES = {768: "SD v1.x", 1024: "SD v2.x", 2048: "SDXL"}
TEXT_FAMILIES = {768: "SD v1.x (CLIP ViT-L)", 1024: "SD v2.x (OpenCLIP ViT-H)",
                 1280: "SDXL's second text encoder (OpenCLIP ViT-bigG)"}
# Names of modules that exist in SDXL's UNet and not in SD v1.x/v2.x.
_SDXL_NAMES = ("add_embedding", "label_emb", "transformer_blocks_1", "transformer_blocks.1")


def module_names(component: str, network: nn.Module) -> dict[str, str]:
    """{a name a LoRA file may give: our module name} for every Linear and Conv2d of `network`."""
    ours = [name for name, module in network.named_modules() if isinstance(module, (nn.Linear, nn.Conv2d))]
    names = {name: name for name in ours}
    if component == "unet":
        table = rename_table("unet", network.config, [f"{name}.weight" for name in ours])
        names.update({original.removeprefix(PREFIXES["unet"]).removesuffix(".weight"):
                      key.removesuffix(".weight") for key, original in table.items()})
    elif component == "text_encoder":
        # transformers >= 5 names CLIPTextModel's modules without `text_model.`, and so do LoRAs saved with it
        names.update({name.removeprefix("text_model."): name for name in ours})
    return names | {name.replace(".", "_"): module for name, module in names.items()}     # kohya's spelling


def resolve_targets(lora: LoRAFile, networks: dict[str, nn.Module]) -> dict[tuple[str, str], LoRALayer]:
    """{(network, our module name): layer} for every layer of `lora`, each checked against its weight."""
    lookups = {component: module_names(component, network) for component, network in networks.items()}
    targets: dict[tuple[str, str], LoRALayer] = {}
    unknown = []
    for (network, name), layer in lora.layers.items():
        if network not in lookups:
            sdxl = " (an SDXL LoRA: SDXL has two text encoders)" if network == "text_encoder_2" else ""
            raise UserError(f"{lora.path} adapts a {network}{sdxl}, which this model does not have")
        module = lookups[network].get(name)
        if module is None:
            unknown.append(f"{network}.{name}")
            continue
        if (network, module) in targets:
            raise UserError(f"{lora.path} adapts {network}.{module} twice (under two names)")
        weight = networks[network].get_submodule(module).weight
        delta = (layer.up.shape[0], *layer.down.shape[1:])
        if _input_shape(delta) != _input_shape(weight.shape) or delta[0] != weight.shape[0]:
            raise UserError(f"{lora.path}: layer {network}.{module} changes a weight of shape {delta} but "
                            f"the model's is {tuple(weight.shape)}{_family_hint(lora, networks)}")
        targets[(network, module)] = layer
    if unknown:
        sdxl = any(marker in name for name in unknown for marker in _SDXL_NAMES)
        hint = " (SDXL names: an SDXL LoRA)" if sdxl else _family_hint(lora, networks)
        raise UserError(f"{lora.path}: {len(unknown)} of its layers adapt modules this model does not have, "
                        f"e.g. {', '.join(unknown[:3])}{hint}")
    return targets


def _input_shape(shape) -> tuple:
    """A weight's input side: (in,) for linears and 1x1 convs, (in, kh, kw) for larger kernels."""
    return tuple(shape[1:2]) if tuple(shape[2:]) in ((), (1, 1)) else tuple(shape[1:])


def _family_hint(lora: LoRAFile, networks: dict[str, nn.Module]) -> str:
    """"; it was made for SD v2.x: ..." when the widths the LoRA's layers read tell its family, else ""."""
    widths = {}          # the LoRA's cross-attention input width, and its text encoder's width
    for (network, name), layer in lora.layers.items():
        dotted = name.replace("_", ".")
        if network == "unet" and dotted.endswith(("attn2.to.k", "attn2.to.v")):
            widths["unet"] = layer.down.shape[1]
        elif network == "text_encoder" and dotted.endswith(("q.proj", "k.proj", "v.proj")):
            widths["text_encoder"] = layer.down.shape[1]
    for network, width in widths.items():
        config = getattr(networks.get(network), "config", None)
        if config is None:
            continue
        if network == "unet" and width != config.context_dim:
            return (f"; it was made for {CONTEXT_FAMILIES.get(width, 'another model')}: its cross-attention "
                    f"reads {width}-wide text states, this model's {config.context_dim}-wide")
        if network == "text_encoder" and width != config.hidden_size:
            return (f"; it was made for {TEXT_FAMILIES.get(width, 'another model')}: its text encoder is "
                    f"{width} wide, this model's {config.hidden_size}")
    return ""
