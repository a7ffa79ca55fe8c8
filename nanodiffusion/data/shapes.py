"""A procedural data set of coloured shapes with compositional captions, rendered at any size.

One object: "a small red circle in the top left" (colour, shape, size and a cell of a 3x3 grid). Two objects:
"a blue square left of a green triangle" (colours differ; both sit in one row for left/right, in one column
for above/below). Item i of seed s is a pure function of (s, i), so the set is reproducible and unbounded.
Shapes are drawn as exact coverage masks (4x4 samples per pixel, i.e. antialiased) over a plain dark
background; `shapes_check` re-renders these masks to judge generated images.
"""

import numpy as np
import torch

from nanodiffusion.errors import UserError

COLORS = {                          # well apart in RGB and from the background, so pixels segment cleanly
    "red": (230, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 220, 40),
    "purple": (160, 60, 200),
    "white": (240, 240, 240),
}
BACKGROUND = (24, 24, 24)
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = {"small": 0.19, "large": 0.29}     # side of the shape's bounding square, as a fraction of the image
SIZE_JITTER = 0.04                  # sides vary by up to +-4%: two large shapes in next cells never overlap
POSITION_JITTER = 0.015             # centres move by up to +-1.5% of the image within their cell
ROWS, COLS = ("top", "", "bottom"), ("left", "", "right")
POSITIONS = tuple(" ".join(filter(None, (row, col))) or "center" for row in ROWS for col in COLS)
POSITION_PHRASES = {                # the grid cell as said in a caption
    "top left": "in the top left", "top": "at the top", "top right": "in the top right",
    "left": "on the left", "center": "in the center", "right": "on the right",
    "bottom left": "in the bottom left", "bottom": "at the bottom", "bottom right": "in the bottom right",
}
RELATIONS = ("left of", "right of", "above", "below")
RELATION_SYNONYMS = {               # every way a caption may say each relation, the canonical one first
    "left of": ("left of", "to the left of"),
    "right of": ("right of", "to the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
SIZE_SYNONYMS = {"small": "little", "large": "big"}
SYNONYM_MEANINGS = {"little": "small", "big": "large", "upper": "top", "lower": "bottom"}   # for parsing
SUPERSAMPLE = 4                     # coverage samples per pixel along each axis


def cell_center(position: str) -> tuple[float, float]:
    """(x, y) of the centre of a grid cell, in image fractions (0 left/top, 1 right/bottom)."""
    row, col = divmod(POSITIONS.index(position), 3)
    return (col + 0.5) / 3, (row + 0.5) / 3


def position_of(x: float, y: float) -> str:
    """The grid cell holding the point (x, y), in image fractions."""
    col, row = (min(max(int(v * 3), 0), 2) for v in (x, y))
    return POSITIONS[3 * row + col]


def shape_mask(shape: str, center: tuple[float, float], side: float, image_size: int) -> np.ndarray:
    """Coverage (H, W) float32 in [0, 1] of a shape whose bounding square has side `side` (image fraction).

    The triangle points up (base and height both `side`); the cross has arms a third of `side` wide.
    """
    # Only the pixels of the bounding square (plus one) are sampled: 10x faster than the whole image.
    (x0, x1), (y0, y1) = (_pixel_span(c, side, image_size) for c in center)
    xs, ys = (_sample_positions(lo, hi, image_size) for lo, hi in ((x0, x1), (y0, y1)))
    dx = np.abs(xs[None, :] - center[0]) / side                           # (1, w*S): x offset in sides
    dy = (ys[:, None] - center[1]) / side                                 # (h*S, 1): signed y offset
    if shape == "circle":
        inside = dx**2 + dy**2 <= 0.25
    elif shape == "square":
        inside = (dx <= 0.5) & (np.abs(dy) <= 0.5)
    elif shape == "triangle":
        inside = (dy <= 0.5) & (dx <= (dy + 0.5) / 2)                     # half-width grows from the apex
    elif shape == "cross":
        inside = (((dx <= 1 / 6) & (np.abs(dy) <= 0.5)) | ((np.abs(dy) <= 1 / 6) & (dx <= 0.5)))
    else:
        raise UserError(f"unknown shape {shape!r}: valid shapes are {', '.join(SHAPES)}")
    mask = np.zeros((image_size, image_size), dtype=np.float32)
    inside = inside.reshape(y1 - y0, SUPERSAMPLE, x1 - x0, SUPERSAMPLE)
    mask[y0:y1, x0:x1] = inside.mean(axis=(1, 3), dtype=np.float32)
    return mask


def _pixel_span(center: float, side: float, image_size: int) -> tuple[int, int]:
    """The pixel range [lo, hi) that a shape centred at `center` with side `side` can touch."""
    lo = int(np.floor((center - side / 2) * image_size)) - 1
    hi = int(np.ceil((center + side / 2) * image_size)) + 1
    return min(max(lo, 0), image_size), min(max(hi, 0), image_size)


def _sample_positions(lo: int, hi: int, image_size: int) -> np.ndarray:
    """Positions (image fractions) of the SUPERSAMPLE x SUPERSAMPLE samples of pixels lo..hi-1, per axis."""
    n = image_size * SUPERSAMPLE
    return (np.arange(lo * SUPERSAMPLE, hi * SUPERSAMPLE, dtype=np.float32) + 0.5) / n


def render_shapes(objects: list[dict], image_size: int) -> torch.Tensor:
    """Draw objects (dicts with "color", "shape", "x", "y", "side") in order; returns uint8 (3, H, W)."""
    image = np.empty((image_size, image_size, 3), dtype=np.float32)
    image[:] = BACKGROUND
    for obj in objects:
        alpha = shape_mask(obj["shape"], (obj["x"], obj["y"]), obj["side"], image_size)[..., None]
        image = image * (1 - alpha) + np.array(COLORS[obj["color"]], dtype=np.float32) * alpha
    return torch.from_numpy(np.rint(image).astype(np.uint8)).permute(2, 0, 1).contiguous()


def sample_attributes(rng: np.random.Generator, two_object_prob: float = 0.3) -> dict:
    """Draw a scene: {"objects": [{"color", "shape", "size", "position", "x", "y", "side"}, ...],
    "relation": None or how the first object stands to the second ("left of", ...)}."""
    if rng.random() >= two_object_prob:
        return {"objects": [_sample_object(rng, POSITIONS[rng.integers(9)])], "relation": None}
    relation = RELATIONS[rng.integers(len(RELATIONS))]
    line = rng.integers(3)                                   # the shared row (left/right) or column
    first, second = sorted(rng.choice(3, size=2, replace=False))  # the first stands left of / above
    if relation in ("right of", "below"):
        first, second = second, first
    cells = [(line, k) if relation in ("left of", "right of") else (k, line) for k in (first, second)]
    colors = rng.choice(len(COLORS), size=2, replace=False)    # distinct colours tell the objects apart
    objects = [_sample_object(rng, POSITIONS[3 * row + col], list(COLORS)[color])
               for (row, col), color in zip(cells, colors)]
    return {"objects": objects, "relation": relation}


def _sample_object(rng: np.random.Generator, position: str, color: str | None = None) -> dict:
    color = color or list(COLORS)[rng.integers(len(COLORS))]
    shape, size = SHAPES[rng.integers(len(SHAPES))], list(SIZES)[rng.integers(len(SIZES))]
    x, y = (c + rng.uniform(-POSITION_JITTER, POSITION_JITTER) for c in cell_center(position))
    side = SIZES[size] * (1 + rng.uniform(-SIZE_JITTER, SIZE_JITTER))
    return {"color": color, "shape": shape, "size": size, "position": position,
            "x": float(x), "y": float(y), "side": float(side)}


def describe(attributes: dict) -> str:
    """The caption of a scene: every attribute of one object, or two objects' colours, shapes and relation."""
    objects, relation = attributes["objects"], attributes["relation"]
    if relation is None:
        obj = objects[0]
        return f"a {obj['size']} {obj['color']} {obj['shape']} {POSITION_PHRASES[obj['position']]}"
    first, second = (f"a {obj['color']} {obj['shape']}" for obj in objects)
    return f"{first} {relation} {second}"


def parse_shapes_caption(caption: str) -> dict:
    """The attributes a caption states: {"objects": [{"color", "shape", "size", "position"}], "relation"};
    what it leaves out is None. Accepts what `describe` writes, with or without size and position, and the
    synonyms of `shapes_captions.caption_choices`."""
    words = caption.lower().replace(",", " ").split()
    text = " ".join(words)
    found = relation_phrase(text)
    relation, parts = (found[0], text.split(f" {found[1]} ")) if found else (None, [text])
    objects = [_parse_object(part.split(), caption) for part in parts]
    if relation and any(obj["position"] for obj in objects):
        raise UserError(f"a caption with a relation gives no grid positions: {caption!r}")
    return {"objects": objects, "relation": relation}


def relation_phrase(caption: str) -> tuple[str, str] | None:
    """(relation, the phrase that says it) in a caption, the longest phrase found ("to the left of" over
    "left of"); None when it states no relation."""
    text = f" {caption} "
    found = [(relation, phrase) for relation, phrases in RELATION_SYNONYMS.items() for phrase in phrases
             if f" {phrase} " in text]
    return max(found, key=lambda item: len(item[1])) if found else None


def _parse_object(words: list[str], caption: str) -> dict:
    def pick(options):
        found = [word for word in words if word in options]
        if len(found) > 1:
            raise UserError(f"{'/'.join(found)} in one object of the caption {caption!r}")
        return found[0] if found else None

    words = [SYNONYM_MEANINGS.get(word, word) for word in words]
    color, shape, size = pick(COLORS), pick(SHAPES), pick(SIZES)
    if color is None or shape is None:
        raise UserError(f"a shapes caption names a colour ({', '.join(COLORS)}) and a shape "
                        f"({', '.join(SHAPES)}) for each object: {caption!r}")
    row, col = pick(("top", "bottom")), pick(("left", "right"))
    center = pick(("center", "centre", "middle"))
    position = " ".join(filter(None, (row, col))) or ("center" if center else None)
    return {"color": color, "shape": shape, "size": size, "position": position}


class ShapesDataset:
    """`num_items` scenes of coloured shapes; item i is (uint8 image (3, H, W), caption, attributes), a pure
    function of (seed, i), rendered when asked for."""

    def __init__(self, size: int, seed: int = 0, num_items: int = 60_000, two_object_prob: float = 0.3):
        if size < 8:
            raise UserError(f"shapes need an image size of at least 8 pixels, got {size}")
        if not 0.0 <= two_object_prob <= 1.0:
            raise UserError(f"two_object_prob must be in [0, 1], got {two_object_prob}")
        if seed < 0:
            raise UserError(f"seed must be >= 0, got {seed}")
        if num_items < 1:
            raise UserError(f"num_items must be positive, got {num_items}")
        self.size, self.seed, self.num_items, self.two_object_prob = size, seed, num_items, two_object_prob

    def __len__(self) -> int:
        return self.num_items

    def attributes(self, index: int) -> dict:
        """The scene of item `index` without rendering it."""
        if not 0 <= index < self.num_items:
            raise IndexError(f"index {index} out of range for {self.num_items} items")
        return sample_attributes(np.random.default_rng((self.seed, index)), self.two_object_prob)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str, dict]:
        attributes = self.attributes(index)
        return render_shapes(attributes["objects"], self.size), describe(attributes), attributes
