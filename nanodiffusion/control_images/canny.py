"""Canny edge maps (Canny 1986) for edge ControlNets, computed as OpenCV's `cv2.Canny` does, which the
ControlNet annotators (A1111's "canny" module, controlnet_aux's CannyDetector) call on the RGB image.

Steps: an optional Gaussian blur (cv2.Canny itself has none), 3x3 Sobel gradients with replicated borders,
on colour images the channel with the largest gradient at each pixel, non-maximum suppression along four
directions, and hysteresis: pixels above `high` are edges, pixels above `low` are edges when 8-connected
to one. Integer arithmetic throughout, so the output equals OpenCV's.
"""

import math

import numpy as np

from nanodiffusion.errors import UserError

_SHIFT = 15                                                   # fixed-point bits of the direction test
_TAN_22_5 = int(math.tan(math.pi / 8) * (1 << _SHIFT) + 0.5)   # tan(22.5°) in fixed point, as OpenCV


def gaussian_kernel(sigma: float) -> np.ndarray:
    """OpenCV's 8-bit Gaussian kernel: round(6σ+1)|1 taps in units of 1/256, each rounded with the error
    of the previous carried over (error diffusion), the middle tap taking what makes the sum exactly 256."""
    taps = int(math.floor(sigma * 6 + 1.5)) | 1
    offsets = np.arange(taps) - (taps - 1) / 2
    exact = np.exp(-offsets**2 / (2 * sigma**2))
    exact *= 256 / exact.sum()
    kernel, error = np.zeros(taps, dtype=np.int64), 0.0
    for i in range(taps // 2):                                 # symmetric: the outer taps, mirrored
        value = exact[i] + error
        kernel[i] = kernel[-1 - i] = math.floor(value + 0.5)
        error = value - kernel[i]
    kernel[taps // 2] = 256 - 2 * kernel[: taps // 2].sum()
    return kernel


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of a uint8 (H, W, C) image in exact integer arithmetic, mirrored borders without
    repeating the edge pixel: OpenCV's GaussianBlur(image, (0, 0), σ) on 8-bit images, bit for bit."""
    kernel = gaussian_kernel(sigma)
    radius = len(kernel) // 2
    h = image.astype(np.int64)
    for axis in (1, 0):                                        # rows, then columns: sums in 1/65536 units
        pad = [(0, 0)] * h.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(h, pad, mode="reflect")                # reflect: "gfedcb|abcdefgh|gfedcba"
        length = h.shape[axis]
        h = sum(int(w) * np.take(padded, np.arange(k, k + length), axis=axis) for k, w in enumerate(kernel))
    return ((h + (1 << 15)) >> 16).astype(np.uint8)           # round half up to 8 bits


def sobel(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(dx, dy) int32 3x3 Sobel derivatives of a (H, W, C) image with replicated borders."""
    p = np.pad(image.astype(np.int32), ((1, 1), (1, 1), (0, 0)), mode="edge")   # (H+2, W+2, C)
    rows = p[:-2] + 2 * p[1:-1] + p[2:]                          # vertical smoothing (H, W+2, C)
    cols = p[:, :-2] + 2 * p[:, 1:-1] + p[:, 2:]                 # horizontal smoothing (H+2, W, C)
    return rows[:, 2:] - rows[:, :-2], cols[2:] - cols[:-2]


def _strongest_channel(dx: np.ndarray, dy: np.ndarray, l2: bool):
    """Per pixel, the gradient of the channel with the largest magnitude (the first one on ties)."""
    magnitude = dx * dx + dy * dy if l2 else np.abs(dx) + np.abs(dy)          # (H, W, C)
    best = magnitude.argmax(axis=2)[..., None]                               # (H, W, 1)
    return (np.take_along_axis(a, best, axis=2)[..., 0] for a in (dx, dy, magnitude))


def _local_maxima(dx: np.ndarray, dy: np.ndarray, magnitude: np.ndarray) -> np.ndarray:
    """True where the magnitude is a maximum across the edge, along the gradient rounded to 0°, 45°, 90° or
    135°; ties go to the left / upper neighbour, as in OpenCV (so a 2-pixel ridge keeps one pixel)."""
    h, w = magnitude.shape
    padded = np.pad(magnitude, 1)                               # zeros outside the image

    def at(di: int, dj: int) -> np.ndarray:                     # the magnitude at (i + di, j + dj)
        return padded[1 + di: 1 + di + h, 1 + dj: 1 + dj + w]

    m = magnitude
    ax, ay = np.abs(dx).astype(np.int64), np.abs(dy).astype(np.int64) << _SHIFT
    tan22 = ax * _TAN_22_5
    horizontal = ay < tan22                                     # gradient within 22.5° of the x axis
    vertical = ~horizontal & (ay > tan22 + (ax << (_SHIFT + 1)))  # within 22.5° of the y axis (tan 67.5°)
    falling = (dx ^ dy) >= 0                                    # dx, dy of one sign: the 45° diagonal
    diagonal = np.where(falling, (m > at(-1, -1)) & (m > at(1, 1)), (m > at(-1, 1)) & (m > at(1, -1)))
    return np.where(horizontal, (m > at(0, -1)) & (m >= at(0, 1)),
                    np.where(vertical, (m > at(-1, 0)) & (m >= at(1, 0)), diagonal))


def hysteresis(strong: np.ndarray, weak: np.ndarray) -> np.ndarray:
    """Strong pixels and the weak ones 8-connected to them (a flood fill from every strong pixel)."""
    h, w = strong.shape
    width = w + 2                                               # a false border: no bounds checks below
    candidate = bytearray(np.pad(weak & ~strong, 1).tobytes())
    edges = np.pad(strong, 1).reshape(-1)
    stack = np.flatnonzero(edges).tolist()
    offsets = (-width - 1, -width, -width + 1, -1, 1, width - 1, width, width + 1)
    while stack:
        p = stack.pop()
        for q in (p + o for o in offsets):
            if candidate[q]:
                candidate[q] = 0
                edges[q] = True
                stack.append(q)
    return edges.reshape(h + 2, w + 2)[1:-1, 1:-1]


def canny(image: np.ndarray, low: float = 100, high: float = 200, *, blur_sigma: float = 0.0,
          l2_gradient: bool = False) -> np.ndarray:
    """(H, W) uint8 edge map, 255 on edges, of a uint8 (H, W) or (H, W, C) image; thresholds on the L1 (or
    L2) norm of the Sobel gradient, as `cv2.Canny(image, low, high, L2gradient=l2_gradient)`."""
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise UserError(f"canny needs a uint8 (H, W) or (H, W, C) image, got {image.dtype} {image.shape}")
    if low < 0 or high < 0:
        raise UserError(f"canny thresholds must be >= 0, got low={low} and high={high}")
    if blur_sigma < 0:
        raise UserError(f"blur_sigma must be >= 0 (0: no blur), got {blur_sigma}")
    if image.ndim == 2:
        image = image[..., None]
    if blur_sigma > 0:
        image = gaussian_blur(image, blur_sigma)
    low, high = sorted((low, high))
    if l2_gradient:                                             # compare squared norms, in integers
        low, high = (min(32767.0, value) ** 2 for value in (low, high))
    low, high = math.floor(low), math.floor(high)
    dx, dy, magnitude = _strongest_channel(*sobel(image), l2_gradient)
    candidates = (magnitude > low) & _local_maxima(dx, dy, magnitude)
    edges = hysteresis(candidates & (magnitude > high), candidates)
    return edges.astype(np.uint8) * 255


def edge_maps(images: np.ndarray, low: float = 100, high: float = 200) -> np.ndarray:
    """(B, H, W) uint8 Canny maps (255 on edges) of uint8 RGB images (B, 3, H, W): the control images an
    edge ControlNet is trained on, as A1111's "canny" module makes them (no blur)."""
    return np.stack([canny(np.ascontiguousarray(image.transpose(1, 2, 0)), low, high) for image in images])
