"""Prompts as the AUTOMATIC1111 web UI reads them: emphasis syntax, 75-token chunks, weighted CLIP states.

Emphasis: `(text)` multiplies the weight of its tokens by 1.1, `[text]` divides it by 1.1 and `(text:1.3)`
multiplies it by 1.3. Brackets nest and multiply; a bracket left open runs to the end of the prompt, a
closing bracket with nothing open is plain text, and `\\(`, `\\)`, `\\[`, `\\]`, `\\\\` stand for the
characters themselves. The word BREAK (upper case) ends the current chunk.

CLIP reads at most 77 tokens. A longer prompt is cut into chunks of 75 tokens, each wrapped in
<|startoftext|> ... <|endoftext|> and padded to 77 (a text encoder with a shorter context, as in the small
models nanodiffusion trains, gets chunks of its tokenizer's model_max_length - 2); the chunks are encoded separately and their states
concatenated along the sequence, which the UNet's cross-attention accepts at any length. Near a chunk's end
the cut moves back to just after the last comma (at most `comma_backtrack` tokens back, 20 in A1111), so a
comma-separated phrase stays whole. A prompt without emphasis that fits in one chunk gives exactly the ids
of `tokenizer(prompt)`, hence exactly the plain CLIP states.
"""

import re
from typing import NamedTuple

import torch

from nanodiffusion.errors import UserError
from nanodiffusion.nets.clip_text import CLIPTextModel
from nanodiffusion.tokenizer import CLIPTokenizer

ROUND_FACTOR = 1.1
SQUARE_FACTOR = 1 / 1.1         # a multiplication by 1/1.1, as A1111 does: bit for bit its weights
BREAK = ("BREAK", -1.0)         # the chunk break in parse_prompt_attention's output, as A1111 writes it
COMMA = ",</w>"
CHUNK_LENGTH = 75               # tokens per chunk of CLIP, without the start and end tokens
COMMA_BACKTRACK = 20
MAX_WEIGHT = torch.finfo(torch.float32).max

# One lexical token per match, tried in this order: an escape (a backslash followed by something other than
# a bracket or a backslash is dropped, as in A1111), ":1.3)" closing a weighted bracket, a bracket, a run of
# plain text, or a colon that starts no weight (then it is text).
_TOKEN = re.compile(r"""
      \\[()\[\]\\]?
    | :\s*([+-]?[.\d]+)\s*\)
    | [()\[\]]
    | [^\\()\[\]:]+
    | :
""", re.VERBOSE)
_BREAK_WORD = re.compile(r"\s*\bBREAK\b\s*")


class PromptTokens(NamedTuple):
    """A prompt's chunks: ids (K, 77), BOS, up to 75 tokens, EOS, pads; weights (K, 77), 1 on BOS/EOS/pads."""

    ids: torch.Tensor
    weights: torch.Tensor


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split a prompt into (text, weight) runs, A1111's `parse_prompt_attention`; BREAK marks a chunk break.

    Neighbouring runs of equal weight are merged, and an empty prompt gives [("", 1.0)]. Weights are
    multiplied in the order the brackets close, so they equal A1111's to the last bit.
    """
    parts: list = []                                    # [text, weight] lists, or BREAK
    open_round: list[int] = []                          # where each open bracket's text starts in `parts`
    open_square: list[int] = []

    def scale(start: int, factor: float) -> None:
        for part in parts[start:]:
            if part is not BREAK:
                part[1] *= factor

    for match in _TOKEN.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            parts.append([token[1:], 1.0])
        elif token == "(":
            open_round.append(len(parts))
        elif token == "[":
            open_square.append(len(parts))
        elif weight is not None and open_round:
            scale(open_round.pop(), _weight(weight, text))
        elif token == ")" and open_round:
            scale(open_round.pop(), ROUND_FACTOR)
        elif token == "]" and open_square:
            scale(open_square.pop(), SQUARE_FACTOR)
        else:
            for i, piece in enumerate(_BREAK_WORD.split(token)):
                parts += [BREAK, [piece, 1.0]] if i else [[piece, 1.0]]
    for start in open_round:
        scale(start, ROUND_FACTOR)
    for start in open_square:
        scale(start, SQUARE_FACTOR)
    merged: list = []
    for part in parts or [["", 1.0]]:
        if merged and part is not BREAK and merged[-1] is not BREAK and merged[-1][1] == part[1]:
            merged[-1][0] += part[0]
        else:
            merged.append(part)
    for part in merged:
        if part is not BREAK and not abs(part[1]) <= MAX_WEIGHT:       # the weights become float32
            raise UserError(f"the emphasis weight of {part[0][:40]!r} is {part[1]:g} (brackets multiply it: "
                            "thousands of nested brackets or (word:1e400) overflow): use weights near 1")
    return [part if part is BREAK else (part[0], part[1]) for part in merged]


def _weight(value: str, prompt: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise UserError(f"bad emphasis weight {value!r} in prompt {prompt!r}: write e.g. (word:1.3)") \
            from None


def tokenize_prompt(tokenizer: CLIPTokenizer, prompt: str, *, emphasis: bool = True,
                    comma_backtrack: int = COMMA_BACKTRACK) -> PromptTokens:
    """Token ids and weights of `prompt` in chunks of 75 tokens (A1111's `tokenize_line`); see the module doc.

    `emphasis=False` reads the prompt as plain text (brackets included); `comma_backtrack=0` cuts every 75.
    """
    runs = parse_prompt_attention(prompt) if emphasis else [(prompt, 1.0)]
    comma, chunk_length = tokenizer.vocab.get(COMMA), chunk_length_of(tokenizer)
    chunks: list[tuple[list[int], list[float]]] = []
    ids: list[int] = []
    weights: list[float] = []
    last_comma = -1                                     # position of the last comma in the open chunk
    for run in runs:
        if run is BREAK:
            chunks.append((ids, weights))
            ids, weights, last_comma = [], [], -1
            continue
        text, weight = run
        for token in tokenizer.encode(text):
            if token == comma:
                last_comma = len(ids)
            elif len(ids) == chunk_length and last_comma >= 0 and len(ids) - last_comma <= comma_backtrack:
                cut = last_comma + 1                    # move the words after the comma to the next chunk
                chunks.append((ids[:cut], weights[:cut]))
                ids, weights, last_comma = ids[cut:], weights[cut:], -1
            if len(ids) == chunk_length:
                chunks.append((ids, weights))
                ids, weights, last_comma = [], [], -1
            ids.append(token)
            weights.append(weight)
    if ids or not chunks:
        chunks.append((ids, weights))
    return _wrap_chunks(tokenizer, chunks)


def _wrap_chunks(tokenizer: CLIPTokenizer, chunks: list[tuple[list[int], list[float]]]) -> PromptTokens:
    rows, row_weights = [], []
    for ids, weights in chunks:
        pad = chunk_length_of(tokenizer) - len(ids)
        rows.append([tokenizer.bos_token_id, *ids, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * pad)
        row_weights.append([1.0, *weights, 1.0] + [1.0] * pad)
    return PromptTokens(torch.tensor(rows, dtype=torch.long),                    # (K, 77)
                        torch.tensor(row_weights, dtype=torch.float32))          # (K, 77)


def chunk_length_of(tokenizer: CLIPTokenizer) -> int:
    """Prompt tokens per chunk: 75 for CLIP (its 77 positions less the start and end tokens)."""
    return tokenizer.model_max_length - 2


def count_chunks(tokenizer: CLIPTokenizer, prompt: str, *, emphasis: bool = True) -> int:
    """Number of 77-token chunks `prompt` takes (1 for up to 75 tokens)."""
    return len(tokenize_prompt(tokenizer, prompt, emphasis=emphasis).ids)


def apply_emphasis(hidden_states: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Scale each token's states by its weight, then rescale each chunk to its former mean (A1111's
    "Original" emphasis). `hidden_states` (N, 77, D) and `weights` (N, 77); computed in float32.

    A1111 takes the mean over the whole batch of prompts; we take it per chunk, so that a prompt's states do
    not depend on the other prompts in the batch (the same for a batch of one).
    """
    weights = weights.to(hidden_states.device)
    if (weights == 1).all():
        return hidden_states
    states = hidden_states.float()
    weighted = states * weights[..., None]
    mean_before = states.mean(dim=(1, 2), keepdim=True)                          # (N, 1, 1)
    weighted = weighted * (mean_before / weighted.mean(dim=(1, 2), keepdim=True))
    if not weighted.isfinite().all():
        raise UserError(f"the prompt's emphasis weights (largest {weights.abs().max().item():g}) make the "
                        "text states overflow: use weights near 1 (A1111's range is about 0.5 to 1.5)")
    plain = (weights == 1).all(dim=1)[:, None, None]                             # chunks left as they are
    return torch.where(plain, states, weighted).to(hidden_states.dtype)


def encode_prompts(text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, prompts: list[str], *,
                   num_chunks: int | None = None, clip_skip: int = 1, emphasis: bool = True) -> torch.Tensor:
    """CLIP states (B, 77·K, D) of `prompts`, chunked and weighted as A1111 does; one encoder call.

    Every prompt is padded to K chunks (`num_chunks`, at least the longest prompt's count) with empty chunks,
    as A1111 pads a prompt and its negative prompt to the same length.
    """
    tokens = [tokenize_prompt(tokenizer, prompt, emphasis=emphasis) for prompt in prompts]
    longest = max(len(t.ids) for t in tokens)
    num_chunks = num_chunks or longest
    if num_chunks < longest:
        raise UserError(f"num_chunks={num_chunks} is less than the {longest} chunks of the longest prompt")
    empty = _wrap_chunks(tokenizer, [([], [])])
    ids = torch.stack([torch.cat([t.ids, empty.ids.expand(num_chunks - len(t.ids), -1)]) for t in tokens])
    weights = torch.stack([torch.cat([t.weights, empty.weights.expand(num_chunks - len(t.ids), -1)])
                           for t in tokens])                                     # (B, K, 77)
    device = next(text_encoder.parameters()).device
    states = text_encoder(ids.flatten(0, 1).to(device), clip_skip=clip_skip).hidden_states   # (B·K, 77, D)
    states = apply_emphasis(states, weights.flatten(0, 1))
    return states.reshape(len(prompts), num_chunks * states.shape[1], states.shape[2])       # (B, 77·K, D)
