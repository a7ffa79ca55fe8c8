"""Captioned data sets: MNIST-family with class captions, shapes, captioned folders, mixes, and errors."""

import json
import re

import pytest
import torch
from PIL import Image

from fixtures import make_fake_mnist
from nanodiffusion.data.captioned import CaptionedDataset, load_captioned
from nanodiffusion.data.captions import class_prompts, prompt_to_class
from nanodiffusion.data.datasets import load_dataset
from nanodiffusion.data.shapes import ShapesDataset
from nanodiffusion.errors import UserError


@pytest.fixture
def data_dir(tmp_path):
    """Toy MNIST and Fashion-MNIST files (64 images each) under one folder, as --data-dir takes them."""
    make_fake_mnist(tmp_path / "mnist" / "mnist", seed=0)
    make_fake_mnist(tmp_path / "mnist" / "fashion-mnist", seed=1)
    return str(tmp_path / "mnist")


def write_images(folder, names, size=(12, 10), mode="RGB"):
    """Small images with distinct flat colours; returns their relative names."""
    for i, name in enumerate(names):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new(mode, size, (40 * i, 100, 200) if mode == "RGB" else 40 * i).save(path)
    return names


def test_mnist_captions_are_the_class_prompts_drawn_per_visit(data_dir):
    dataset = load_captioned("mnist", data_dir=data_dir)
    labels = load_dataset("mnist", data_dir=data_dir).labels
    assert (len(dataset), dataset.channels, dataset.image_size) == (64, 1, 28)
    assert dataset.parts == (("mnist", 64),)
    assert dataset.caption(3) == class_prompts("mnist", int(labels[3]))[0]       # canonical, no generator
    indices = torch.arange(64)
    images, captions = dataset.batch(indices, torch.Generator().manual_seed(0))
    assert images.shape == (64, 1, 28, 28) and images.dtype == torch.float32 and images.min() >= -1
    assert all(caption in class_prompts("mnist", int(label)) for caption, label in zip(captions, labels))
    assert [prompt_to_class("mnist", caption) for caption in captions] == labels.tolist()
    assert captions == dataset.batch(indices, torch.Generator().manual_seed(0))[1]     # same seed, same words
    generator = torch.Generator().manual_seed(0)
    epochs = [dataset.captions(indices, generator) for _ in range(2)]
    assert epochs[0] == captions and epochs[1] != epochs[0]                             # new words each epoch


def test_caption_draws_use_one_number_per_item(data_dir):
    """The generator advances by the batch size whatever the items, so a resumed run replays the same."""
    dataset = load_captioned("fashion-mnist+shapes", image_size=16, data_dir=data_dir, num_shapes=8)
    generator, reference = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    dataset.captions(torch.tensor([0, 70, 3, 71]), generator)
    torch.rand(4, generator=reference, dtype=torch.float64)
    assert torch.equal(generator.get_state(), reference.get_state())
    assert dataset.caption(70, torch.Generator()) == dataset.caption(70)                 # shapes: one caption


def test_mix_is_a_concatenation_in_rgb_at_one_size(data_dir):
    dataset = load_captioned("fashion-mnist+mnist+shapes", image_size=16, data_dir=data_dir, num_shapes=10,
                             seed=3)
    assert dataset.parts == (("fashion-mnist", 64), ("mnist", 64), ("shapes", 10))
    assert dataset.images.shape == (138, 3, 16, 16)
    gray = load_captioned("mnist", image_size=16, data_dir=data_dir)
    assert torch.equal(dataset.images[64:128], gray.images.expand(-1, 3, -1, -1))      # gray -> RGB copies
    shapes = ShapesDataset(16, seed=3, num_items=10)
    assert torch.equal(dataset.images[128], shapes[0][0]) and dataset.caption(128) == shapes[0][1]
    images, captions = dataset.batch(torch.tensor([0, 64, 128]), torch.Generator().manual_seed(0))
    assert prompt_to_class("fashion-mnist", captions[0]) is not None
    assert prompt_to_class("mnist", captions[1]) is not None and captions[2] == shapes[0][1]
    assert load_captioned("shapes", image_size=None, num_shapes=2).image_size == 32
    assert load_captioned("mnist+shapes", data_dir=data_dir, num_shapes=2).image_size == 28   # MNIST's size


def test_num_class_images_keeps_the_first_images_of_each_mnist_family_part(data_dir):
    full = load_captioned("fashion-mnist+mnist+shapes", image_size=16, data_dir=data_dir, num_shapes=4)
    part = load_captioned("fashion-mnist+mnist+shapes", image_size=16, data_dir=data_dir, num_shapes=4,
                          num_class_images=5)
    assert part.parts == (("fashion-mnist", 5), ("mnist", 5), ("shapes", 4))
    kept = torch.cat([torch.arange(5), torch.arange(64, 69), torch.arange(128, 132)])
    assert torch.equal(part.images, full.images[kept])
    assert [part.caption(i) for i in range(14)] == [full.caption(i) for i in kept.tolist()]
    with pytest.raises(UserError, match="num_class_images must be positive, got 0"):
        load_captioned("mnist", data_dir=data_dir, num_class_images=0)


@pytest.mark.parametrize("convention", ["jsonl", "txt"])
def test_captioned_folder(tmp_path, convention):
    # All images in sub-folders (or all directly inside): read_image_folder refuses a mix of the two.
    names = write_images(tmp_path, ["x/b.png", "x/a.jpg", "y/c.png"])
    captions = {"x/b.png": "a blue thing", "x/a.jpg": "an ápple", "y/c.png": "a third one"}
    if convention == "jsonl":
        lines = [json.dumps({"file_name": name, "text": captions[name], "extra": 1}) for name in names]
        (tmp_path / "metadata.jsonl").write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    else:
        for name in names:
            (tmp_path / name).with_suffix(".txt").write_text(f" {captions[name]}\n", encoding="utf-8")
    dataset = load_captioned(str(tmp_path), image_size=8)
    assert isinstance(dataset, CaptionedDataset) and dataset.images.shape == (3, 3, 8, 8)
    # read_image_folder's order: sorted paths
    expected = [captions[name] for name in ("x/a.jpg", "x/b.png", "y/c.png")]
    assert [dataset.caption(i) for i in range(3)] == expected
    assert load_captioned(str(tmp_path), image_size=8, channels=1).channels == 1
    mixed = load_captioned(f"{tmp_path}+shapes", image_size=8, num_shapes=2)
    assert mixed.images.shape == (5, 3, 8, 8) and mixed.caption(0) == captions["x/a.jpg"]


def test_gray_folder_becomes_rgb_beside_shapes(tmp_path):
    write_images(tmp_path, ["x.png"], mode="L")
    (tmp_path / "x.txt").write_text("gray")
    assert load_captioned(str(tmp_path), image_size=8).channels == 1
    mixed = load_captioned(f"shapes+{tmp_path}", image_size=8, num_shapes=1)
    assert mixed.images.shape == (2, 3, 8, 8) and mixed.caption(1) == "gray"
    assert torch.equal(mixed.images[1, 0], mixed.images[1, 2])


def _metadata_error(tmp_path, lines):
    write_images(tmp_path, ["a.png", "b.png"])
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError) as error:
        load_captioned(str(tmp_path), image_size=8)
    return str(error.value)


A_PNG, B_PNG = '{"file_name": "a.png", "text": "x"}', '{"file_name": "b.png", "text": "y"}'


@pytest.mark.parametrize("lines, message", [
    ([A_PNG, B_PNG[:-1] + ","], "line 2 is not valid JSON"),
    (['{"file_name": "a.png", "caption": "x"}'], r"line 1 has no 'text' column \(it has: file_name, caption"),
    (['{"text": "x"}'], "line 1 has no 'file_name' column"),
    (['["a.png", "x"]'], "line 1 is a JSON list, not an object"),
    (['{"file_name": "a.png", "text": 3}'], "'text' must be a string"),
    ([A_PNG, B_PNG.replace("b.png", "c.png")], "line 2: image 'c.png' not found"),
    ([A_PNG, B_PNG.replace("b.png", "./a.png")], "second caption for './a.png'"),
    ([A_PNG], r"1 of 2 images in .* have no caption in metadata.jsonl \(e.g. b.png\)"),
])
def test_bad_metadata_is_a_user_error(tmp_path, lines, message):
    assert re.search(message, _metadata_error(tmp_path, lines))


def test_folder_errors(tmp_path):
    with pytest.raises(UserError, match="image folder not found"):
        load_captioned(str(tmp_path / "missing"), image_size=8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images"):
        load_captioned(str(tmp_path / "empty"), image_size=8)
    write_images(tmp_path / "txt", [f"{i}.png" for i in range(8)])
    (tmp_path / "txt" / "0.txt").write_text("only one")
    listed = r"\(e.g. 1.png, 2.png, 3.png, 4.png, 5.png\)"                  # the first five only
    with pytest.raises(UserError, match=r"7 of 8 images .* \.txt file .*" + listed):
        load_captioned(str(tmp_path / "txt"), image_size=8)
    write_images(tmp_path / "csv", ["a.png"])
    (tmp_path / "csv" / "metadata.csv").write_text("file_name,text\na.png,x\n")
    with pytest.raises(UserError, match="only metadata.jsonl is read"):
        load_captioned(str(tmp_path / "csv"), image_size=8)


def test_name_errors(tmp_path, data_dir):
    with pytest.raises(UserError, match="unknown data set 'cifar'.*mnist, fashion-mnist, shapes"):
        load_captioned("cifar", image_size=8)
    with pytest.raises(UserError, match="empty data set name"):
        load_captioned("mnist+", image_size=8)
    with pytest.raises(UserError, match="twice"):
        load_captioned("shapes+shapes", image_size=8)
    with pytest.raises(UserError, match="channels=3"):
        load_captioned("shapes", image_size=8, channels=1)
    with pytest.raises(UserError, match="data_dir"):
        load_captioned("shapes", image_size=8, data_dir=data_dir)
    with pytest.raises(UserError, match="channels must be"):
        load_captioned("shapes", image_size=8, channels=2)
    write_images(tmp_path / "big", ["a.png"], size=(20, 20))
    (tmp_path / "big" / "a.txt").write_text("x")
    with pytest.raises(UserError, match=r"differ in image size \(mnist \(28, 28\), .* \(20, 20\)\)"):
        load_captioned(f"mnist+{tmp_path / 'big'}", data_dir=data_dir)


def test_real_fashion_mnist_captions_name_the_true_class(shared_data_dir):
    dataset = load_captioned("fashion-mnist", image_size=32, data_dir=shared_data_dir)
    labels = load_dataset("fashion-mnist", data_dir=shared_data_dir).labels
    indices = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:500]
    images, captions = dataset.batch(indices, torch.Generator().manual_seed(1))
    assert images.shape == (500, 1, 32, 32) and len(dataset) == 60_000
    assert [prompt_to_class("fashion-mnist", caption) for caption in captions] == labels[indices].tolist()
