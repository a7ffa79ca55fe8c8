"""Prompt parsing, chunking and weighted encoding: A1111's emphasis syntax and 75-token chunks, pinned."""

import pytest
import torch

from nanodiffusion.errors import UserError
from nanodiffusion.nets.clip_text import TINY_TEXT, CLIPTextModel
from nanodiffusion.pipelines.prompts import (
    BREAK, apply_emphasis, count_chunks, encode_prompts, parse_prompt_attention, tokenize_prompt,
)
from fixtures import randomize_, write_clip_tokenizer
from nanodiffusion.tokenizer import CLIPTokenizer

BOS, EOS, COMMA, CAT = 49406, 49407, 267, 2368      # CLIP ids: <|startoftext|>, <|endoftext|>, ",", "cat"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp_path_factory.mktemp("clip") / "tokenizer"))


@pytest.fixture(scope="module")
def text_encoder() -> CLIPTextModel:
    torch.manual_seed(0)
    return randomize_(CLIPTextModel(TINY_TEXT), seed=3)


# A1111's own docstring examples (modules/prompt_parser.py), whose weights are bit-exact floats.
A1111_EXAMPLES = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
]

TRICKY = [
    ("", [("", 1.0)]),
    ("[[a]]", [("a", 1 / 1.1 * (1 / 1.1))]),
    ("((a:2))", [("a", 2.0 * 1.1)]),
    ("(a: 0.5 )", [("a", 0.5)]),
    ("(a:-1) b", [("a", -1.0), (" b", 1.0)]),
    ("a:1.3) b", [("a:1.3) b", 1.0)]),                   # no bracket open: the weight is text
    ("(a:1e3)", [("a:1e3", 1.1)]),                        # not a weight: ':' and '1e3' are text
    ("(a) b]", [("a", 1.1), (" b]", 1.0)]),               # an unmatched ']' is text
    ("\\\\(a)", [("\\", 1.0), ("a", 1.1)]),               # an escaped backslash, then a real bracket
    ("a\\b", [("ab", 1.0)]),                              # a lone backslash is dropped, as in A1111
    ("(a [b] c)", [("a ", 1.1), ("b", 1.1 * (1 / 1.1)), (" c", 1.1)]),
    ("[a:2]", [("a:2", 1 / 1.1)]),                        # square brackets take no weight
    ("a BREAK b", [("a", 1.0), BREAK, ("b", 1.0)]),
    ("(a BREAK b)", [("a", 1.1), BREAK, ("b", 1.1)]),     # brackets leave the break alone
    ("a break b", [("a break b", 1.0)]),                  # only the upper-case word
]


@pytest.mark.parametrize("text, expected", A1111_EXAMPLES + TRICKY, ids=lambda v: repr(v)[:30])
def test_parser_output_is_exact(text, expected):
    assert parse_prompt_attention(text) == expected


def test_bad_weight_is_a_user_error():
    with pytest.raises(UserError, match="bad emphasis weight '1.2.3'"):
        parse_prompt_attention("(a:1.2.3)")


@pytest.mark.parametrize("prompt", ["a photo of a cat", "", "A, B; c-d (x)"])
def test_plain_prompt_gives_the_tokenizer_ids(tokenizer, prompt):
    tokens = tokenize_prompt(tokenizer, prompt, emphasis="(" not in prompt)
    assert torch.equal(tokens.ids, tokenizer(prompt))
    assert tokens.ids.shape == (1, 77) and (tokens.weights == 1).all()


def test_weights_land_on_the_right_tokens(tokenizer):
    tokens = tokenize_prompt(tokenizer, "a (red:1.5) [cat] on (a mat)")
    words = tokenizer.encode("a red cat on a mat")
    assert tokens.ids[0, :len(words) + 2].tolist() == [BOS, *words, EOS]
    expected = [1.0, 1.0, 1.5, 1 / 1.1, 1.0, 1.1, 1.1] + [1.0] * 70           # BOS a red cat on a mat EOS...
    assert tokens.weights[0].tolist() == torch.tensor(expected, dtype=torch.float32).tolist()


def test_escaped_brackets_are_tokenized_as_text(tokenizer):
    tokens = tokenize_prompt(tokenizer, "a \\(cat\\)")
    assert torch.equal(tokens.ids, tokenizer("a (cat)")) and (tokens.weights == 1).all()


@pytest.mark.parametrize("words, chunks", [(75, 1), (76, 2), (150, 2), (151, 3)])
def test_chunks_hold_75_tokens(tokenizer, words, chunks):
    tokens = tokenize_prompt(tokenizer, "cat " * words)
    assert tokens.ids.shape == (chunks, 77) and count_chunks(tokenizer, "cat " * words) == chunks
    assert (tokens.ids[:, 0] == BOS).all()
    assert (tokens.ids == CAT).sum() == words
    for chunk in tokens.ids:                                    # each chunk: BOS, cats, EOS, EOS padding
        n = int((chunk == CAT).sum())
        assert chunk[1:n + 1].eq(CAT).all() and chunk[n + 1:].eq(EOS).all()


def test_a_shorter_text_context_gives_shorter_chunks(tokenizer):
    short = CLIPTokenizer(tokenizer.vocab, tokenizer.merges, model_max_length=12)     # 10 words per chunk
    tokens = tokenize_prompt(short, "cat " * 25)
    assert tokens.ids.shape == (3, 12) and (tokens.ids == CAT).sum() == 25
    assert torch.equal(tokenize_prompt(short, "cat " * 10).ids, short("cat " * 10))


def test_long_chunk_is_cut_after_the_last_comma(tokenizer):
    prompt = "cat " * 60 + ", " + "cat " * 30                 # the comma is token 61 of the first chunk
    tokens = tokenize_prompt(tokenizer, prompt)
    assert tokens.ids.shape == (2, 77)
    assert tokens.ids[0, 61].item() == COMMA and tokens.ids[0, 62:].eq(EOS).all()
    assert tokens.ids[1, 1:31].eq(CAT).all() and tokens.ids[1, 31] == EOS
    far = tokenize_prompt(tokenizer, "cat " * 50 + ", " + "cat " * 40)    # comma 25 tokens back: hard cut
    assert far.ids[0, 1:76].ne(EOS).all() and far.ids[1, 1:16].eq(CAT).all()
    hard = tokenize_prompt(tokenizer, prompt, comma_backtrack=0)
    assert hard.ids[0, 1:76].ne(EOS).all()


def test_break_starts_a_new_chunk(tokenizer):
    tokens = tokenize_prompt(tokenizer, "a cat BREAK a dog")
    assert tokens.ids.shape == (2, 77)
    assert torch.equal(tokens.ids, torch.cat([tokenizer("a cat"), tokenizer("a dog")]))


def test_plain_prompts_encode_to_exactly_the_plain_clip_states(tokenizer, text_encoder):
    prompts = ["a photo of a cat", "an astronaut riding a horse", ""]
    with torch.no_grad():
        expected = text_encoder(tokenizer(prompts)).hidden_states
        states = encode_prompts(text_encoder, tokenizer, prompts)
    assert states.shape == (3, 77, 32) and torch.equal(states, expected)


def test_emphasis_scales_token_states_and_keeps_the_chunk_mean(tokenizer, text_encoder):
    with torch.no_grad():
        plain = text_encoder(tokenizer(["a red cat"])).hidden_states[0]           # (77, D)
        states = encode_prompts(text_encoder, tokenizer, ["a (red:1.5) cat"])[0]
    weights = torch.ones(77)
    weights[2] = 1.5
    scaled = plain * weights[:, None]
    expected = scaled * (plain.mean() / scaled.mean())
    assert torch.allclose(states, expected, atol=1e-6)
    assert abs(states.mean() - plain.mean()) < 1e-6
    ratio = states / plain                                    # one common factor, and 1.5 times it on "red"
    assert torch.allclose(ratio[2], 1.5 * ratio[0], rtol=1e-5)


def test_apply_emphasis_leaves_unit_weights_alone():
    states = torch.randn(2, 77, 8)
    weights = torch.ones(2, 77)
    assert torch.equal(apply_emphasis(states, weights), states)
    weights[1, 3] = 2.0
    out = apply_emphasis(states, weights)
    assert torch.equal(out[0], states[0]) and not torch.equal(out[1], states[1])


def test_long_prompts_concatenate_chunk_states_and_pad_with_empty_chunks(tokenizer, text_encoder):
    long = "cat " * 80
    with torch.no_grad():
        states = encode_prompts(text_encoder, tokenizer, [long, "a dog"])
        chunks = tokenize_prompt(tokenizer, long).ids                             # (2, 77)
        separately = text_encoder(torch.cat([chunks, tokenizer(["a dog", ""])])).hidden_states
    assert states.shape == (2, 154, 32)
    assert torch.allclose(states[0], separately[:2].flatten(0, 1), atol=1e-6)
    assert torch.allclose(states[1, :77], separately[2], atol=1e-6)
    assert torch.allclose(states[1, 77:], separately[3], atol=1e-6)            # the padding chunk is ""
    with torch.no_grad():
        three = encode_prompts(text_encoder, tokenizer, ["a dog"], num_chunks=3)
    assert three.shape == (1, 231, 32)
    with pytest.raises(UserError, match="num_chunks=1"):
        encode_prompts(text_encoder, tokenizer, [long], num_chunks=1)
