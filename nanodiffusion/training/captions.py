"""The text side of a new text-to-image model: a BPE tokenizer learned on a captioned data set's captions,
and a text encoder over that vocabulary, initialised as CLIP's."""

import dataclasses

import torch
from torch import nn

from nanodiffusion.data.captioned import CaptionedDataset
from nanodiffusion.errors import UserError
from nanodiffusion.nets.clip_text import CLIPTextConfig, CLIPTextModel
from nanodiffusion.tokenizer import CLIPTokenizer, train_bpe

# A small CLIP text transformer (1/12 of SD's width); vocabulary and token ids come from the tokenizer.
SMALL_TEXT = CLIPTextConfig(hidden_size=128, num_layers=4, num_heads=4, intermediate_size=512)


def all_captions(dataset: CaptionedDataset) -> list[str]:
    """Every caption the items may draw: each item's every wording, so that frequencies follow the data."""
    return [caption for choices in dataset.caption_choices for caption in choices]


def caption_tokenizer(dataset: CaptionedDataset, vocab_size: int, max_length: int = 77) -> CLIPTokenizer:
    """A CLIP-style BPE tokenizer trained on the data set's captions (`tokenizer.train_bpe`), reading
    `max_length` ids per prompt (specials included); a UserError if a caption would not fit."""
    captions = all_captions(dataset)
    tokenizer = train_bpe(captions, vocab_size, model_max_length=max_length)
    longest = max(captions, key=lambda caption: len(tokenizer.encode(caption)))
    if len(tokenizer.encode(longest)) + 2 > max_length:
        raise UserError(f"the caption {longest!r} is {len(tokenizer.encode(longest)) + 2} tokens with start "
                        f"and end, more than the text context of {max_length}: raise it")
    return tokenizer


def text_config_for(tokenizer: CLIPTokenizer, base: CLIPTextConfig = SMALL_TEXT) -> CLIPTextConfig:
    """`base` with the tokenizer's vocabulary size, special token ids and context length."""
    return dataclasses.replace(base, vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_token_id,
                               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                               max_positions=tokenizer.model_max_length)


def check_tokenizer(tokenizer: CLIPTokenizer, config: CLIPTextConfig) -> None:
    """Raise a UserError unless the text encoder `config` reads this tokenizer's ids."""
    ids = (tokenizer.vocab_size, tokenizer.bos_token_id, tokenizer.eos_token_id)
    if ids != (config.vocab_size, config.bos_token_id, config.eos_token_id):
        raise UserError(f"the tokenizer (vocabulary {ids[0]}, start/end ids {ids[1]}/{ids[2]}) does not "
                        f"match the text encoder (vocabulary {config.vocab_size}, start/end ids "
                        f"{config.bos_token_id}/{config.eos_token_id})")
    if tokenizer.model_max_length > config.max_positions:
        raise UserError(f"the tokenizer pads prompts to {tokenizer.model_max_length} ids but the text encoder "
                        f"reads at most {config.max_positions}")


def new_text_encoder(tokenizer: CLIPTokenizer, base: CLIPTextConfig = SMALL_TEXT, *,
                     seed: int = 0) -> CLIPTextModel:
    """A text encoder of `base`'s size over the tokenizer's vocabulary, initialised as CLIP's from
    Generator(seed) alone (the global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return init_clip_text_(CLIPTextModel(text_config_for(tokenizer, base)))


@torch.no_grad()
def init_clip_text_(model: CLIPTextModel) -> CLIPTextModel:
    """CLIP's initialisation, in place (openai/CLIP model.py, `initialize_parameters`): small embeddings and
    projections scaled by 1/sqrt(width), residual outputs also by 1/sqrt(2·layers). PyTorch's defaults
    (N(0, 1) embeddings) leave a new text encoder's outputs nearly equal for every caption, and contrastive
    training stalls at chance."""
    config, text = model.config, model.text_model
    width, residual = config.hidden_size ** -0.5, (2 * config.num_layers) ** -0.5
    nn.init.normal_(text.embeddings.token_embedding.weight, std=0.02)
    nn.init.normal_(text.embeddings.position_embedding.weight, std=0.01)
    for layer in text.encoder.layers:
        attention, mlp = layer.self_attn, layer.mlp
        stds = {attention.q_proj: width, attention.k_proj: width, attention.v_proj: width,
                attention.out_proj: width * residual, mlp.fc1: (2 * config.hidden_size) ** -0.5,
                mlp.fc2: width * residual}
        for linear, std in stds.items():
            nn.init.normal_(linear.weight, std=std)
            nn.init.zeros_(linear.bias)
    return model
