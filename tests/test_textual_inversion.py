"""Textual-inversion embeddings: every layout, multi-vector tokens, errors, and parity with diffusers'
`load_textual_inversion` on the same file and the same tiny random pipeline (images within 1e-4, fp32)."""

import argparse

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lora_fixtures import euler_pipelines, write_a1111_pt, write_a1111_safetensors, write_diffusers_embedding
from nanodiffusion.adapters.textual_inversion import read_embedding
from nanodiffusion.errors import UserError
from nanodiffusion.pipelines.prompts import tokenize_prompt
from fixtures import tiny_ours

WIDTH = 32                                  # TINY_TEXT's hidden size


def vectors(n: int, seed: int = 0, width: int = WIDTH) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def pipe():
    return tiny_ours()


def test_every_layout_adds_its_vectors_under_its_token(pipe, tmp_path):
    (tmp_path / "folder").mkdir()
    files = {  # path, token given, the token expected, vectors
        "a1111-pt": (write_a1111_pt(tmp_path / "bad-hands.pt", vectors(3, 1), "other"), None, "bad-hands"),
        "a1111-st": (write_a1111_safetensors(tmp_path / "easyneg.safetensors", vectors(2, 2)), None, "easyneg"),
        "diffusers": (write_diffusers_embedding(tmp_path / "learned_embeds.safetensors", "<cat-toy>",
                                                vectors(1, 3)[0]), None, "<cat-toy>"),
        "folder": (write_diffusers_embedding(tmp_path / "folder" / "learned_embeds.safetensors", "<x>",
                                             vectors(2, 4)).parent, None, "<x>"),
        "renamed": (write_a1111_safetensors(tmp_path / "e.safetensors", vectors(1, 5)), "<mine>", "<mine>"),
    }
    rows = len(pipe.tokenizer)
    for name, (path, token, wanted) in files.items():
        assert pipe.load_textual_inversion(path, token) == wanted, name
        stored = read_embedding(path)[1]
        ids = pipe.tokenizer.encode(f"a {wanted} photo")[1:-1]                  # "a" and "photo" around it
        assert ids == list(range(rows, rows + len(stored))), name               # all n vectors, in order
        table = pipe.text_encoder.text_model.embeddings.token_embedding.weight
        assert torch.equal(table[ids], stored), name
        rows += len(stored)
    assert pipe.text_encoder.config.vocab_size == rows == len(pipe.tokenizer)


def test_multi_vector_tokens_expand_in_prompts_and_emphasis(pipe, tmp_path):
    pipe.load_textual_inversion(write_a1111_safetensors(tmp_path / "style-v3.safetensors", vectors(3)))
    first = len(pipe.tokenizer) - 3
    plain = pipe.tokenizer("a style-v3 photo")[0].tolist()
    assert plain[:6] == [pipe.tokenizer.bos_token_id, pipe.tokenizer.encode("a")[0], first, first + 1,
                         first + 2, pipe.tokenizer.encode("photo")[0]]
    assert pipe.tokenizer.encode("a STYLE-V3 photo") == pipe.tokenizer.encode("a style-v3 photo")
    weighted = tokenize_prompt(pipe.tokenizer, "a (style-v3:1.5) photo")
    assert weighted.ids[0, 2:5].tolist() == [first, first + 1, first + 2]
    assert weighted.weights[0, 2:5].tolist() == [1.5] * 3


@pytest.mark.parametrize("content, message", [
    ({"emb_params": vectors(2, width=1024)}, r"1024 wide \(for SD v2.x \(OpenCLIP ViT-H\)\) but this text "
                                             "encoder's are 32"),
    ({"clip_l": vectors(2, width=768), "clip_g": vectors(2, width=1280)}, "SDXL embedding"),
    ({"a": vectors(1), "b": vectors(1)}, "not a textual-inversion embedding"),
    ({"photo": vectors(1)}, "'photo' is already in the tokenizer's vocabulary"),
])
def test_embeddings_that_cannot_apply_say_why(pipe, tmp_path, content, message):
    save_file(content, str(tmp_path / "bad.safetensors"))
    rows = len(pipe.tokenizer)
    with pytest.raises(UserError, match=message):
        pipe.load_textual_inversion(tmp_path / "bad.safetensors")
    assert len(pipe.tokenizer) == rows == pipe.text_encoder.config.vocab_size


def test_pickled_objects_are_refused(pipe, tmp_path):
    torch.save({"string_to_param": {"*": vectors(1)}, "args": argparse.Namespace(lr=1)}, tmp_path / "x.pt")
    with pytest.raises(UserError, match="weights-only"):
        pipe.load_textual_inversion(tmp_path / "x.pt")


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    return euler_pipelines(tmp_path_factory.mktemp("ti-parity"))


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("layout", ["a1111-pt", "diffusers-multi"])
def test_images_match_diffusers(pipes, tmp_path, layout):
    reference, ours = pipes
    if layout == "a1111-pt":
        token, path = "<bad-hands>", write_a1111_pt(tmp_path / "bad-hands.pt", vectors(2, 7) * 3, "<bad-hands>")
    else:
        # lower case: diffusers expands a multi-vector token only where the prompt spells it as its tokenizer
        # gives it back (lower-cased); we expand it however it is written
        token = "<cat-toy>"
        path = write_diffusers_embedding(tmp_path / "learned_embeds.safetensors", token, vectors(3, 8) * 3)
    reference.load_textual_inversion(str(path), token=token)
    assert ours.load_textual_inversion(path, token=token) == token
    settings = dict(guidance_scale=7.5, height=32, width=32, output_type="np")
    prompt = f"a photo of a {token} on a table"
    expected = reference(prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                         **settings).images
    got = ours(prompt, num_steps=2, sampler="euler", seed=0, **settings).images
    without = ours("a photo of a on a table", num_steps=2, sampler="euler", seed=0, **settings).images
    assert float(np.abs(got - expected).max()) <= 1e-4
    assert float(np.abs(got - without).max()) > 0.01
