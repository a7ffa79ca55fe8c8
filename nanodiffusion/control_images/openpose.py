"""OpenPose keypoints (Cao et al. 2019) as the skeleton image that the openpose ControlNets were trained on.

The JSON is OpenPose's output format, as the A1111 ControlNet extension and pose editors write it:

    {"canvas_width": 512, "canvas_height": 768,
     "people": [{"pose_keypoints_2d": [x0, y0, c0, ..., x17, y17, c17],      # 18 COCO body keypoints
                 "hand_left_keypoints_2d": [...], "hand_right_keypoints_2d": [...],   # 21 each, optional
                 "face_keypoints_2d": [...]}]}                                # 70, optional

A keypoint with confidence 0 is missing. Coordinates are pixels of the canvas, or fractions of it when all
of a person's coordinates lie in [0, 1] (the extension's own files). Each person is drawn as the extension
and controlnet_aux draw it: limbs as coloured ellipses 4 px wide, the canvas dimmed to 60%, then the joints
as radius-4 dots; hands as rainbow lines with blue dots; the face as white dots.
"""

import colorsys
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from nanodiffusion.errors import UserError

# OpenPose's COCO body layout: 0 nose, 1 neck, 2-4 right shoulder/elbow/wrist, 5-7 left ones, 8-10 right
# hip/knee/ankle, 11-13 left ones, 14 right eye, 15 left eye, 16 right ear, 17 left ear.
BODY_KEYPOINTS = 18
LIMBS = ((1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12), (12, 13),
         (1, 0), (0, 14), (14, 16), (0, 15), (15, 17))
# One colour per limb and per joint (RGB): the hue wheel in 18 steps, red at the neck-right-shoulder limb.
COLORS = ((255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
          (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
          (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85))
HAND_EDGES = tuple((0 if j == 0 else 4 * finger + j, 4 * finger + j + 1)     # wrist to each finger's tip
                   for finger in range(5) for j in range(4))
LIMB_WIDTH, JOINT_RADIUS, DIM = 4, 4, 0.6

Keypoints = list[tuple[float, float] | None]        # (x, y) as fractions of the canvas, None when missing


@dataclass(frozen=True)
class Pose:
    """One person's keypoints as fractions of the canvas; hands and face may be absent (None)."""

    body: Keypoints
    left_hand: Keypoints | None = None
    right_hand: Keypoints | None = None
    face: Keypoints | None = None


def read_openpose_json(source: str | Path | dict | list, width: int | None = None,
                       height: int | None = None) -> tuple[list[Pose], int, int]:
    """(poses, canvas width, canvas height) from an OpenPose JSON file, string or parsed object; `width`
    and `height` give the canvas of files that do not say it."""
    data = source if isinstance(source, (dict, list)) else _load(source)
    if isinstance(data, list):
        if len(data) != 1:
            raise UserError(f"an OpenPose JSON list must hold one image's poses, it holds {len(data)}")
        data = data[0]
    if not isinstance(data, dict) or not isinstance(data.get("people"), list):
        raise UserError("OpenPose JSON must be an object with a 'people' list")
    width, height = data.get("canvas_width", width), data.get("canvas_height", height)
    if not isinstance(width, int) or not isinstance(height, int) or width < 1 or height < 1:
        raise UserError(f"the OpenPose JSON has no canvas_width/canvas_height and no size was given "
                        f"(got {width} x {height})")
    poses = []
    for n, person in enumerate(data["people"]):
        body = _keypoints(person.get("pose_keypoints_2d"), f"people[{n}].pose_keypoints_2d", width, height)
        if body is None or len(body) != BODY_KEYPOINTS:
            count = "none" if body is None else len(body)
            hint = " (OpenPose's BODY_25 layout is not supported)" if count == 25 else ""
            raise UserError(f"people[{n}].pose_keypoints_2d must hold {BODY_KEYPOINTS} keypoints (OpenPose's "
                            f"COCO layout), got {count}{hint}")
        poses.append(Pose(body, *(_keypoints(person.get(f"{part}_keypoints_2d"), f"people[{n}].{part}",
                                             width, height) for part in ("hand_left", "hand_right", "face"))))
    return poses, width, height


def _load(source: str | Path) -> dict | list:
    """Parse JSON text, or the file at `source` when it is a path."""
    text = str(source)
    if isinstance(source, Path) or not text.lstrip().startswith(("{", "[")):
        if not Path(source).is_file():
            raise UserError(f"no such OpenPose JSON file: {source}")
        text = Path(source).read_text(encoding="utf-8")
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise UserError(f"not valid OpenPose JSON ({error})") from None


def _keypoints(values, name: str, width: int, height: int) -> Keypoints | None:
    """Flat [x, y, confidence, ...] to (x, y) fractions of the canvas; confidence 0 is a missing point."""
    if not values:
        return None
    if len(values) % 3 or not all(isinstance(v, (int, float)) for v in values):
        raise UserError(f"{name} must be numbers in (x, y, confidence) triples, got {len(values)} values")
    triples = [values[i:i + 3] for i in range(0, len(values), 3)]
    present = [(x, y) for x, y, confidence in triples if confidence > 0]
    normalized = all(0 <= x <= 1 and 0 <= y <= 1 for x, y in present)
    sx, sy = (1.0, 1.0) if normalized else (float(width), float(height))
    return [(x / sx, y / sy) if confidence > 0 else None for x, y, confidence in triples]


def ellipse_polygon(centre: tuple[int, int], axes: tuple[int, int], angle: int) -> list[tuple[int, int]]:
    """Vertices of an ellipse rotated by `angle` degrees, one per degree, rounded to pixels
    (OpenCV's ellipse2Poly with delta 1)."""
    (cx, cy), (a, b) = centre, axes
    cos_a, sin_a = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    points = []
    for degree in range(361):
        x, y = a * math.cos(math.radians(degree)), b * math.sin(math.radians(degree))
        point = (round(cx + x * cos_a - y * sin_a), round(cy + x * sin_a + y * cos_a))
        if not points or point != points[-1]:
            points.append(point)
    return points


def _draw_body(canvas: Image.Image, body: Keypoints) -> Image.Image:
    width, height = canvas.size
    draw = ImageDraw.Draw(canvas)
    for (a, b), color in zip(LIMBS, COLORS):
        if body[a] is None or body[b] is None:
            continue
        x0, y0, x1, y1 = body[a][0] * width, body[a][1] * height, body[b][0] * width, body[b][1] * height
        length = math.hypot(x0 - x1, y0 - y1)
        angle = math.degrees(math.atan2(y0 - y1, x0 - x1))
        centre = (int((x0 + x1) / 2), int((y0 + y1) / 2))
        draw.polygon(ellipse_polygon(centre, (int(length / 2), LIMB_WIDTH), int(angle)), fill=color)
    canvas = Image.fromarray((np.asarray(canvas) * DIM).astype(np.uint8))   # limbs at 60%, under the joints
    draw = ImageDraw.Draw(canvas)
    for point, color in zip(body, COLORS):
        if point is not None:
            _dot(draw, int(point[0] * width), int(point[1] * height), JOINT_RADIUS, color)
    return canvas


def _dot(draw: ImageDraw.ImageDraw, x: int, y: int, radius: int, color: tuple[int, int, int]) -> None:
    """A filled disc: the pixels within `radius` of (x, y), the shape OpenCV's filled circle gives."""
    span = range(-radius, radius + 1)
    draw.point([(x + dx, y + dy) for dy in span for dx in span if dx * dx + dy * dy <= radius * radius],
               fill=color)


def _draw_hand(draw: ImageDraw.ImageDraw, hand: Keypoints, width: int, height: int) -> None:
    pixels = [None if p is None else (int(p[0] * width), int(p[1] * height)) for p in hand]
    # points at the canvas's top or left edge are where detectors put missing ones
    pixels = [p if p is not None and p[0] >= 1 and p[1] >= 1 else None for p in pixels]
    for k, (a, b) in enumerate(HAND_EDGES):
        if a < len(pixels) and b < len(pixels) and pixels[a] and pixels[b]:
            rgb = colorsys.hsv_to_rgb(k / len(HAND_EDGES), 1.0, 1.0)
            draw.line((pixels[a], pixels[b]), fill=tuple(round(c * 255) for c in rgb), width=2)
    for point in filter(None, pixels):
        _dot(draw, *point, JOINT_RADIUS, (0, 0, 255))


def draw_poses(poses: list[Pose], width: int, height: int, *, hands: bool = True,
               face: bool = True) -> Image.Image:
    """The RGB skeleton image (width x height, black background) of `poses`, one person after another."""
    canvas = Image.new("RGB", (width, height))
    for pose in poses:
        canvas = _draw_body(canvas, pose.body)
        draw = ImageDraw.Draw(canvas)
        for hand in (pose.left_hand, pose.right_hand) if hands else ():
            if hand is not None:
                _draw_hand(draw, hand, width, height)
        for point in (pose.face or []) if face else []:
            if point is not None and int(point[0] * width) >= 1 and int(point[1] * height) >= 1:
                _dot(draw, int(point[0] * width), int(point[1] * height), 3, (255, 255, 255))
    return canvas


def openpose_image(source: str | Path | dict | list, width: int | None = None,
                   height: int | None = None) -> Image.Image:
    """The skeleton image of an OpenPose JSON file, string or object, at its canvas size."""
    poses, width, height = read_openpose_json(source, width, height)
    return draw_poses(poses, width, height)
