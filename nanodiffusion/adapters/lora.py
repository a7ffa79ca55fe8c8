"""Several LoRAs on one model, each with a weight, behind diffusers' API: `load_lora_weights`, `set_adapters`,
`fuse_lora`, `unfuse_lora`, `unload_lora_weights`.

LoRAs apply by writing adapted weights into the networks, never beside the layers at run time: whenever the
active set or a weight changes, each weight W that a LoRA touches becomes W + Σ_i w_i·scale_i·B_i·A_i
(Hu et al. 2021, eq. 3), summed in float32 from the original W and rounded once to W's dtype. So a step
costs what it costs without LoRAs, and a bf16 model gets exactly the weights of an fp32 one cast to bf16.
The adapted weight is a new tensor; the original is set aside untouched and putting it back restores the
model bit for bit. That costs one tensor per touched weight, except where the original is a memory-mapped
file page (a model loaded without conversion): its pages are given back and re-read from the file when
needed. `restorable=False` keeps no originals (one-shot use, as the CLI's): later changes then apply as
differences, exact only to float rounding as diffusers' unfuse. `fuse_lora` fixes the current state, times
`lora_scale`; `unload_lora_weights` after it keeps the fused weights, as in diffusers.
"""

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from nanodiffusion.adapters.lora_files import (DIFFUSERS_LORA_FILE, LoRAFile, LoRALayer, read_lora_file,
                                               resolve_lora_path)
from nanodiffusion.adapters.lora_targets import resolve_targets
from nanodiffusion.errors import UserError
from nanodiffusion.weights import file_pages

# LCM-LoRA's published settings (Luo et al. 2023, "LCM-LoRA"): the LCM sampler, 2-8 steps, guidance 1-2.
LCM_SETTINGS = "--sampler lcm --steps 4 --guidance 1"
_LCM_MAX_STEPS, _LCM_MAX_GUIDANCE = 8, 2.0

Target = tuple[str, str]  # (network, module name), e.g. ("unet", "mid_block.attentions.0.proj_in")


@dataclass(frozen=True)
class Adapter:
    """A loaded LoRA: its file and the layer it adds to each target module."""

    file: LoRAFile
    targets: dict[Target, LoRALayer]


class LoRAAdapters:
    """The LoRAs loaded into `networks` ({"unet": ..., "text_encoder": ...}), which apply and how much."""

    def __init__(self, networks: dict[str, nn.Module], *, restorable: bool = True):
        self.networks = networks
        self.restorable = restorable                    # keep originals: restores exact (see the module doc)
        self.adapters: dict[str, Adapter] = {}
        self.active: dict[str, float] = {}              # adapter name -> weight, in set_adapters' order
        self.lora_scale: float | None = None            # set while fused
        self._originals: dict[Target, nn.Parameter] = {}    # the untouched weight of each adapted module
        self._applied: dict[Target, tuple] = {}         # ((adapter, factor), ...) in each adapted weight

    def load_lora_weights(self, path: str | Path, adapter_name: str | None = None) -> str:
        """Read a LoRA file and make it the one active adapter (weight 1), as diffusers does; returns its
        name, by default the file's stem (A1111's `<lora:NAME:W>` name)."""
        self._check_unfused("load_lora_weights")
        path = resolve_lora_path(path)
        name = adapter_name or (path.parent.name if path.name == DIFFUSERS_LORA_FILE else path.stem)
        if name in self.adapters:
            raise UserError(f"adapter name {name!r} is already loaded: pass another adapter_name, or "
                            "unload_lora_weights() first")
        lora = read_lora_file(path)
        self.adapters[name] = Adapter(lora, resolve_targets(lora, self.networks))
        self.active = {name: 1.0}
        self._apply()
        return name

    def set_adapters(self, adapter_names: str | list[str],
                     adapter_weights: float | list[float] | None = None) -> None:
        """Make exactly these adapters active, each with its weight (1 by default; one number for all)."""
        self._check_unfused("set_adapters")
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if adapter_weights is None or isinstance(adapter_weights, (int, float)):
            weights = [1.0 if adapter_weights is None else float(adapter_weights)] * len(names)
        elif isinstance(adapter_weights, dict):
            raise UserError("adapter_weights per UNet block (a dict) are not supported: pass one number per "
                            "adapter")
        else:
            weights = list(adapter_weights)
        if not all(isinstance(weight, (int, float)) for weight in weights):
            raise UserError(f"adapter_weights must be numbers, got {adapter_weights!r}")
        if len(weights) != len(names):
            raise UserError(f"got {len(names)} adapter names but {len(weights)} adapter_weights")
        unknown = [name for name in names if name not in self.adapters]
        if unknown:
            raise UserError(f"unknown adapter {unknown[0]!r}; loaded: {', '.join(self.adapters) or 'none'}")
        if len(set(names)) != len(names):
            raise UserError(f"adapter names repeat: {names}")
        self.active = {name: float(weight) for name, weight in zip(names, weights)}
        self._apply()

    def get_active_adapters(self) -> list[str]:
        """The names of the active adapters."""
        return list(self.active)

    def delete_adapters(self, adapter_names: str | list[str]) -> None:
        """Forget these adapters (their changes to the weights are undone)."""
        self._check_unfused("delete_adapters")
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in names:
            if name not in self.adapters:
                raise UserError(f"unknown adapter {name!r}; loaded: {', '.join(self.adapters) or 'none'}")
        self.active = {name: weight for name, weight in self.active.items() if name not in names}
        self._apply()
        for name in names:
            del self.adapters[name]

    def fuse_lora(self, lora_scale: float = 1.0) -> None:
        """Fix the active adapters into the weights, each weight times `lora_scale` (diffusers' fuse_lora)."""
        if self.lora_scale is not None:
            raise UserError("the LoRAs are fused already: unfuse_lora() first")
        if not any(self.active.values()):
            raise UserError("no active LoRA to fuse: load_lora_weights or set_adapters first")
        self.lora_scale = float(lora_scale)
        self._apply()

    def unfuse_lora(self) -> None:
        """Back to the state before fuse_lora: the active adapters at their own weights."""
        if self.lora_scale is not None:
            self.lora_scale = None
            self._apply()

    def unload_lora_weights(self) -> None:
        """Forget every adapter. Unfused, the original weights come back bit for bit; fused, the fused
        weights stay (and the originals are freed), as diffusers' fuse_lora + unload_lora_weights.
        Without originals (restorable=False) the unfused LoRAs are subtracted again, to float rounding."""
        if self.lora_scale is None:
            self.active = {}
            self._apply()
        self.adapters, self.active, self.lora_scale = {}, {}, None
        self._originals, self._applied = {}, {}

    def lcm_hint(self, sampler: str, num_steps: int, guidance_scale: float) -> str | None:
        """Advice when an active LoRA is an LCM-LoRA and the settings are not LCM's; None otherwise."""
        lcm = [name for name in self.active if self.adapters[name].file.is_lcm]
        if not lcm or (sampler == "lcm" and num_steps <= _LCM_MAX_STEPS
                       and guidance_scale <= _LCM_MAX_GUIDANCE):
            return None
        return (f"{lcm[0]} is an LCM-LoRA: it makes images in 2-8 steps with {LCM_SETTINGS} (now sampler "
                f"{sampler}, {num_steps} steps, guidance {guidance_scale})")

    def _check_unfused(self, what: str) -> None:
        if self.lora_scale is not None:
            raise UserError(f"the LoRAs are fused: unfuse_lora() before {what}, or unload_lora_weights() to "
                            "keep the fused weights and start again from them")

    @torch.no_grad()
    def _apply(self) -> None:
        """Bring every adapted weight to original + Σ factor·delta for the active adapters."""
        factor = 1.0 if self.lora_scale is None else self.lora_scale
        wanted: dict[Target, list[tuple[str, float]]] = {}
        for name, weight in self.active.items():
            if weight:
                for target in self.adapters[name].targets:
                    wanted.setdefault(target, []).append((name, weight * factor))
        mappings = file_pages.file_mappings() if self.restorable else []
        for target in [*self._applied, *(t for t in wanted if t not in self._applied)]:
            plan = tuple(wanted.get(target, ()))
            if self._applied.get(target, ()) != plan:
                self._write(target, plan, mappings)

    def _write(self, target: Target, plan: tuple, mappings: list) -> None:
        """Swap in the weight of `target` for `plan`: its original plus the plan's deltas (an empty plan puts
        the original back); without originals, the current weight minus the last plan plus this one."""
        network, name = target
        module = self.networks[network].get_submodule(name)
        weight, undo = module.weight, ()
        base = self._originals.get(target, weight) if self.restorable else weight
        if not self.restorable:
            undo = self._applied.get(target, ())
        elif (base.dtype, base.device) != (weight.dtype, weight.device):
            # the model was cast or moved since: the original is now its cast, as the model's other weights
            base = nn.Parameter(base.to(weight.device, weight.dtype), base.requires_grad)
        if self.restorable and not plan:
            module.weight = base
            self._originals.pop(target, None)
            self._applied.pop(target, None)
            return
        total = base.detach().to(torch.float32, copy=True)
        for (adapter, factor), sign in [*((step, 1) for step in plan), *((step, -1) for step in undo)]:
            delta = self.adapters[adapter].targets[target].delta(total.device)
            total.add_(delta.view(total.shape), alpha=sign * factor)
        adapted = torch.empty_like(base)                # the original's dtype, device and memory layout
        adapted.copy_(total)
        module.weight = nn.Parameter(adapted, base.requires_grad)
        if self.restorable:
            if target not in self._originals:
                file_pages.release(base, mappings)      # a file-backed original is re-read when needed
            self._originals[target] = base
        self._applied[target] = plan
        if not plan:
            del self._applied[target]
