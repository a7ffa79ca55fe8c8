"""LoRA layers to train (Hu et al. 2021, eq. 3): a trainable down/up pair on chosen Linear and 1x1-conv
modules of frozen networks, written as a kohya/A1111 `.safetensors` file that A1111, diffusers'
`load_lora_weights` and `LoRAAdapters` load.

The networks themselves never change: a training step calls them through `torch.func.functional_call` with
`adapted_weights(network)`, {module.weight: W + (alpha / r)·up·down}, so gradients reach only down and up.
kohya's initialisation: `down` as nn.Linear's default (Kaiming-uniform), `up` zero, so training starts from
the model itself.
"""

import math
from pathlib import Path

import torch
from torch import nn

from nanodiffusion import __version__
from nanodiffusion.errors import UserError
from nanodiffusion.weights.safe_load import write_safetensors

# kohya's default targets (sd-scripts networks/lora.py): the Linear and 1x1-conv layers of the UNet's
# transformer blocks, and the text encoder's attention and MLP layers.
UNET_TARGETS = ("proj_in", "proj_out", "to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_"}


def kohya_name(network: str, module: str) -> str:
    """The kohya key stem of one of our modules: `lora_unet_down_blocks_1_attentions_0_proj_in`."""
    return KOHYA_PREFIXES[network] + module.replace(".", "_")


def default_targets(network: str, module: nn.Module) -> list[str]:
    """kohya's default LoRA targets in `network` ("unet": its transformers; "text_encoder": all layers)."""
    suffixes = UNET_TARGETS if network == "unet" else TEXT_TARGETS
    return [name for name, layer in module.named_modules()
            if isinstance(layer, (nn.Linear, nn.Conv2d)) and name.endswith(suffixes)
            and (network != "unet" or ".attentions." in f".{name}")
            and (not isinstance(layer, nn.Conv2d) or layer.kernel_size == (1, 1))]


class LoRAPair(nn.Module):
    """The two factors of one LoRA layer: down (r, in[, 1, 1]) and up (out, r[, 1, 1])."""

    def __init__(self, weight: torch.Tensor, rank: int, generator: torch.Generator):
        super().__init__()
        ones = (1,) * (weight.dim() - 2)                       # (1, 1) for a 1x1 conv
        down = torch.empty(rank, weight.shape[1], *ones)
        bound = 1 / math.sqrt(weight.shape[1])                 # kaiming_uniform(a=sqrt(5)), nn.Linear's init
        self.down = nn.Parameter(down.uniform_(-bound, bound, generator=generator))
        self.up = nn.Parameter(torch.zeros(weight.shape[0], rank, *ones))

    def delta(self) -> torch.Tensor:
        """up @ down shaped like the adapted weight (out, in[, 1, 1])."""
        return (self.up.flatten(1) @ self.down.flatten(1)).view(len(self.up), *self.down.shape[1:])


class TrainableLoRA(nn.Module):
    """LoRA pairs of one `rank` and `alpha` on `targets` ({network: [module names]}) of `networks`."""

    def __init__(self, networks: dict[str, nn.Module], targets: dict[str, list[str]], rank: int,
                 alpha: float, seed: int = 0):
        super().__init__()
        if rank < 1:
            raise UserError(f"the LoRA rank must be >= 1, got {rank}")
        if not alpha > 0:
            raise UserError(f"the LoRA alpha must be > 0, got {alpha}")
        self.rank, self.alpha, self.scale = rank, float(alpha), float(alpha) / rank
        self.targets = {network: list(names) for network, names in targets.items() if names}
        generator = torch.Generator().manual_seed(seed)
        self.pairs = nn.ModuleDict()                   # kohya name -> LoRAPair (ModuleDict keys hold no ".")
        for network, names in self.targets.items():
            for name in names:
                weight = networks[network].get_submodule(name).weight
                if weight.dim() == 4 and weight.shape[2:] != (1, 1):
                    raise UserError(f"{network}.{name} is a {tuple(weight.shape[2:])} convolution: LoRA "
                                    "training here adapts Linear and 1x1-conv layers")
                self.pairs[kohya_name(network, name)] = LoRAPair(weight, rank, generator)

    def adapted_weights(self, network: str, module: nn.Module) -> dict[str, torch.Tensor]:
        """{"<module>.weight": W + scale·up·down} for the targets in `network`, for functional_call."""
        weights = {}
        for name in self.targets.get(network, ()):
            weight = module.get_submodule(name).weight
            delta = self.pairs[kohya_name(network, name)].delta()
            weights[f"{name}.weight"] = weight + self.scale * delta     # float32: a bf16 W is promoted
        return weights

    def kohya_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors of a kohya file: `<name>.lora_down.weight`, `.lora_up.weight`, `.alpha`."""
        tensors = {}
        for name, pair in self.pairs.items():
            tensors[f"{name}.lora_down.weight"] = pair.down.detach().float().cpu().contiguous()
            tensors[f"{name}.lora_up.weight"] = pair.up.detach().float().cpu().contiguous()
            tensors[f"{name}.alpha"] = torch.tensor(self.alpha)
        return tensors

    def save_kohya(self, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
        """Write the LoRA as kohya/A1111 `.safetensors` (atomically) with kohya's `ss_` header entries."""
        path = Path(path)
        header = {"ss_network_module": "networks.lora", "ss_network_dim": str(self.rank),
                  "ss_network_alpha": f"{self.alpha:g}", "ss_output_name": path.stem,
                  "ss_training_comment": f"trained by nanodiffusion {__version__}",
                  **(metadata or {})}
        write_safetensors(self.kohya_tensors(), path, header)
        return path
