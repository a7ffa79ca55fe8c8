"""Textual-inversion embeddings (Gal et al. 2022, "An Image is Worth One Word"): new tokens whose learned
vectors join the text encoder's token-embedding table.

Layouts: A1111's `.pt` (`string_to_param["*"]`, read with torch.load(weights_only=True)) and `.safetensors`
(`emb_params`), each (n, width) for n vectors; diffusers' `learned_embeds.safetensors` (or `.bin`), one entry
{token: (width,) or (n, width)}. An n-vector embedding becomes the tokens `name`, `name_1` ... `name_{n-1}`,
and `name` in a prompt stands for all of them, as in diffusers and A1111.
"""

from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from nanodiffusion.adapters.lora_targets import TEXT_FAMILIES
from nanodiffusion.errors import UserError
from nanodiffusion.nets.clip_text import CLIPTextModel
from nanodiffusion.tokenizer import CLIPTokenizer
from nanodiffusion.weights.safe_load import SAFETENSORS, read_pickle, read_safetensors, sniff

# What a diffusers textual-inversion folder holds, in the order diffusers looks for it.
DIFFUSERS_EMBEDDING_FILES = ("learned_embeds.safetensors", "learned_embeds.bin")


def read_embedding(path: str | Path) -> tuple[str | None, torch.Tensor]:
    """(the token a diffusers file names, or None; the vectors (n, width)) of an embedding file or folder."""
    path = Path(path)
    if path.is_dir():
        found = [path / name for name in DIFFUSERS_EMBEDDING_FILES if (path / name).is_file()]
        if not found:
            raise UserError(f"{path} is a folder without {' or '.join(DIFFUSERS_EMBEDDING_FILES)}: pass the "
                            "embedding file")
        path = found[0]
    data = read_safetensors(path)[0] if sniff(path) == SAFETENSORS else read_pickle(path)
    token, vectors = _layout(path, data)
    if not isinstance(vectors, torch.Tensor) or vectors.dim() not in (1, 2) \
            or not vectors.is_floating_point():
        raise UserError(f"{path}: expected the embedding as a (vectors, width) float tensor, got "
                        f"{getattr(vectors, 'shape', type(vectors).__name__)}")
    return token, vectors.detach().reshape(-1, vectors.shape[-1])


def _layout(path: Path, data) -> tuple[str | None, torch.Tensor]:
    if isinstance(data, torch.Tensor):
        return None, data                                   # a bare tensor: the token must be given
    if not isinstance(data, dict) or not data:
        raise UserError(f"{path} holds no embedding")
    if "string_to_param" in data:                           # A1111 .pt
        params = data["string_to_param"]
        if not isinstance(params, dict) or "*" not in params:
            raise UserError(f"{path}: an A1111 embedding with no string_to_param['*'] entry")
        return None, params["*"]
    if "emb_params" in data:                                # A1111 .safetensors
        return None, data["emb_params"]
    if {"clip_l", "clip_g"} & set(data):
        raise UserError(f"{path} is an SDXL embedding (vectors for SDXL's two text encoders, clip_l and "
                        "clip_g): it cannot apply to this model")
    if len(data) == 1:                                      # diffusers: {token: vectors}
        return next(iter(data.items()))
    raise UserError(f"{path} is not a textual-inversion embedding nanodiffusion knows (A1111's "
                    f"string_to_param or emb_params, or diffusers' one {{token: vectors}} entry); keys: "
                    f"{sorted(map(str, data))[:5]}")


def load_textual_inversion(text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, path: str | Path,
                           token: str | None = None) -> str:
    """Add the embedding in `path` to `tokenizer` and `text_encoder`; returns the token to write in prompts:
    `token`, else the one a diffusers file names, else the file's stem (A1111's rule)."""
    stored, vectors = read_embedding(path)
    token = token or stored or Path(path).stem
    width = text_encoder.config.hidden_size
    if vectors.shape[1] != width:
        family = TEXT_FAMILIES.get(vectors.shape[1], "another model")
        raise UserError(f"{path}: the embedding's vectors are {vectors.shape[1]} wide (for {family}) but "
                        f"this text encoder's are {width}")
    ids = tokenizer.add_tokens(token, num_vectors=len(vectors))
    _set_rows(text_encoder, ids, vectors)
    return token


@torch.no_grad()
def _set_rows(text_encoder: CLIPTextModel, ids: list[int], vectors: torch.Tensor) -> None:
    """Grow the token-embedding table to hold rows `ids` and write `vectors` (n, width) there."""
    embedding = text_encoder.text_model.embeddings.token_embedding
    old = embedding.weight
    rows = max(len(old), max(ids) + 1)
    table = torch.zeros(rows, old.shape[1], dtype=old.dtype, device=old.device)      # (rows, width)
    table[:len(old)] = old
    table[ids] = vectors.to(old.device, old.dtype)
    embedding.weight = nn.Parameter(table, old.requires_grad)
    embedding.num_embeddings = rows
    text_encoder.config = replace(text_encoder.config, vocab_size=rows)


EMBEDDING_SUFFIXES = (".pt", ".safetensors", ".bin")
MAX_EMBEDDING_FILES = 10_000            # a folder scan stops there (--embeddings-dir / must end)


def load_embedding_folder(text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
                          folder: str | Path) -> tuple[dict[str, dict], dict[str, dict]]:
    """Load every embedding under `folder` (recursively), each named by its file's stem, as A1111's
    embeddings folder; returns A1111's `GET /sdapi/v1/embeddings` halves: (loaded, skipped), {name: {"shape":
    width, "vectors": n, ...}}. A file that cannot apply here (another width, a name the vocabulary holds)
    is skipped with its reason in "error": a folder may hold embeddings for other models."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--embeddings-dir {folder} is not a folder")
    files = sorted(path for path in folder.rglob("*") if path.suffix in EMBEDDING_SUFFIXES and path.is_file())
    loaded, skipped = {}, {}
    for path in files[:MAX_EMBEDDING_FILES]:
        try:
            vectors = read_embedding(path)[1]
            info = {"shape": vectors.shape[1], "vectors": len(vectors), "step": None, "sd_checkpoint": None,
                    "sd_checkpoint_name": None, "path": path.relative_to(folder).as_posix()}
            load_textual_inversion(text_encoder, tokenizer, path, path.stem)
            loaded[path.stem] = info
        except UserError as error:
            skipped[path.stem] = {"path": path.relative_to(folder).as_posix(),
                                  "error": str(error).replace(str(path), path.name)}
    return loaded, skipped
