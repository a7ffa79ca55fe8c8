"""Adapters that change a loaded model without replacing it: LoRA files and textual-inversion embeddings.

    adapters = LoRAAdapters({"unet": pipe.unet, "text_encoder": pipe.text_encoder})
    adapters.load_lora_weights("style.safetensors", adapter_name="style")
    load_textual_inversion(pipe.text_encoder, pipe.tokenizer, "easynegative.safetensors")
"""

from nanodiffusion.adapters.lora import LoRAAdapters
from nanodiffusion.adapters.textual_inversion import load_textual_inversion

__all__ = ["LoRAAdapters", "load_textual_inversion"]
