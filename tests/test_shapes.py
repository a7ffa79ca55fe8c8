"""The procedural shapes data set (rendering, captions, relations) and its exact adherence check."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nanodiffusion.data.shapes import (
    BACKGROUND, COLORS, POSITIONS, RELATIONS, SHAPES, SIZES, ShapesDataset, cell_center, describe,
    parse_shapes_caption, position_of, render_shapes, shape_mask,
)
from nanodiffusion.errors import UserError
from nanodiffusion.evaluation.shapes_check import (
    SHAPE_AREAS, SHAPE_CENTROID_DY, check_shapes, find_objects, shapes_adherence,
)
from nanodiffusion.images import uint8_to_float

STATED = ("color", "shape", "size", "position")


# --- rendering and attributes ------------------------------------------------------------------------------

def test_items_are_a_pure_function_of_seed_and_index():
    a, b = ShapesDataset(32, seed=3, num_items=50), ShapesDataset(32, seed=3, num_items=10_000)
    for i in (0, 7, 49):
        image_a, caption_a, attributes_a = a[i]
        image_b, caption_b, attributes_b = b[i]
        assert torch.equal(image_a, image_b) and caption_a == caption_b and attributes_a == attributes_b
    other = ShapesDataset(32, seed=4, num_items=50)
    assert [a[i][1] for i in range(20)] != [other[i][1] for i in range(20)]
    assert len({a[i][1] for i in range(50)}) > 40                  # items differ from each other


def test_every_value_of_every_attribute_occurs():
    dataset = ShapesDataset(16, seed=0, num_items=1000)
    scenes = [dataset.attributes(i) for i in range(1000)]
    objects = [obj for scene in scenes for obj in scene["objects"]]
    assert {obj["color"] for obj in objects} == set(COLORS)
    assert {obj["shape"] for obj in objects} == set(SHAPES)
    assert {obj["size"] for obj in objects} == set(SIZES)
    assert {obj["position"] for obj in objects} == set(POSITIONS)
    assert {scene["relation"] for scene in scenes} == {None, *RELATIONS}
    assert 0.2 < np.mean([scene["relation"] is not None for scene in scenes]) < 0.4   # two_object_prob 0.3


def test_captions_state_the_attributes():
    dataset = ShapesDataset(16, seed=1, num_items=400)
    for i in range(len(dataset)):
        caption, attributes = dataset[i][1], dataset.attributes(i)
        assert caption == describe(attributes) and caption.startswith("a ")
        stated = parse_shapes_caption(caption)
        assert stated["relation"] == attributes["relation"]
        for said, true in zip(stated["objects"], attributes["objects"], strict=True):
            assert said["color"] == true["color"] and said["shape"] == true["shape"]
            if attributes["relation"] is None:            # one object: every attribute is said
                assert said["size"] == true["size"] and said["position"] == true["position"]
            else:                                         # two: only colours, shapes and the relation
                assert said["size"] is None and said["position"] is None
    # Pinned: a change here changes every shapes data set drawn so far.
    assert describe(dataset.attributes(0)) == "a small white circle in the bottom left"


def test_two_object_relations_match_positions_and_colours_differ():
    dataset = ShapesDataset(32, seed=2, num_items=600, two_object_prob=1.0)
    for i in range(len(dataset)):
        scene = dataset.attributes(i)
        first, second = scene["objects"]
        assert first["color"] != second["color"]
        (row_a, col_a), (row_b, col_b) = (divmod(POSITIONS.index(o["position"]), 3) for o in scene["objects"])
        if scene["relation"] in ("left of", "right of"):
            assert row_a == row_b and (col_a < col_b) == (scene["relation"] == "left of")
            assert (first["x"] < second["x"]) == (scene["relation"] == "left of")
        else:
            assert col_a == col_b and (row_a < row_b) == (scene["relation"] == "above")
            assert (first["y"] < second["y"]) == (scene["relation"] == "above")
        masks = [shape_mask(o["shape"], (o["x"], o["y"]), o["side"], 32) for o in scene["objects"]]
        assert (masks[0] * masks[1]).sum() == 0                    # objects never overlap


@pytest.mark.parametrize("size", [8, 17, 32, 64, 96])
def test_any_size_renders_whole_shapes_in_their_cell(size):
    dataset = ShapesDataset(size, seed=5, num_items=40)
    for i in range(len(dataset)):
        image, _, scene = dataset[i]
        assert image.shape == (3, size, size) and image.dtype == torch.uint8
        assert (image == torch.tensor(BACKGROUND).view(3, 1, 1)).all(dim=0).float().mean() > 0.6
        for obj in scene["objects"]:
            assert position_of(obj["x"], obj["y"]) == obj["position"]
            assert all(0 < c - obj["side"] / 2 and c + obj["side"] / 2 < 1 for c in (obj["x"], obj["y"]))
            mask = shape_mask(obj["shape"], (obj["x"], obj["y"]), obj["side"], size)
            exact = SHAPE_AREAS[obj["shape"]] * (obj["side"] * size) ** 2      # up to edge sampling
            assert mask.sum() == pytest.approx(exact, rel=0.4 if size < 32 else 0.1)


@pytest.mark.parametrize("shape", SHAPES)
def test_shape_masks_have_the_stated_area_and_centroid(shape):
    size, side, center = 128, 0.5, (0.45, 0.55)
    mask = shape_mask(shape, center, side, size)
    assert mask.min() >= 0 and mask.max() == 1
    assert mask.sum() / size**2 == pytest.approx(SHAPE_AREAS[shape] * side**2, rel=0.01)
    rows, cols = np.indices(mask.shape)
    assert ((cols + 0.5) * mask).sum() / mask.sum() / size == pytest.approx(center[0], abs=1e-3)
    centroid_y = ((rows + 0.5) * mask).sum() / mask.sum() / size
    assert centroid_y == pytest.approx(center[1] + SHAPE_CENTROID_DY[shape] * side, abs=2e-3)


def test_render_composites_colours_over_the_background():
    obj = {"color": "red", "shape": "square", "x": 0.5, "y": 0.5, "side": 0.5}
    image = render_shapes([obj], 16)
    assert tuple(image[:, 0, 0].tolist()) == BACKGROUND and tuple(image[:, 8, 8].tolist()) == COLORS["red"]
    assert cell_center("top left") == (1 / 6, 1 / 6) and position_of(0.9, 0.5) == "right"


@pytest.mark.parametrize("caption, expected", [
    ("a small red circle in the top left", [("red", "circle", "small", "top left")]),
    ("A red circle at the top left", [("red", "circle", None, "top left")]),
    ("a large blue cross in the middle", [("blue", "cross", "large", "center")]),
    ("a white square", [("white", "square", None, None)]),
    ("a blue square to the left of a green triangle", [("blue", "square", None, None),
                                                       ("green", "triangle", None, None)]),
])
def test_parse_shapes_caption(caption, expected):
    objects = parse_shapes_caption(caption)["objects"]
    assert [tuple(obj[key] for key in STATED) for obj in objects] == expected


@pytest.mark.parametrize("caption, message", [
    ("a circle", "names a colour"), ("a red thing", "names a colour"), ("a red blue circle", "red/blue"),
    ("a red circle in the top left above a blue square", "no grid positions"),
])
def test_parse_shapes_caption_errors(caption, message):
    with pytest.raises(UserError, match=message):
        parse_shapes_caption(caption)


def test_bad_dataset_arguments():
    for kwargs, message in [({"size": 4}, "at least 8"), ({"size": 32, "two_object_prob": 1.5}, r"\[0, 1\]"),
                            ({"size": 32, "num_items": 0}, "positive"), ({"size": 32, "seed": -1}, "seed")]:
        with pytest.raises(UserError, match=message):
            ShapesDataset(**kwargs)
    with pytest.raises(IndexError):
        ShapesDataset(32, num_items=3)[3]
    with pytest.raises(UserError, match="unknown shape"):
        shape_mask("hexagon", (0.5, 0.5), 0.3, 16)


# --- the adherence check -----------------------------------------------------------------------------------

def _accuracy(size: int, count: int, blur_sigma: float = 0.0, noise_std: float = 0.0) -> dict:
    """Rates of each check on renders of ShapesDataset(size, seed=11), optionally blurred and noised."""
    dataset = ShapesDataset(size, seed=11, num_items=count)
    images = torch.stack([dataset[i][0] for i in range(count)]).float()
    if blur_sigma:
        radius = 2
        kernel = torch.exp(-torch.arange(-radius, radius + 1.0) ** 2 / (2 * blur_sigma**2))
        kernel = (kernel / kernel.sum()).repeat(3, 1, 1, 1)                          # (3, 1, 1, 5)
        images = F.conv2d(F.pad(images, (radius,) * 4, mode="replicate"), kernel, groups=3)
        images = F.conv2d(images, kernel.transpose(2, 3), groups=3)
    images += noise_std * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    images = images.round().clamp(0, 255) / 127.5 - 1
    return shapes_adherence(images, [dataset[i][1] for i in range(count)])


@pytest.mark.parametrize("size, count", [(32, 200), (64, 100)])
def test_check_is_exact_on_clean_renders(size, count):
    rates = _accuracy(size, count)
    assert rates["num_images"] == count
    checks = ("color", "shape", "size", "position", "relation", "count", "all")
    assert all(rates[key] >= 0.99 for key in checks), rates


def test_check_is_robust_to_mild_blur_and_noise():
    rates = _accuracy(32, 100, blur_sigma=0.5, noise_std=8.0)
    assert rates["all"] >= 0.97


def test_check_rejects_wrong_prompts():
    dataset = ShapesDataset(32, seed=12, num_items=60)
    for i in range(len(dataset)):
        image, caption, scene = dataset[i]
        assert check_shapes(image, caption)["all"]
        stated = parse_shapes_caption(caption)
        for key, values in (("color", COLORS), ("shape", SHAPES)):
            wrong = _with(stated, 0, key, next(v for v in values if v not in _used(stated, key)))
            assert not check_shapes(image, wrong)[key], (caption, key)
        if scene["relation"] is None:
            obj = stated["objects"][0]
            assert not check_shapes(image, _with(stated, 0, "size", "large" if obj["size"] == "small"
                                                 else "small"))["size"]
            far = POSITIONS[8 - POSITIONS.index(obj["position"])] if obj["position"] != "center" else "top"
            assert not check_shapes(image, _with(stated, 0, "position", far))["position"]
        else:
            flipped = dict(stated, relation={"left of": "right of", "right of": "left of", "above": "below",
                                             "below": "above"}[stated["relation"]])
            assert not check_shapes(image, flipped)["relation"]
            one = {"objects": stated["objects"][:1], "relation": None}
            assert not check_shapes(image, one)["count"]          # an extra object


def test_check_on_an_empty_image_fails_everything():
    blank = torch.tensor(BACKGROUND, dtype=torch.uint8).view(3, 1, 1).expand(3, 32, 32).contiguous()
    assert find_objects(blank) == []
    result = check_shapes(blank, "a small red circle in the top left")
    assert result == {"color": False, "count": False, "shape": False, "size": False, "position": False,
                      "relation": None, "all": False}
    with pytest.raises(UserError, match="uint8 RGB"):
        check_shapes(blank.float(), "a red circle")
    with pytest.raises(UserError, match="2 images for 1 prompts"):
        shapes_adherence(uint8_to_float(torch.stack([blank, blank])), ["a red circle"])


def test_the_check_finds_colour_position_and_size_of_a_drawn_shape():
    obj = {"color": "purple", "shape": "triangle", "x": 0.8, "y": 0.2, "side": SIZES["large"]}
    found = find_objects(render_shapes([obj], 48))
    assert len(found) == 1 and found[0]["color"] == "purple"
    assert found[0]["area"] == pytest.approx(SHAPE_AREAS["triangle"] * obj["side"] ** 2, rel=0.02)
    assert math.isclose(found[0]["x"], 0.8, abs_tol=0.01) and position_of(found[0]["x"], found[0]["y"]) == \
        "top right"


def _used(stated: dict, key: str) -> set:
    return {obj[key] for obj in stated["objects"]}


def _with(stated: dict, index: int, key: str, value) -> dict:
    objects = [dict(obj) for obj in stated["objects"]]
    objects[index][key] = value
    return {"objects": objects, "relation": stated["relation"]}


def test_two_objects_of_one_colour_are_told_apart():
    objects = [{"color": "red", "shape": "circle", "x": 0.2, "y": 0.5, "side": 0.25},
               {"color": "red", "shape": "square", "x": 0.8, "y": 0.5, "side": 0.25}]
    image = render_shapes(objects, 32)
    assert check_shapes(image, "a red circle left of a red square")["all"]
    assert not check_shapes(image, "a red circle right of a red square")["relation"]
