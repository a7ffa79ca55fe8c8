"""Tensor <-> PIL conversion, grids, animated GIFs and PNG text chunks."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence

from nanodiffusion.errors import UserError
from nanodiffusion.images import (float_to_uint8, from_pil, image_grid, pil_to_uint8, read_png_text,
                                  resize_center_crop, save_gif, save_png, to_pil, uint8_to_float)


def test_uint8_float_round_trip_is_exact():
    pixels = torch.arange(256, dtype=torch.uint8)
    x = uint8_to_float(pixels)
    assert x.min() == -1 and x.max() == 1
    assert torch.equal(float_to_uint8(x), pixels)
    assert float_to_uint8(torch.tensor([-3.0, 3.0])).tolist() == [0, 255]          # clamped


@pytest.mark.parametrize("channels, mode", [(1, "L"), (3, "RGB")])
def test_to_pil_from_pil_round_trip(channels, mode):
    x = uint8_to_float(torch.randint(0, 256, (2, channels, 5, 7), generator=torch.Generator().manual_seed(0),
                                     dtype=torch.uint8))
    images = to_pil(x)
    assert len(images) == 2 and images[0].mode == mode and images[0].size == (7, 5)
    assert torch.equal(from_pil(images, channels=channels), x)


def test_to_pil_rejects_bad_shapes():
    with pytest.raises(ValueError, match="C in"):
        to_pil(torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match="B, C, H, W"):
        to_pil(torch.zeros(3, 8, 8))


def test_from_pil_converts_mode_and_resizes():
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 10, 20))                        # a blue strip that the center crop drops
    x = pil_to_uint8(image, size=8, channels=3)
    assert x.shape == (1, 3, 8, 8) and x[0, :, :, 4].unique(dim=1).tolist() == [[255], [0], [0]]
    gray = pil_to_uint8(image, size=8, channels=1)
    assert gray.shape == (1, 1, 8, 8) and gray[0, 0, 0, 4] == 76                 # ITU-R 601 luma of red
    assert resize_center_crop(Image.new("L", (30, 90)), 10).size == (10, 10)
    transparent = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert pil_to_uint8(transparent, channels=3).unique().tolist() == [255]      # composited over white
    with pytest.raises(UserError, match="different sizes"):
        pil_to_uint8([Image.new("L", (4, 4)), Image.new("L", (5, 4))], channels=1)
    with pytest.raises(UserError, match="channels"):
        pil_to_uint8(image, channels=2)


def test_image_grid_layout_and_blank_cells():
    tiles = [Image.new("L", (3, 2), value) for value in (10, 20, 30)]
    grid = image_grid(tiles, rows=2, cols=2)
    assert grid.size == (6, 4) and grid.mode == "L"
    pixels = np.asarray(grid)
    assert pixels[0, 0] == 10 and pixels[0, 3] == 20 and pixels[2, 0] == 30 and pixels[2, 3] == 0
    with pytest.raises(UserError, match="2x2 grid holds 1 to 4"):
        image_grid(tiles * 2, rows=2, cols=2)
    with pytest.raises(UserError, match="same size"):
        image_grid([tiles[0], Image.new("L", (4, 2))], rows=1, cols=2)


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_gif_keeps_every_frame_and_holds_the_last(tmp_path, mode):
    a, b = Image.new(mode, (12, 10), "white"), Image.new(mode, (12, 10), "black")
    frames = [a, a, a, b, b]                                        # Pillow's own writer would keep 2
    save_gif(frames, tmp_path / "x.gif", duration_ms=50, hold_last_ms=1500)
    with Image.open(tmp_path / "x.gif") as gif:
        assert gif.n_frames == len(frames) and gif.info["loop"] == 0
        durations, colors = [], []
        for frame in ImageSequence.Iterator(gif):
            durations.append(frame.info["duration"])
            colors.append(frame.convert("L").getpixel((5, 5)))
    assert durations == [50, 50, 50, 50, 1500]
    assert colors == [255, 255, 255, 0, 0]
    assert [p.name for p in tmp_path.iterdir()] == ["x.gif"]       # no temporary file left


def test_gif_pixels_survive(tmp_path):
    x = uint8_to_float(torch.randint(0, 256, (3, 1, 9, 11), generator=torch.Generator().manual_seed(1),
                                     dtype=torch.uint8))
    save_gif(to_pil(x), tmp_path / "g.gif")
    with Image.open(tmp_path / "g.gif") as gif:
        read_back = [np.asarray(frame.convert("L")) for frame in ImageSequence.Iterator(gif)]
    assert np.array_equal(np.stack(read_back), float_to_uint8(x)[:, 0].numpy())   # 256 grays: lossless


def test_gif_errors(tmp_path):
    with pytest.raises(UserError, match="at least one frame"):
        save_gif([], tmp_path / "x.gif")
    with pytest.raises(UserError, match="same size"):
        save_gif([Image.new("L", (4, 4)), Image.new("L", (5, 4))], tmp_path / "x.gif")


def test_png_text_round_trip(tmp_path):
    text = {"parameters": "a photo of a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 42",
            "comment": "héllo — ünïcode ✓"}
    image = Image.new("RGB", (4, 4), (1, 2, 3))
    save_png(image, tmp_path / "sub" / "out.png", text)
    assert read_png_text(tmp_path / "sub" / "out.png") == text
    with Image.open(tmp_path / "sub" / "out.png") as loaded:
        assert loaded.getpixel((0, 0)) == (1, 2, 3)
    save_png(image, tmp_path / "plain.png")
    assert read_png_text(tmp_path / "plain.png") == {}
    Image.new("RGB", (4, 4)).save(tmp_path / "x.jpg")
    with pytest.raises(UserError, match="not a PNG"):
        read_png_text(tmp_path / "x.jpg")
