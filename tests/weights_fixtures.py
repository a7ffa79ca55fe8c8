"""Tiny Stable Diffusion components with random weights, shared by the weights tests."""

import dataclasses
import functools

import torch

from nanodiffusion.nets.clip_text import TINY_TEXT, CLIPTextConfig, CLIPTextModel
from nanodiffusion.nets.sd_unet import TINY_UNET, SDUNet, SDUNetConfig
from nanodiffusion.nets.vae import TINY_VAE, AutoencoderKL, VAEConfig
from nanodiffusion.tokenizer import CLIPTokenizer, train_bpe
from nanodiffusion.weights import SDComponents

PROMPTS = ["a photo of a cat", "an astronaut riding a horse on the moon", "a watercolor painting of a fox"]


@functools.cache
def tiny_tokenizer() -> CLIPTokenizer:
    """A CLIP-style BPE with about 600 ids, trained on a few prompts (seconds, no download)."""
    return train_bpe(PROMPTS * 20, vocab_size=600)


def tiny_text_config(tokenizer: CLIPTokenizer | None = None) -> CLIPTextConfig:
    """TINY_TEXT resized to the tiny tokenizer's vocabulary and special ids."""
    tokenizer = tokenizer or tiny_tokenizer()
    return dataclasses.replace(TINY_TEXT, vocab_size=tokenizer.vocab_size,
                               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                               pad_token_id=tokenizer.pad_token_id)


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter (norms and biases too) random, so no path hides behind a zero or a one."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return module.eval()


def random_components(unet: SDUNetConfig = TINY_UNET, vae: VAEConfig = TINY_VAE,
                      text: CLIPTextConfig | None = None, seed: int = 0) -> SDComponents:
    """SDComponents of random networks with the tiny tokenizer."""
    return SDComponents(unet=randomize_(SDUNet(unet), seed), vae=randomize_(AutoencoderKL(vae), seed + 1),
                        text_encoder=randomize_(CLIPTextModel(text or tiny_text_config()), seed + 2),
                        tokenizer=tiny_tokenizer())


def assert_same_weights(a: SDComponents, b: SDComponents) -> None:
    """Same configs, keys, dtypes and values in all three networks."""
    for name, network in a.networks().items():
        other = b.networks()[name]
        assert network.config == other.config, name
        first, second = network.state_dict(), other.state_dict()
        assert first.keys() == second.keys(), name
        for key in first:
            assert first[key].dtype == second[key].dtype, f"{name}.{key}"
            assert torch.equal(first[key], second[key]), f"{name}.{key}"
