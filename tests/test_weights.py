"""Loading and saving diffusers folders: layouts met in the wild, dtypes, variants, the Hub, and memory use.

Memory: files are memory-mapped and networks built on the meta device, then given the file's tensors with
`load_state_dict(assign=True)`. Two checks prove no second copy: with the file's dtype, every parameter
lies inside the file's mapping (/proc/self/maps), no private memory (RssAnon) is added and the peak RSS
(VmHWM, reset through /proc/self/clear_refs) grows by less than the file; with a conversion to fp16, the new
private memory is the fp16 weights only, and the peak stays below what any path holding an extra copy needs.
"""

import gc
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanodiffusion.errors import UserError
from nanodiffusion.nets.sd_unet import SDUNet, SDUNetConfig
from nanodiffusion.weights import SDComponents, load_sd, save_diffusers
from fixtures import assert_same_weights, random_components

MEDIUM_UNET = SDUNetConfig(model_channels=64, channel_mult=(1, 2, 4), num_res_blocks=2,
                           attention_levels=(1, 2), num_heads=8, context_dim=32)          # 91 MB in fp32
UNET_FILE = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def components():
    return random_components()


@pytest.fixture
def folder(tmp_path, components):
    save_diffusers(components, tmp_path / "model")
    return tmp_path / "model"


def test_folder_round_trip(folder, components):
    loaded = load_sd(folder)
    assert_same_weights(components, loaded)
    assert loaded.tokenizer.vocab == components.tokenizer.vocab
    assert loaded.scheduler_config == components.scheduler_config
    assert loaded.model_index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert all(not network.training for network in loaded.networks().values())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dtype_at_load_time(folder, components, dtype):
    loaded = load_sd(folder, dtype=dtype)
    for name, network in loaded.networks().items():
        reference = components.networks()[name].state_dict()
        for key, value in network.state_dict().items():
            assert value.dtype == dtype and torch.equal(value, reference[key].to(dtype)), key


def test_fp16_variant_files(tmp_path, components):
    half = load_sd_from(components, tmp_path, dtype="fp16")
    save_diffusers(half, tmp_path / "variant", variant="fp16")
    assert (tmp_path / "variant" / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert (tmp_path / "variant" / "text_encoder" / "model.fp16.safetensors").is_file()
    loaded = load_sd(tmp_path / "variant", variant="fp16", dtype=torch.float16)
    assert_same_weights(half, loaded)
    with pytest.raises(UserError, match=r"found diffusion_pytorch_model\.fp16\.safetensors \(pass variant="):
        load_sd(tmp_path / "variant")


def load_sd_from(components: SDComponents, tmp_path: Path, **options) -> SDComponents:
    save_diffusers(components, tmp_path / "source")
    return load_sd(tmp_path / "source", **options)


def test_layouts_met_in_published_folders(folder, components):
    """Old text encoders carry `position_ids`; transformers >= 5 drops `text_model.`; old VAEs name their
    attention query/key/value/proj_attn; big weights come in shards with an index; .bin is read weights-only.
    """
    text = load_file(folder / "text_encoder" / "model.safetensors")
    text = {key.removeprefix("text_model."): value for key, value in text.items()}
    text["embeddings.position_ids"] = torch.arange(77)[None]
    save_file(text, folder / "text_encoder" / "model.safetensors")
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    vae = load_file(folder / "vae" / "diffusion_pytorch_model.safetensors")
    renamed = {}
    for key, value in vae.items():
        for new, old in old_names.items():
            key = key.replace(f"mid_block.attentions.0.{new}.", f"mid_block.attentions.0.{old}.")
        renamed[key] = value
    assert "encoder.mid_block.attentions.0.query.weight" in renamed
    (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(renamed, folder / "vae" / "diffusion_pytorch_model.bin")
    unet = load_file(folder / UNET_FILE)
    keys = sorted(unet)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, shard_keys in shards.items():
        save_file({key: unet[key] for key in shard_keys}, folder / "unet" / name)
    index = {"weight_map": {key: name for name, shard_keys in shards.items() for key in shard_keys}}
    (folder / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    (folder / UNET_FILE).unlink()
    assert_same_weights(components, load_sd(folder))


def test_text_encoder_positions_after_meta_loading(folder, components):
    """Nothing is left on the meta device, and the text encoder (whose position ids are computed, not a
    buffer) gives the same states as the original module."""
    loaded = load_sd(folder)
    for network in loaded.networks().values():
        assert not any(t.is_meta for t in [*network.parameters(), *network.buffers()])
    ids = components.tokenizer(["a photo of a cat"], max_length=77)
    with torch.no_grad():
        assert torch.equal(loaded.text_encoder(ids).hidden_states, components.text_encoder(ids).hidden_states)


def test_tokenizer_json_only_folder(folder, components):
    """transformers >= 5 saves a tokenizer as tokenizer.json alone."""
    vocab = json.loads((folder / "tokenizer" / "vocab.json").read_text())
    merges = (folder / "tokenizer" / "merges.txt").read_text().split("\n")[1:]
    model = {"type": "BPE", "vocab": vocab, "merges": [line.split(" ") for line in merges if line]}
    (folder / "tokenizer" / "tokenizer.json").write_text(json.dumps({"model": model}))
    (folder / "tokenizer" / "vocab.json").unlink()
    (folder / "tokenizer" / "merges.txt").unlink()
    tokenizer = load_sd(folder).tokenizer
    assert torch.equal(tokenizer(["a photo of a fox"]), components.tokenizer(["a photo of a fox"]))


def test_repo_id_resolved_through_huggingface_hub(monkeypatch, folder, components):
    hub = pytest.importorskip("huggingface_hub")
    calls = []

    def fake_snapshot_download(repo_id, **options):
        calls.append((repo_id, options))
        return str(folder)

    monkeypatch.setattr(hub, "snapshot_download", fake_snapshot_download)
    assert_same_weights(components, load_sd("someone/tiny-sd"))
    assert calls[0][0] == "someone/tiny-sd"
    assert "unet/diffusion_pytorch_model.safetensors" in calls[0][1]["allow_patterns"]

    def offline(repo_id, **options):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(hub, "snapshot_download", offline)
    with pytest.raises(UserError, match=r"could not get 'someone/tiny-sd'.*huggingface-cli download "
                                        r"someone/tiny-sd --local-dir FOLDER.*git clone"):
        load_sd("someone/tiny-sd")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)          # not installed
    with pytest.raises(UserError, match="huggingface_hub is not installed.*git clone"):
        load_sd("someone/tiny-sd")


def _memory() -> dict[str, int]:
    """VmHWM (peak RSS), RssAnon (private memory) and RssFile (mapped file pages) in bytes."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmHWM", "RssAnon", "RssFile"):
            fields[name] = int(value.split()[0]) * 1024
    return fields


def _reset_peak() -> dict[str, int]:
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")        # resets VmHWM to the current RSS
    except OSError:
        pytest.skip("cannot reset the peak RSS here (/proc/self/clear_refs)")
    return _memory()


def _mappings(path: Path) -> list[tuple[int, int]]:
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(str(path)):
            start, end = (int(x, 16) for x in re.match(r"([0-9a-f]+)-([0-9a-f]+)", line).groups())
            ranges.append((start, end))
    return ranges


@pytest.fixture(scope="module")
def medium_folder(tmp_path_factory) -> Path:
    if not Path("/proc/self/status").is_file():
        pytest.skip("needs Linux /proc")
    folder = tmp_path_factory.mktemp("medium") / "model"
    components = random_components()
    components.unet = SDUNet(MEDIUM_UNET).eval()
    save_diffusers(components, folder)
    return folder


def test_loading_in_the_files_dtype_makes_no_copy(medium_folder):
    size = (medium_folder / UNET_FILE).stat().st_size
    before = _reset_peak()
    unet = load_sd(medium_folder).unet
    after = _memory()
    assert after["RssAnon"] - before["RssAnon"] < 0.02 * size       # no private copy at all
    # mapped pages count in RSS once touched (the kernel maps some ahead); far below a copy (size) anyway
    assert after["VmHWM"] - before["VmHWM"] < 0.5 * size
    mapped = _mappings((medium_folder / UNET_FILE).resolve())
    assert mapped, "the UNet file is not memory-mapped"
    for name, parameter in unet.named_parameters():
        address = parameter.data_ptr()
        assert any(start <= address < end for start, end in mapped), f"{name} is a copy, not the file's pages"


def test_converting_dtype_holds_one_copy(medium_folder):
    size = (medium_folder / UNET_FILE).stat().st_size
    before = _reset_peak()
    components = load_sd(medium_folder, dtype=torch.float16)
    after = _memory()
    fp16 = sum(p.numel() * 2 for p in components.unet.parameters())
    assert fp16 == pytest.approx(size / 2, rel=0.01)
    assert after["RssAnon"] - before["RssAnon"] < fp16 + 0.2 * size   # private memory: the fp16 weights
    # mapped file pages (page cache, size) + fp16 weights (size/2); an extra fp32 copy would add size
    assert after["VmHWM"] - before["VmHWM"] < 1.5 * size + 0.25 * size
    with torch.no_grad():
        x = torch.randn(1, 4, 8, 8, dtype=torch.float16)
        assert torch.isfinite(components.unet(x, 10.0, torch.zeros(1, 3, 32, dtype=torch.float16))).all()
