"""CLIP tokenizer: on CLIP's real vocabulary, ids equal transformers' CLIPTokenizer and OpenAI's algorithm."""

import json
import math
import random
import unicodedata
import warnings
from pathlib import Path

import pytest
import torch

from nanodiffusion.errors import UserError
from nanodiffusion.tokenizer import CLIPTokenizer, byte_alphabet, train_bpe, vocab_from_merges
from fixtures import write_clip_tokenizer

EOS, BOS = 49407, 49406

TRICKY = [
    "a photo of a cat",
    "",
    "   ",
    "A Photo OF a CAT!!!",
    "hello, world... (really?) [yes] {no} <maybe> @user #tag $5 100% a&b a*b ~x~ `code`",
    "1,234.56 and 1234567890 and 3.14159e-10 and -42 and ½ ² ٣ ๓",
    "don't can't won't it's I'm you're we've they'll he'd O'Neil 'quoted' \"double\"",
    "DON'T IT'S I'M",
    "café naïve résumé Ångström façade Zoë coöperate",
    "cafe\u0301 nai\u0308ve",                                         # decomposed accents: NFC composes them
    "日本語のテキスト 中文字符 한국어 텍스트",
    "emoji 🐱🔥 👩‍👩‍👧 🇫🇷 ❤️ ✨✨✨",
    "multiple   spaces\tand\ttabs\nand\nnewlines\r\n\u00a0nbsp\u2003em-space\u3000ideographic",
    "  leading and trailing whitespace  ",
    "UPPER lower MiXeD İstanbul ß ǅ Σίσυφος",
    "masterpiece, best quality, (extremely detailed:1.2), 8k, ((ultra-detailed)), [sharp focus]",
    "a<|endoftext|>b <|startoftext|> c",
    "<|ENDOFTEXT|> is spelled out",      # not "<|StartOfText|>": see the note in CLIPTokenizer.__init__
    "control\x00chars\x07here\x1b[0m and zero\u200bwidth and soft\u00adhyphen",
    "Ǆemal  ﬁnancial ﬀ Ⅻ ℌ ①",                                       # NFC keeps compatibility characters
    "http://example.com/path?query=1&b=2#frag user@example.org",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa zzzzzzzzz",
    "an astronaut riding a horse on the moon, " * 8,                  # longer than 77 tokens: truncated
    "ab" * 200,
]


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> Path:
    """CLIP's real vocabulary as SD v1.x's `tokenizer/` folder, specials as transformers wrote them."""
    return write_clip_tokenizer(tmp_path_factory.mktemp("sd15") / "tokenizer")


@pytest.fixture(scope="module")
def clip(clip_folder) -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(clip_folder.parent)        # the diffusers root: finds tokenizer/


def reference_tokenizers(folder: Path) -> list:
    """transformers' CLIPTokenizer and CLIPTokenizerFast (one class since transformers 5) for `folder`."""
    transformers = pytest.importorskip("transformers")
    classes = dict.fromkeys(getattr(transformers, name) for name in ("CLIPTokenizer", "CLIPTokenizerFast")
                            if hasattr(transformers, name))
    return [cls.from_pretrained(folder) for cls in classes]


def random_strings(count: int, seed: int = 0) -> list[str]:
    pool = ("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789" + "       \t\n" +
            ".,;:!?'\"()[]{}<>|/\\-_=+*&^%$#@~`" + "éèêëïîôöüçñÅßøæœ" + "日本語中文한국" + "🐱🔥✨❤\u0301\u200d\ufe0f")
    rng = random.Random(seed)
    strings = ["".join(rng.choice(pool) for _ in range(rng.randint(1, 60))) for _ in range(count)]
    words = ["don't", "it's", "<|endoftext|>", "we'll", "I'd", "1,000", "''s", "'S"]
    return strings + [" ".join(rng.choice(words) for _ in range(5)) for _ in range(count // 4)]


def openai_bpe_ids(text: str, vocab: dict[str, int], ranks: dict[tuple[str, str], int]) -> list[int]:
    """OpenAI CLIP's algorithm (simple_tokenizer.py) in plain Python: regex words, bytes, BPE by rank."""
    regex = pytest.importorskip("regex")
    kept = [b for b in range(256) if chr(b).isprintable() and b != ord(" ")]
    others = [b for b in range(256) if b not in kept]
    byte_char = {**{b: chr(b) for b in kept}, **{b: chr(256 + n) for n, b in enumerate(others)}}
    text = regex.sub(r"\s+", " ", unicodedata.normalize("NFC", text)).strip().lower()
    pattern = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
    ids = []
    for word in regex.findall(pattern, text, regex.IGNORECASE):
        symbols = [byte_char[b] for b in word.encode("utf-8")]
        symbols[-1] += "</w>"
        while len(symbols) > 1:
            rank, first = min((ranks.get(pair, math.inf), pair) for pair in zip(symbols, symbols[1:]))
            if rank == math.inf:
                break
            merged, i = [], 0
            while i < len(symbols):                                  # merge every occurrence, left to right
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == first:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        ids += [vocab[symbol] for symbol in symbols]
    return ids


def test_fixture_vocabulary_has_clip_layout(clip_folder):
    vocab = json.loads((clip_folder / "vocab.json").read_text(encoding="utf-8"))
    lines = (clip_folder / "merges.txt").read_text("utf-8").split("\n")
    merges = [tuple(line.split(" ")) for line in lines[1:] if line]
    assert len(merges) == 48894 and len(vocab) == 49408
    assert vocab_from_merges(merges) == vocab
    assert vocab["<|startoftext|>"] == BOS and vocab["<|endoftext|>"] == EOS
    assert len(set(byte_alphabet())) == 256 and vocab["!"] == 0 and vocab["a</w>"] == 320


def test_known_stable_diffusion_ids(clip):
    ids = clip(["a photo of a cat", "an astronaut riding a horse"])
    assert ids.shape == (2, 77) and ids.dtype == torch.long
    assert ids[0, :8].tolist() == [BOS, 320, 1125, 539, 320, 2368, EOS, EOS]    # SD v1.x pads with EOS
    assert ids[1, :7].tolist() == [BOS, 550, 18376, 6765, 320, 4558, EOS]
    assert (ids[:, 7:] == EOS).all()


def test_matches_transformers_on_tricky_strings(clip, clip_folder):
    for reference in reference_tokenizers(clip_folder):
        expected = reference(TRICKY, padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert torch.equal(clip(TRICKY), expected.input_ids)
        for text in TRICKY:
            assert clip.encode(text) == reference(text, add_special_tokens=False).input_ids, text


def test_matches_transformers_on_random_strings(clip, clip_folder):
    strings = random_strings(400)
    for reference in reference_tokenizers(clip_folder):
        expected = reference(strings, add_special_tokens=False).input_ids
        assert [clip.encode(text) for text in strings] == expected


def test_matches_openai_bpe_algorithm(clip):
    ranks = {pair: rank for rank, pair in enumerate(clip.merges)}
    # Upper-case specials are left out: OpenAI maps them to the special ids, transformers (and we) spell them.
    strings = [text for text in TRICKY + random_strings(200, seed=1) if "|" not in text]
    for text in strings:
        assert clip.encode(text) == openai_bpe_ids(text, clip.vocab, ranks), text


def test_truncation_warns_with_the_dropped_text(clip):
    prompt = " ".join(f"word{i}" for i in range(40)) + " tail end"    # "word7" is 2 tokens: ~80 in all
    with pytest.warns(UserWarning, match="tail end"):
        ids = clip(prompt)
    assert ids.shape == (1, 77) and ids[0, 0] == BOS and ids[0, -1] == EOS
    assert ids[0, 1:76].tolist() == clip.encode(prompt)[:75]
    with pytest.raises(UserError, match="max_length=77"):
        clip(prompt, truncation=False)


def test_padding_and_decode(clip):
    ids = clip(["a cat", "a photo of a dog"], padding="longest")
    assert ids.tolist() == [[BOS, 320, 2368, EOS, EOS, EOS, EOS], [BOS, 320, 1125, 539, 320, 1929, EOS]]
    # CLIP's words are "don" and "'t".
    assert clip.decode(clip.encode("A  photo\tof café,  don't!")) == "a photo of café , don 't !"
    with pytest.raises(UserError, match="padding"):
        clip("a cat", padding="do_not_pad")


def test_from_pretrained_reads_special_tokens(clip_folder, tmp_path):
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((clip_folder / name).read_bytes())
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": "!"}))      # as SD v2.x
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path)
    assert tokenizer.pad_token_id == 0 and tokenizer("a cat")[0, :5].tolist() == [BOS, 320, 2368, EOS, 0]
    with pytest.raises(UserError, match="vocab.json"):
        CLIPTokenizer.from_pretrained(tmp_path / "missing")
    with pytest.raises(UserError, match="not in the vocabulary"):
        CLIPTokenizer.from_files(tmp_path / "vocab.json", tmp_path / "merges.txt", pad_token="<pad>")
    for reference in reference_tokenizers(tmp_path):       # transformers also matches "!" whole, as we do
        expected = reference(TRICKY[:8], padding="max_length", max_length=77, return_tensors="pt")
        assert torch.equal(tokenizer(TRICKY[:8]), expected.input_ids)


def captions(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    nouns = "cat dog horse astronaut castle forest river portrait city street robot dragon flower".split()
    adjectives = "red blue golden ancient futuristic misty tiny giant glowing wooden".split()
    styles = "oil painting, watercolor, photograph, 35mm film, digital art, pencil sketch".split(", ")
    return [f"a {rng.choice(adjectives)} {rng.choice(nouns)} near the {rng.choice(nouns)}, "
            f"{rng.choice(styles)} #{rng.randint(0, 999)}" for _ in range(count)]


def test_train_bpe_round_trips_through_files(tmp_path):
    corpus = captions(300)
    tokenizer = train_bpe(corpus, 600)
    assert tokenizer.vocab_size == 600 and (tokenizer.bos_token_id, tokenizer.eos_token_id) == (598, 599)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    assert len(tokenizer.encode(corpus[0])) < len(corpus[0].encode("utf-8")) / 2       # it learned something
    tokenizer.save_pretrained(tmp_path)
    loaded = CLIPTokenizer.from_files(tmp_path / "vocab.json", tmp_path / "merges.txt")
    assert (loaded.vocab, loaded.merges) == (tokenizer.vocab, tokenizer.merges)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(loaded(corpus[:20] + TRICKY), tokenizer(corpus[:20] + TRICKY))


def test_trained_bpe_matches_transformers_and_openai_algorithm(tmp_path):
    corpus = captions(300)
    tokenizer = train_bpe(corpus, 600)
    ranks = {pair: rank for rank, pair in enumerate(tokenizer.merges)}
    for text in corpus[:20] + TRICKY[:16]:                          # unseen characters fall back to bytes
        assert tokenizer.encode(text) == openai_bpe_ids(text, tokenizer.vocab, ranks), text
    tokenizer.save_pretrained(tmp_path)
    strings = corpus[:20] + TRICKY
    for reference in reference_tokenizers(tmp_path):                # reads what save_pretrained wrote
        expected = reference(strings, padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert torch.equal(tokenizer(strings), expected.input_ids)


def test_train_bpe_rejects_a_vocabulary_without_room_for_bytes():
    with pytest.raises(UserError, match="at least 514"):
        train_bpe(["a cat"], 500)


def test_a_short_text_context_is_saved_loaded_and_read_by_transformers(tmp_path):
    corpus = captions(300)
    tokenizer = train_bpe(corpus, 600, model_max_length=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                                  # long captions are cut
        ids = tokenizer(corpus[:20])
    assert ids.shape == (20, 16)
    tokenizer.save_pretrained(tmp_path)
    assert not list(tmp_path.glob(".*.tmp"))                             # written atomically, nothing left
    loaded = CLIPTokenizer.from_pretrained(tmp_path)
    assert loaded.model_max_length == 16
    for reference in reference_tokenizers(tmp_path):
        assert reference.model_max_length == 16
        expected = reference(corpus[:20], padding="max_length", max_length=16, truncation=True,
                             return_tensors="pt")
        assert torch.equal(ids, expected.input_ids)
    with pytest.raises(UserError, match="model_max_length"):
        train_bpe(corpus, 600, model_max_length=2)
