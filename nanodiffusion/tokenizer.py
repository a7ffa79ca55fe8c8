"""CLIP's byte-level BPE tokenizer (Radford et al. 2021, §2.4), built on the `tokenizers` library.

Text is NFC-normalised, runs of whitespace become one space, and it is lower-cased; CLIP's regex splits it
into words, each word's UTF-8 bytes are spelled with 256 printable characters (GPT-2's byte-level alphabet),
and BPE merges them, the last symbol of a word carrying the suffix `</w>`. This is what transformers'
CLIPTokenizer does, and so what every Stable Diffusion pipeline sees. OpenAI's original also runs
`ftfy.fix_text` and `html.unescape`; transformers does not, and neither do we.
"""

import gzip
import json
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

from nanodiffusion.atomic import atomic_write
from nanodiffusion.errors import UserError

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
# CLIP's word splitter (openai/CLIP simple_tokenizer.py): the two specials, English contractions, letter
# runs, single digits ("1,234" is five words) and runs of other non-space characters.
CLIP_SPLIT_PATTERN = (r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"
                      r"[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+")
MERGES_HEADER = "#version: 0.2"
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "pad_token", "unk_token")
CLIP_MAX_LENGTH = 77            # CLIP's context: <|startoftext|>, up to 75 tokens, <|endoftext|>
CLIP_BPE_FOLDER = Path(__file__).parent / "builtin" / "clip_bpe"     # CLIPTokenizer.clip()'s files


def byte_alphabet() -> list[str]:
    """The 256 characters standing for bytes 0-255 in byte-level BPE (GPT-2), in CLIP's vocabulary order.

    Printable Latin-1 bytes stand for themselves; the others (controls, space, ...) get chr(256 + k).
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + k) for k in range(len(others))]


def vocab_from_merges(merges: list[tuple[str, str]]) -> dict[str, int]:
    """CLIP's vocabulary for a merge list: the byte alphabet, the same with `</w>`, one token per merge, then
    <|startoftext|> and <|endoftext|> (openai/CLIP simple_tokenizer.py: 49408 ids for its 48894 merges).
    """
    alphabet = byte_alphabet()
    tokens = [*alphabet, *(c + END_OF_WORD for c in alphabet), *(a + b for a, b in merges),
              BOS_TOKEN, EOS_TOKEN]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))     # a merge that rebuilds an existing token adds no id
    return vocab


def _normalizer() -> normalizers.Normalizer:
    return normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                 normalizers.Lowercase()])


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # Keep the regex matches, drop what lies between them (whitespace); then spell each word's bytes.
    # ByteLevel's own GPT-2 regex splits a CLIP word further only when it is a special token spelled out
    # in other case ("<|EndOfText|>" -> "<|", "endoftext", "|>"); transformers does that too, so it stays on.
    split = pre_tokenizers.Split(Regex(CLIP_SPLIT_PATTERN), behavior="removed", invert=True)
    return pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False)])


def _token_content(value) -> str:
    """A special token as stored by transformers: a plain string or an AddedToken dict with "content"."""
    return value["content"] if isinstance(value, dict) else value


def _parse_merges(text: str, source: str) -> list[tuple[str, str]]:
    """The merge pairs of a `merges.txt` text (its optional "#version" first line skipped)."""
    merges = []
    # Split on "\n" only: str.splitlines would also break at characters such as U+0085.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line or (number == 1 and line.startswith("#version")):
            continue
        pair = line.split(" ")
        if len(pair) != 2:
            raise UserError(f"{source}:{number}: a merge is two tokens and one space, got {line!r}")
        merges.append((pair[0], pair[1]))
    return merges


class CLIPTokenizer:
    """Prompt → token ids as transformers' CLIPTokenizer gives: <|startoftext|> words <|endoftext|> pads."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], *,
                 bos_token: str = BOS_TOKEN, eos_token: str = EOS_TOKEN, pad_token: str = EOS_TOKEN,
                 unk_token: str = EOS_TOKEN, model_max_length: int = CLIP_MAX_LENGTH):
        specials = dict(zip(SPECIAL_TOKEN_NAMES, (bos_token, eos_token, pad_token, unk_token)))
        missing = {name: token for name, token in specials.items() if token not in vocab}
        if missing:
            raise UserError(f"special tokens not in the vocabulary: {missing}")
        self.vocab, self.merges = vocab, merges
        self.bos_token, self.eos_token = bos_token, eos_token
        self.pad_token, self.unk_token = pad_token, unk_token
        self.bos_token_id, self.eos_token_id = vocab[bos_token], vocab[eos_token]
        self.pad_token_id = vocab[pad_token]
        if model_max_length < 3:
            raise UserError(f"model_max_length must leave room for the start and end tokens and a word, "
                            f"got {model_max_length}")
        self.model_max_length = model_max_length      # ids per prompt, specials included (the text encoder's
                                                      # positions); tokenizer_config.json stores it
        model = BPE(vocab=vocab, merges=merges, unk_token=unk_token, continuing_subword_prefix="",
                    end_of_word_suffix=END_OF_WORD, fuse_unk=False)
        self._backend = Tokenizer(model)
        self._backend.normalizer = _normalizer()
        self._backend.pre_tokenizer = _pre_tokenizer()
        self._backend.decoder = decoders.ByteLevel()
        # Specials typed in a prompt become their ids, as in transformers. We match them verbatim; transformers
        # also matches an upper-case spelling of some of them, depending on the "normalized" flags in the
        # files in a way that follows no simple rule, so that corner is left out.
        self._backend.add_special_tokens([AddedToken(token, special=True, normalized=False)
                                          for token in dict.fromkeys(specials.values())])
        # textual inversion (adapters/textual_inversion.py): the first id of a multi-vector token -> all its ids
        self._expansions: dict[int, list[int]] = {}

    @property
    def vocab_size(self) -> int:
        """Number of ids, specials included (49408 for CLIP)."""
        return len(self.vocab)

    def __len__(self) -> int:
        """Number of ids, added tokens included (vocab_size without textual-inversion tokens)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_files(cls, vocab_json: str | Path, merges_txt: str | Path, *,
                   model_max_length: int = CLIP_MAX_LENGTH, **special_tokens: str) -> "CLIPTokenizer":
        """Load a `vocab.json` / `merges.txt` pair; `special_tokens` (pad_token="!", ...) replace CLIP's."""
        vocab = json.loads(Path(vocab_json).read_text(encoding="utf-8"))
        merges = _parse_merges(Path(merges_txt).read_text(encoding="utf-8"), str(merges_txt))
        return cls(vocab, merges, model_max_length=model_max_length, **special_tokens)

    @classmethod
    def clip(cls, **special_tokens: str) -> "CLIPTokenizer":
        """OpenAI CLIP's own BPE tokenizer (49408 ids, 77 tokens): Stable Diffusion v1.x's, shipped with the
        package (`builtin/clip_bpe/`, MIT-licensed), so a checkpoint that holds none still has it.
        `special_tokens` replace CLIP's (SD 2.x pads with pad_token="!", as open_clip)."""
        vocab = json.loads(gzip.decompress((CLIP_BPE_FOLDER / "vocab.json.gz").read_bytes()))
        text = gzip.decompress((CLIP_BPE_FOLDER / "merges.txt.gz").read_bytes()).decode("utf-8")
        return cls(vocab, _parse_merges(text, "merges.txt.gz"), **special_tokens)

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "CLIPTokenizer":
        """Load a tokenizer folder as transformers writes it, or a diffusers folder with `tokenizer/` in it.

        Special tokens come from `special_tokens_map.json`, else `tokenizer_config.json`, else CLIP's; the
        context length from `tokenizer_config.json`'s model_max_length (else CLIP's 77).
        """
        folder = Path(folder)
        if not (folder / "vocab.json").is_file() and (folder / "tokenizer" / "vocab.json").is_file():
            folder = folder / "tokenizer"
        for name in ("vocab.json", "merges.txt"):
            if not (folder / name).is_file():
                raise UserError(f"no {name} in {folder}: expected a CLIP tokenizer folder")
        special_tokens, max_length = {}, CLIP_MAX_LENGTH
        for name in ("tokenizer_config.json", "special_tokens_map.json"):    # the second one wins
            if (folder / name).is_file():
                stored = json.loads((folder / name).read_text(encoding="utf-8"))
                special_tokens.update({key: _token_content(stored[key]) for key in SPECIAL_TOKEN_NAMES
                                       if stored.get(key)})
                # transformers writes a huge integer when a tokenizer has no limit: CLIP's then applies
                length = stored.get("model_max_length")
                if name == "tokenizer_config.json" and isinstance(length, int) and length <= 1_000_000:
                    max_length = length
        return cls.from_files(folder / "vocab.json", folder / "merges.txt", model_max_length=max_length,
                              **special_tokens)

    def save_pretrained(self, folder: str | Path) -> None:
        """Write vocab.json, merges.txt, special_tokens_map.json and tokenizer_config.json (transformers'),
        each atomically."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        specials = {name: getattr(self, name) for name in SPECIAL_TOKEN_NAMES}
        config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": self.model_max_length, **specials}
        lines = [MERGES_HEADER] + [f"{a} {b}" for a, b in self.merges]
        files = {"vocab.json": json.dumps(self.vocab, ensure_ascii=False),
                 "merges.txt": "\n".join(lines) + "\n",
                 "special_tokens_map.json": json.dumps(specials, indent=2),
                 "tokenizer_config.json": json.dumps(config, indent=2)}
        for name, text in files.items():
            with atomic_write(folder / name) as f:
                f.write(text.encode("utf-8"))

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` without <|startoftext|>, <|endoftext|> or padding (to chunk long prompts)."""
        return self._expand(self._backend.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        """Text for token ids: bytes read as UTF-8 (invalid ones become U+FFFD), `</w>` as a space."""
        text = self._backend.decode(list(ids), skip_special_tokens=False)
        return text.replace(END_OF_WORD, " ").strip()

    def __call__(self, prompts: str | list[str], *, max_length: int | None = None,
                 padding: str = "max_length", truncation: bool = True) -> torch.Tensor:
        """Token ids (B, max_length), or (B, longest) for padding="longest": BOS, words, EOS, then pads.

        `max_length` defaults to `model_max_length`. A prompt longer than max_length - 2 tokens is cut with
        a warning naming the dropped text.
        """
        max_length = self.model_max_length if max_length is None else max_length
        if padding not in ("max_length", "longest"):
            raise UserError(f"padding must be 'max_length' or 'longest', got {padding!r}")
        if max_length < 2:
            raise UserError(f"max_length must leave room for the start and end tokens, got {max_length}")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise UserError("no prompts to tokenize")
        rows = []
        for prompt, encoding in zip(prompts, self._backend.encode_batch(prompts, add_special_tokens=False)):
            ids = self._expand(encoding.ids)
            if len(ids) > max_length - 2:
                if not truncation:
                    raise UserError(f"prompt is {len(ids) + 2} tokens with start and end, more than "
                                    f"max_length={max_length}: {prompt!r}")
                dropped = self.decode(ids[max_length - 2:])
                warnings.warn(f"prompt cut to {max_length} tokens; this part was dropped: {dropped!r}",
                              stacklevel=2)
                ids = ids[:max_length - 2]
            rows.append([self.bos_token_id, *ids, self.eos_token_id])
        width = max_length if padding == "max_length" else max(len(row) for row in rows)
        padded = [row + [self.pad_token_id] * (width - len(row)) for row in rows]
        return torch.tensor(padded, dtype=torch.long)                    # (B, width)

    def add_tokens(self, token: str, num_vectors: int = 1) -> list[int]:
        """Add `token` as a new id, and `token_1` ... `token_{n-1}` for an n-vector textual inversion; returns
        the new ids. In prompts `token` then stands for all n of them, as in diffusers and A1111.

        Like transformers' added tokens, it matches anywhere in the lower-cased text, even inside a word.
        """
        names = [token] + [f"{token}_{i}" for i in range(1, num_vectors)]
        taken = [name for name in names if self._backend.token_to_id(name) is not None]
        if taken:
            raise UserError(f"token {taken[0]!r} is already in the tokenizer's vocabulary: name the new token "
                            "otherwise (token=...)")
        self._backend.add_tokens([AddedToken(name, normalized=True) for name in names])
        ids = [self._backend.token_to_id(name) for name in names]
        if num_vectors > 1:
            self._expansions[ids[0]] = ids
        return ids

    def _expand(self, ids: list[int]) -> list[int]:
        """Multi-vector textual-inversion tokens replaced by all their ids."""
        if not self._expansions:
            return ids
        return [expanded for i in ids for expanded in self._expansions.get(i, (i,))]


def train_bpe(texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2,
              model_max_length: int = CLIP_MAX_LENGTH) -> CLIPTokenizer:
    """Learn a CLIP-style BPE on `texts` with at most `vocab_size` ids (Sennrich et al. 2016).

    Same normaliser, word split and byte alphabet as CLIP, and CLIP's id layout (see `vocab_from_merges`),
    so every string stays encodable; <|endoftext|> is also the pad token, as in SD v1.x. `model_max_length`
    is the context of the text encoder it will feed (77 as CLIP; shorter captions allow a shorter one).
    """
    num_merges = vocab_size - 2 * 256 - 2
    if num_merges < 0:
        raise UserError(f"vocab_size must be at least 514 (2 byte alphabets, 2 specials), got {vocab_size}")
    backend = Tokenizer(BPE(continuing_subword_prefix="", end_of_word_suffix=END_OF_WORD))
    backend.normalizer = _normalizer()
    backend.pre_tokenizer = _pre_tokenizer()
    # The trainer's alphabet holds at most the 512 base symbols, so this budget allows num_merges merges.
    trainer = BpeTrainer(vocab_size=vocab_size - 2, min_frequency=min_frequency, show_progress=False,
                         initial_alphabet=byte_alphabet(), continuing_subword_prefix="",
                         end_of_word_suffix=END_OF_WORD)
    backend.train_from_iterator(texts, trainer)
    stored = json.loads(backend.to_str())["model"]["merges"]
    # Merges are stored as [a, b] pairs by recent `tokenizers`, as "a b" strings by older ones.
    merges = [tuple(pair) if isinstance(pair, list) else tuple(pair.split(" ")) for pair in stored]
    merges = merges[:num_merges]
    return CLIPTokenizer(vocab_from_merges(merges), merges, model_max_length=model_max_length)
