"""The adapter methods of a text-to-image pipeline under diffusers' names: LoRAs (kohya/A1111, diffusers/PEFT),
textual inversion, and A1111's folders (`<lora:NAME:W>` prompt tags, an embeddings folder). The work is done
in nanodiffusion/adapters; this only binds it to a pipeline's UNet, text encoder and tokenizer.
"""

import functools
from pathlib import Path

from nanodiffusion.adapters import LoRAAdapters, load_textual_inversion
from nanodiffusion.adapters.prompt_loras import LoRAFolder, PromptLoRAs
from nanodiffusion.adapters.textual_inversion import load_embedding_folder


class AdapterMethods:
    """Mixed into TextToImage, which provides `unet`, `text_encoder` and `tokenizer`."""

    # LoRA and textual inversion (nanodiffusion/adapters), under diffusers' method names.
    @functools.cached_property
    def lora(self) -> LoRAAdapters:
        """The LoRAs loaded into the UNet and the text encoder (see adapters/lora.py)."""
        return LoRAAdapters({"unet": self.unet, "text_encoder": self.text_encoder})

    def load_lora_weights(self, path: str | Path, adapter_name: str | None = None) -> str:
        """Load a LoRA file (kohya/A1111 or diffusers/PEFT) as the one active adapter; returns its name."""
        return self.lora.load_lora_weights(path, adapter_name)

    def set_adapters(self, adapter_names: str | list[str],
                     adapter_weights: float | list[float] | None = None) -> None:
        """Make exactly these loaded LoRAs active, each with its weight."""
        self.lora.set_adapters(adapter_names, adapter_weights)

    def fuse_lora(self, lora_scale: float = 1.0) -> None:
        """Fix the active LoRAs into the weights, times `lora_scale`."""
        self.lora.fuse_lora(lora_scale)

    def unfuse_lora(self) -> None:
        """Undo fuse_lora: the active LoRAs at their own weights."""
        self.lora.unfuse_lora()

    def unload_lora_weights(self) -> None:
        """Forget every LoRA: the original weights come back exactly (the fused ones stay after fuse_lora)."""
        self.lora.unload_lora_weights()

    def load_textual_inversion(self, path: str | Path, token: str | None = None) -> str:
        """Add a textual-inversion embedding to the tokenizer and text encoder; returns its prompt token."""
        return load_textual_inversion(self.text_encoder, self.tokenizer, path, token)

    # A1111's folders: <lora:NAME:W> in prompts from a LoRA folder, embeddings named by their files.
    @functools.cached_property
    def prompt_loras(self) -> PromptLoRAs:
        """Applies the `<lora:NAME:W>` tags of each generation's prompts (adapters/prompt_loras.py)."""
        return PromptLoRAs(self.lora)

    def set_lora_dir(self, folder: str | Path | None) -> None:
        """Where `<lora:NAME:W>` in a prompt finds NAME.safetensors (None: tags are an error)."""
        self.prompt_loras.folder = LoRAFolder(folder) if folder is not None else None

    def load_embeddings_dir(self, folder: str | Path) -> tuple[dict, dict]:
        """Load every textual-inversion embedding in `folder`, each named by its file's stem; returns
        (loaded, skipped) as A1111's GET /sdapi/v1/embeddings, also kept in `self.embeddings`."""
        self.embeddings = load_embedding_folder(self.text_encoder, self.tokenizer, folder)
        return self.embeddings

    def lora_hashes(self) -> dict[str, str]:
        """{name: A1111 short hash} of the active LoRAs: the "Lora hashes" of the images made now."""
        return self.prompt_loras.hashes()
