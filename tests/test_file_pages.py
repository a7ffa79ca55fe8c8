"""Converting memory-mapped weights gives their file pages back (file_pages): the process's RSS holds one copy
of the weights, values never change, and anonymous memory is never dropped."""

import sys

import pytest
import torch
from safetensors.torch import save_file

from nanodiffusion.pipelines.text_to_image import TextToImage
from nanodiffusion.weights import file_pages, save_diffusers
from nanodiffusion.weights.components import SDComponents
from nanodiffusion.weights.safe_load import read_safetensors
from fixtures import tiny_ours

MIB = 2**20


def _pagemap_readable() -> bool:
    try:
        with open("/proc/self/pagemap", "rb") as pagemap:
            return len(pagemap.read(8)) == 8
    except OSError:
        return False


# Without a readable /proc/self/pagemap (some sandboxes) nothing is given back, by design: skip, don't fail.
gives_back = pytest.mark.skipif(sys.platform != "linux" or not _pagemap_readable(),
                                reason="file pages are given back on Linux with a readable pagemap only")


def _rss_file() -> int:
    """Bytes of file pages this process has resident (RssFile of /proc/self/status)."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("RssFile:"))
    return int(line.split()[1]) * 1024


@gives_back
def test_converting_a_mapped_file_gives_its_pages_back_and_keeps_the_values(tmp_path):
    generator = torch.Generator().manual_seed(0)
    weights = {f"w{i}": torch.randn(256, 1024, generator=generator) for i in range(16)}      # 16 MiB
    save_file(weights, tmp_path / "w.safetensors")
    mapped, _ = read_safetensors(tmp_path / "w.safetensors")
    before = _rss_file()
    converted = file_pages.convert(mapped, lambda tensor: tensor.to(torch.bfloat16))
    after = _rss_file()
    # the copy read every page; without the release all 16 MiB would now be resident
    assert after - before < 2 * MIB
    for key, tensor in weights.items():
        assert torch.equal(converted[key], tensor.to(torch.bfloat16))
        assert torch.equal(mapped[key], tensor)             # the released source reads back from the file


@gives_back
def test_unchanged_tensors_and_anonymous_memory_are_never_dropped(tmp_path):
    save_file({"w": torch.ones(1024, 1024)}, tmp_path / "w.safetensors")
    mapped, _ = read_safetensors(tmp_path / "w.safetensors")
    kept = file_pages.convert(mapped, lambda tensor: tensor)            # no copy: nothing to release
    assert kept["w"].data_ptr() == mapped["w"].data_ptr()
    assert file_pages.release(mapped["w"], []) == 0                     # not in any listed file mapping
    anonymous = torch.full((1024, 1024), 3.0)
    assert file_pages.release(anonymous, file_pages.file_mappings()) == 0
    assert bool((anonymous == 3.0).all())
    assert file_pages.release(mapped["w"], file_pages.file_mappings()) >= 4 * MIB - 8192
    assert bool((mapped["w"] == 1.0).all())


def test_bf16_load_defaults_to_channels_last_with_the_same_weights(tmp_path):
    tiny = tiny_ours(seed=0)
    components = SDComponents(tiny.unet, tiny.vae, tiny.text_encoder, tiny.tokenizer)
    save_diffusers(components, tmp_path / "model")
    pipe = TextToImage.from_pretrained(tmp_path / "model", dtype=torch.bfloat16)
    for network, expected in ((pipe.unet, tiny.unet), (pipe.vae, tiny.vae)):
        weights = dict(network.named_parameters())
        assert all(weight.is_contiguous(memory_format=torch.channels_last)
                   for weight in weights.values() if weight.dim() == 4)
        for name, weight in expected.named_parameters():
            assert torch.equal(weights[name], weight.detach().to(torch.bfloat16))
    assert TextToImage.from_pretrained(tmp_path / "model").unet.conv_in.weight.is_contiguous()  # fp32 as is
    plain = TextToImage.from_pretrained(tmp_path / "model", dtype=torch.bfloat16,
                                        memory_format=torch.contiguous_format)
    assert plain.unet.conv_in.weight.is_contiguous()
    # the same numbers as converting the networks in memory: loading changed nothing but the layout
    settings = dict(num_steps=4, seed=0, height=32, width=32, output_type="np")
    for loaded, memory_format in ((pipe, torch.channels_last), (plain, torch.contiguous_format)):
        converted = tiny_ours(seed=0).to(dtype=torch.bfloat16, memory_format=memory_format)
        assert (loaded("a red car", **settings).images == converted("a red car", **settings).images).all()


def test_a_written_page_of_the_mapping_is_never_dropped(tmp_path):
    save_file({"w": torch.ones(1024, 1024)}, tmp_path / "w.safetensors")
    mapped, _ = read_safetensors(tmp_path / "w.safetensors")
    mapped["w"][512:513] = 5.0                          # a private copy of one page, the rest still the file's
    assert file_pages.release(mapped["w"], file_pages.file_mappings()) == 0
    assert bool((mapped["w"][512] == 5.0).all()) and bool((mapped["w"][0] == 1.0).all())
