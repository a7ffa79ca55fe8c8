"""Teach the built-in text-to-image model a shape it never saw, a five-pointed star, with `train lora`, and
measure how often it draws one before and after (docs/adapters.md, "Training a LoRA").

    python scripts/lora_star_demo.py render runs/stars              # the captioned folder: "a red star", ...
    python -m nanodiffusion train lora --dataset runs/stars ...     # (docs/adapters.md has the command)
    python scripts/lora_star_demo.py checker                        # the checker on held-out renders
    python scripts/lora_star_demo.py measure [--lora runs/star-lora/star.safetensors]

The checker is ours and independent of training: it segments the image with evaluation/shapes_check.py
(palette colours over a dark background), then names the largest blob's shape by synthesis: the star and the
shapes data set's four shapes are rendered at the blob's centre and area, sharp and blurred, and the one that
overlaps best (soft IoU) wins. A star counts when that shape is "star" and its colour is the prompt's.
"""

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from nanodiffusion.data.shapes import BACKGROUND, COLORS, SHAPES, SUPERSAMPLE, shape_mask
from nanodiffusion.evaluation.shapes_check import SHAPE_AREAS, SHAPE_CENTROID_DY, find_objects
from nanodiffusion.images import float_to_uint8, save_png

IMAGE_SIZE = 32                         # the built-in model's native size
STAR_INNER = 0.45                       # inner / outer radius: fatter than a pentagram (0.38), so that the
                                        # points stay visible at 32 pixels
STAR_SIDES = (0.55, 0.8)                # the outer diameter, as a fraction of the image
CENTER_JITTER = 0.08
BLUR_SIGMAS = (0.0, 0.7, 1.4)           # pixels: generated images are softer than renders


def star_polygon(center: tuple[float, float], side: float) -> np.ndarray:
    """The 10 corners (x, y) of a five-pointed star, one point up, whose outer circle has diameter `side`."""
    angles = -math.pi / 2 + np.arange(10) * math.pi / 5
    radii = np.where(np.arange(10) % 2 == 0, side / 2, side / 2 * STAR_INNER)
    return np.stack([center[0] + radii * np.cos(angles), center[1] + radii * np.sin(angles)], axis=1)


def star_mask(center: tuple[float, float], side: float, image_size: int) -> np.ndarray:
    """Coverage (H, W) float32 of the star, SUPERSAMPLE² samples per pixel (even-odd rule)."""
    n = image_size * SUPERSAMPLE
    positions = (np.arange(n, dtype=np.float32) + 0.5) / n
    xs, ys = np.meshgrid(positions, positions)                           # (n, n) each
    inside = np.zeros((n, n), dtype=bool)
    corners = star_polygon(center, side)
    for (x0, y0), (x1, y1) in zip(corners, np.roll(corners, -1, axis=0)):
        crosses = (y0 > ys) != (y1 > ys)                                 # the edge spans this sample's row
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = x0 + (ys - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (xs < x_at)
    return inside.reshape(image_size, SUPERSAMPLE, image_size, SUPERSAMPLE).mean(axis=(1, 3)).astype(np.float32)


STAR_AREA = float(star_mask((0.5, 0.5), 0.8, 256).mean() / 0.8**2)      # per unit side, measured


def render_star(rng: np.random.Generator) -> tuple[torch.Tensor, str]:
    """One uint8 image (3, 32, 32) of a star of a random colour, size and place, and its caption."""
    color = list(COLORS)[rng.integers(len(COLORS))]
    side = rng.uniform(*STAR_SIDES)
    center = tuple(0.5 + rng.uniform(-CENTER_JITTER, CENTER_JITTER, size=2))
    alpha = star_mask(center, side, IMAGE_SIZE)[..., None]
    image = np.array(BACKGROUND, np.float32) * (1 - alpha) + np.array(COLORS[color], np.float32) * alpha
    return torch.from_numpy(np.rint(image).astype(np.uint8)).permute(2, 0, 1), f"a {color} star"


def render(folder: Path, num_images: int, seed: int) -> None:
    """A captioned image folder (metadata.jsonl) of `num_images` stars."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for k in range(num_images):
        image, caption = render_star(rng)
        save_png(_to_pil(image), folder / f"{k:05d}.png")
        lines.append(json.dumps({"file_name": f"{k:05d}.png", "text": caption}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    print(f"wrote {num_images} stars and their captions to {folder}")


def _to_pil(image: torch.Tensor):
    from PIL import Image
    return Image.fromarray(image.permute(1, 2, 0).numpy())


def _blur(mask: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of a (H, W) mask with torch's conv2d, zero padding."""
    if sigma == 0:
        return mask
    radius = math.ceil(3 * sigma)
    taps = torch.exp(-torch.arange(-radius, radius + 1, dtype=torch.float32) ** 2 / (2 * sigma**2))
    kernel = (taps[:, None] * taps[None, :] / taps.sum() ** 2)[None, None]                    # (1, 1, k, k)
    return F.conv2d(torch.from_numpy(mask)[None, None], kernel, padding=radius)[0, 0].numpy()


def classify(blob: dict) -> str:
    """The shape among SHAPES and "star" whose rendering at the blob's centre and area overlaps it best."""
    mask, best = blob["mask"], (-1.0, "none")
    for shape in (*SHAPES, "star"):
        side = math.sqrt(blob["area"] / (STAR_AREA if shape == "star" else SHAPE_AREAS[shape]))
        dy = 0.0 if shape == "star" else SHAPE_CENTROID_DY[shape]
        center = (blob["x"], blob["y"] - dy * side)
        rendered = star_mask(center, side, mask.shape[0]) if shape == "star" \
            else shape_mask(shape, center, side, mask.shape[0])
        for sigma in BLUR_SIGMAS:
            candidate = _blur(rendered, sigma)
            iou = float(np.minimum(mask, candidate).sum() / np.maximum(mask, candidate).sum())
            best = max(best, (iou, shape))
    return best[1]


def judge(image: torch.Tensor, color: str) -> dict:
    """{"shape": the largest blob's shape (or "none"), "color_ok", "star"} for a uint8 image (3, H, W)."""
    blobs = find_objects(image)
    if not blobs:
        return {"shape": "none", "color_ok": False, "star": False}
    shape, color_ok = classify(blobs[0]), blobs[0]["color"] == color
    return {"shape": shape, "color_ok": color_ok, "star": shape == "star" and color_ok}


def rates(verdicts: list[dict]) -> dict:
    shapes = [v["shape"] for v in verdicts]
    return {"images": len(verdicts), "star_rate": np.mean([v["star"] for v in verdicts]).item(),
            "star_shape_rate": np.mean([s == "star" for s in shapes]).item(),
            "color_rate": np.mean([v["color_ok"] for v in verdicts]).item(),
            "shapes_seen": {s: shapes.count(s) for s in sorted(set(shapes))}}


def checker_accuracy(num_per_shape: int, seed: int) -> dict:
    """The checker on held-out renders: stars (another seed than training's) and the four other shapes."""
    rng = np.random.default_rng(seed)
    verdicts = {}
    for shape in (*SHAPES, "star"):
        right = 0
        for _ in range(num_per_shape):
            if shape == "star":
                image, caption = render_star(rng)
                color = caption.split()[1]
            else:
                color = list(COLORS)[rng.integers(len(COLORS))]
                center = tuple(0.5 + rng.uniform(-CENTER_JITTER, CENTER_JITTER, size=2))
                alpha = shape_mask(shape, center, rng.uniform(0.3, 0.6), IMAGE_SIZE)[..., None]
                pixels = np.array(BACKGROUND, np.float32) * (1 - alpha) + np.array(COLORS[color]) * alpha
                image = torch.from_numpy(np.rint(pixels).astype(np.uint8)).permute(2, 0, 1)
            right += judge(image, color)["shape"] == shape
        verdicts[shape] = right / num_per_shape
    return verdicts


def measure(model: str, lora: str | None, num_per_color: int, seed: int, prompt: str) -> tuple[dict, list]:
    """Generate num_per_color images of `prompt` (with {color}) per colour and judge them; returns the rates
    and 8 example images (uint8) per colour."""
    from nanodiffusion.pipelines.text_to_image import TextToImage
    pipe = TextToImage.from_pretrained(model)
    pipe.show_progress = False
    if lora:
        pipe.load_lora_weights(lora)
    verdicts, examples = [], []
    for k, color in enumerate(COLORS):
        images = pipe(prompt.format(color=color), num_images_per_prompt=num_per_color, seed=seed + k,
                      output_type="latent").images
        pixels = float_to_uint8(pipe.decode_latents(images).cpu())
        verdicts += [judge(image, color) for image in pixels]
        examples += list(pixels[:8])
    return {"model": model, "lora": lora, "prompt": prompt, **rates(verdicts)}, examples


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("render", help="write the captioned star folder")
    make.add_argument("folder", type=Path)
    make.add_argument("--num-images", type=int, default=1000)
    make.add_argument("--seed", type=int, default=0)
    check = commands.add_parser("checker", help="the checker's accuracy on held-out renders")
    check.add_argument("--num-per-shape", type=int, default=100)
    check.add_argument("--seed", type=int, default=12345)
    run = commands.add_parser("measure", help="star adherence of the model, with or without a LoRA")
    run.add_argument("--model", default="builtin")
    run.add_argument("--lora")
    run.add_argument("--prompt", default="a {color} star", help="'{color}' becomes each palette colour")
    run.add_argument("--num-per-color", type=int, default=50)
    run.add_argument("--seed", type=int, default=1000)
    run.add_argument("--grid", type=Path, help="also write 8 examples per colour as a grid PNG")
    args = parser.parse_args(argv)
    if args.command == "render":
        render(args.folder, args.num_images, args.seed)
    elif args.command == "checker":
        print(json.dumps(checker_accuracy(args.num_per_shape, args.seed)))
    else:
        result, examples = measure(args.model, args.lora, args.num_per_color, args.seed, args.prompt)
        if args.grid:
            from nanodiffusion.images import image_grid
            save_png(image_grid([_to_pil(image) for image in examples], rows=len(COLORS), cols=8), args.grid)
        print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
