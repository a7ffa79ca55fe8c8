"""Exact prompt adherence for the coloured-shapes data set: does an image show the colours, shapes, sizes,
positions and relation that its prompt states?

1. Segment: every pixel is projected onto the segment from the background (the image's median colour) to
   each palette colour; it takes the colour it lies closest to, with coverage alpha along that segment (an
   antialiased edge pixel is a mix of the two, so alpha recovers its coverage exactly on clean renders).
2. Objects: 8-connected blobs of pixels with alpha >= 0.5, per colour, of at least MIN_OBJECT_AREA.
3. Shape by synthesis: for each candidate shape, the size that explains the blob's area and the centre that
   explains its centroid give a rendered mask (`shape_mask`); the shape whose mask overlaps best (soft IoU)
   wins. The same estimate gives the size; the centroid gives the grid cell.
"""

import math

import numpy as np
import torch

from nanodiffusion.data.shapes import (
    COLORS, SHAPES, SIZES, parse_shapes_caption, position_of, shape_mask,
)
from nanodiffusion.errors import UserError
from nanodiffusion.images import float_to_uint8

# Geometry of `shape_mask` per unit side: the area, and how far below the centre the centroid lies.
SHAPE_AREAS = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5, "cross": 5 / 9}
SHAPE_CENTROID_DY = {"circle": 0.0, "square": 0.0, "triangle": 1 / 6, "cross": 0.0}
SIZE_THRESHOLD = math.sqrt(SIZES["small"] * SIZES["large"])     # sides above it read as "large"
MIN_OBJECT_AREA = 0.005             # fraction of the image; a small shape covers about 0.017 of it
BLUR_SIGMAS = (0.0, 0.5, 1.0)      # pixels; a blurred square is closer to a blurred square than to a circle
EDGE_PIXELS = 2                     # a blob's mask reaches this far past its alpha >= 0.5 pixels (soft edges)
CHECKS = ("color", "shape", "size", "position", "relation", "count")


def find_objects(image: torch.Tensor) -> list[dict]:
    """Blobs of palette colours in a uint8 image (3, H, W), largest first: dicts with "color", "area", "x",
    "y", "side" (image fractions), "shape" (`classify_shape`) and "mask" (H, W) float32 coverage."""
    if image.ndim != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
        raise UserError(f"expected a uint8 RGB image (3, H, W), got {image.dtype} {tuple(image.shape)}")
    pixels = image.permute(1, 2, 0).numpy().astype(np.float32)             # (H, W, 3)
    height, width = pixels.shape[:2]
    background = np.median(pixels.reshape(-1, 3), axis=0)
    directions = np.array(list(COLORS.values()), dtype=np.float32) - background        # (K, 3)
    offsets = pixels - background                                                       # (H, W, 3)
    alphas = np.clip(offsets @ directions.T / (directions**2).sum(axis=1), 0.0, 1.0)   # (H, W, K)
    residuals = np.linalg.norm(offsets[..., None, :] - alphas[..., None] * directions, axis=-1)
    nearest = residuals.argmin(axis=-1)                                                 # (H, W)
    alpha = np.take_along_axis(alphas, nearest[..., None], axis=-1)[..., 0]
    objects = []
    for k, color in enumerate(COLORS):
        own = nearest == k
        for blob in _components(own & (alpha >= 0.5)):
            mask = np.where(_dilate(blob, EDGE_PIXELS) & own, alpha, 0.0).astype(np.float32)
            area = mask.sum() / (height * width)
            if area >= MIN_OBJECT_AREA:
                rows, cols = np.indices(mask.shape)
                x = ((cols + 0.5) * mask).sum() / mask.sum() / width
                y = ((rows + 0.5) * mask).sum() / mask.sum() / height
                obj = {"color": color, "area": float(area), "x": float(x), "y": float(y), "mask": mask}
                obj["shape"], obj["side"] = classify_shape(obj)
                objects.append(obj)
    return sorted(objects, key=lambda obj: -obj["area"])


def classify_shape(obj: dict) -> tuple[str, float]:
    """The shape whose rendering (sharp or blurred) best overlaps a blob (a dict with "mask", "area", "x",
    "y"), and its side (image fraction)."""
    mask = obj["mask"]
    best = (-1.0, None, None)
    for shape in SHAPES:
        side = math.sqrt(obj["area"] / SHAPE_AREAS[shape])
        center = (obj["x"], obj["y"] - SHAPE_CENTROID_DY[shape] * side)
        rendered = shape_mask(shape, center, side, mask.shape[0])
        for sigma in BLUR_SIGMAS:
            candidate = _gaussian_blur(rendered, sigma)
            iou = np.minimum(mask, candidate).sum() / np.maximum(mask, candidate).sum()
            best = max(best, (iou, shape, side), key=lambda item: item[0])
    return best[1], best[2]


def check_shapes(image: torch.Tensor, attributes: dict | str) -> dict:
    """Judge a uint8 image (3, H, W) against a prompt or its `parse_shapes_caption` attributes.

    Returns {check: True/False, or None where the prompt says nothing of it} for CHECKS, and "all". "count"
    asks for exactly as many objects as the prompt names; a relation asks for the right sign along its axis,
    and for that axis to hold the larger offset (as the training scenes, in one row or column, do).
    """
    if isinstance(attributes, str):
        attributes = parse_shapes_caption(attributes)
    if image.shape[-1] != image.shape[-2]:
        raise UserError(f"expected a square image, got {tuple(image.shape)}")
    wanted, relation = attributes["objects"], attributes["relation"]
    found = find_objects(image)
    matches = _match_colors(found, wanted)
    result = {"color": all(match is not None for match in matches), "count": len(found) == len(wanted)}
    if len(wanted) == 1 and matches[0] is None and found:
        matches = [found[0]]            # judge shape and place of the main object even in the wrong colour
    judged = [_judge(want, match) for want, match in zip(wanted, matches)]
    for key in ("shape", "size", "position"):
        stated = [verdict[key] for verdict in judged if verdict[key] is not None]
        result[key] = all(stated) if stated else None
    result["relation"] = None
    if relation is not None:
        result["relation"] = None not in matches and _relation_holds(relation, *matches)
    result["all"] = all(value for value in result.values() if value is not None)
    return result


def shapes_adherence(images: torch.Tensor, prompts: list[str]) -> dict:
    """Rates of each check (None where no prompt states it) for images (B, 3, H, W) in [-1, 1]."""
    if len(images) != len(prompts):
        raise UserError(f"{len(images)} images for {len(prompts)} prompts")
    results = [check_shapes(image, prompt) for image, prompt in zip(float_to_uint8(images.cpu()), prompts)]
    rates = {"num_images": len(results)}
    for key in (*CHECKS, "all"):
        values = [result[key] for result in results if result[key] is not None]
        rates[key] = sum(values) / len(values) if values else None
    return rates


def _judge(want: dict, match: dict | None) -> dict:
    """Shape, size and position of one found object (None: not found) against what the prompt states."""
    found = match is not None
    size = match["side"] > SIZE_THRESHOLD if found else None
    return {"shape": found and match["shape"] == want["shape"],
            "size": None if want["size"] is None else found and size == (want["size"] == "large"),
            "position": None if want["position"] is None
            else found and position_of(match["x"], match["y"]) == want["position"]}


def _match_colors(found: list[dict], wanted: list[dict]) -> list[dict | None]:
    """For each wanted object, a found object of its colour not matched before, of its shape if there is
    one, else the largest (or None)."""
    matches = []
    for want in wanted:
        candidates = [obj for obj in found
                      if obj["color"] == want["color"] and not any(obj is other for other in matches)]
        same_shape = [obj for obj in candidates if obj["shape"] == want["shape"]]
        matches.append((same_shape or candidates or [None])[0])
    return matches


def _relation_holds(relation: str, first: dict, second: dict) -> bool:
    dx, dy = first["x"] - second["x"], first["y"] - second["y"]
    along, across = (dx, dy) if relation in ("left of", "right of") else (dy, dx)
    sign = -1 if relation in ("left of", "above") else 1
    return along * sign > 0 and abs(along) > abs(across)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """The 8-connected components of a boolean mask (H, W), as boolean masks."""
    labels = np.where(mask, np.arange(1, mask.size + 1).reshape(mask.shape), 0)
    while True:                         # spread the largest label through each blob until nothing changes
        grown = np.where(mask, _max_3x3(labels), 0)
        if np.array_equal(grown, labels):
            break
        labels = grown
    return [labels == label for label in np.unique(labels[mask])]


def _max_3x3(values: np.ndarray) -> np.ndarray:
    """Maximum over each pixel's 3x3 neighbourhood (zero beyond the border)."""
    padded = np.pad(values, 1)
    height, width = values.shape
    return np.max([padded[i:i + height, j:j + width] for i in range(3) for j in range(3)], axis=0)


def _dilate(mask: np.ndarray, pixels: int) -> np.ndarray:
    mask = mask.astype(np.uint8)
    for _ in range(pixels):
        mask = _max_3x3(mask)
    return mask.astype(bool)


def _gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur (H, W) with a kernel of radius ceil(3 sigma), zero beyond the border."""
    if sigma == 0:
        return image
    radius = math.ceil(3 * sigma)
    kernel = np.exp(-np.arange(-radius, radius + 1) ** 2 / (2 * sigma**2))
    kernel /= kernel.sum()
    height, width = image.shape
    padded = np.pad(image, radius)
    rows = sum(weight * padded[i:i + height] for i, weight in enumerate(kernel))             # (H, W + 2r)
    return sum(weight * rows[:, i:i + width] for i, weight in enumerate(kernel)).astype(np.float32)
