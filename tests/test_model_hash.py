"""A1111's model hash: the sha256 of the weights, remembered per file state so big checkpoints are read once."""

import hashlib
import json
from pathlib import Path

from nanodiffusion.weights.models import hash_cache_path, model_hash


def test_model_hash_is_the_sha256_prefix_and_is_remembered_per_file_state(tmp_path):
    weights, cache = tmp_path / "model.safetensors", tmp_path / "cache" / "hashes.json"
    weights.write_bytes(b"weights v1")
    assert model_hash(weights, cache=cache) == hashlib.sha256(b"weights v1").hexdigest()[:10]
    remembered = json.loads(cache.read_text())
    (key,) = remembered
    remembered[key] = "from-cache"                      # the cache, not the file, answers while it is unchanged
    cache.write_text(json.dumps(remembered))
    assert model_hash(weights, cache=cache) == "from-cache"
    weights.write_bytes(b"weights v2, longer")          # a changed file (size, mtime) is hashed again
    assert model_hash(weights, cache=cache) == hashlib.sha256(b"weights v2, longer").hexdigest()[:10]


def test_a_folder_hashes_its_weight_files_in_order_and_a_broken_cache_is_skipped(tmp_path):
    folder = tmp_path / "model"
    for part, data in (("unet", b"u"), ("vae", b"v")):
        (folder / part).mkdir(parents=True)
        (folder / part / "diffusion_pytorch_model.safetensors").write_bytes(data)
    (folder / "model_index.json").write_text("{}")
    expected = hashlib.sha256(b"uv").hexdigest()[:10]
    broken = tmp_path / "broken.json"
    broken.write_text("not json")
    assert model_hash(folder, cache=broken) == expected
    unwritable = tmp_path / "a-file" / "hashes.json"    # its parent is a file: the cache cannot be written
    (tmp_path / "a-file").write_text("")
    assert model_hash(folder, cache=unwritable) == expected


def test_the_cache_lives_under_nanodiffusion_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("NANODIFFUSION_CACHE", str(tmp_path))
    assert hash_cache_path() == tmp_path / "model_hashes.json"
    monkeypatch.delenv("NANODIFFUSION_CACHE")
    assert hash_cache_path() == Path.home() / ".cache" / "nanodiffusion" / "model_hashes.json"
