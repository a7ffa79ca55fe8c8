"""Control images: Canny edges (closed form, and bit for bit against OpenCV when it is installed), OpenPose
JSON drawn as the annotators draw it, and the A1111 resize rules."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from nanodiffusion.control_images.canny import canny, gaussian_blur, gaussian_kernel, hysteresis
from nanodiffusion.control_images.openpose import COLORS, LIMBS, openpose_image, read_openpose_json
from nanodiffusion.control_images.resize import control_tensor, fit_control_image, to_rgb
from nanodiffusion.errors import UserError


def _scene(seed: int = 0) -> np.ndarray:
    """A colour test image: a disc, a box and a thin diagonal over noise (no OpenCV needed)."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:96, :128]
    image = np.zeros((96, 128, 3), dtype=np.int64)
    image[(rows - 40) ** 2 + (cols - 40) ** 2 <= 25**2] = (200, 80, 30)
    image[20:81, 70:121] = (30, 220, 140)
    image[np.abs(rows - (90 - cols * 85 / 127)) < 1.5] = (255, 255, 255)
    return np.clip(image + rng.integers(-20, 20, image.shape), 0, 255).astype(np.uint8)


def test_a_step_edge_gives_one_column_the_left_of_the_two_maxima():
    image = np.zeros((20, 20), dtype=np.uint8)
    image[:, 10:] = 200                                    # |dx| = 800 at columns 9 and 10
    expected = np.zeros((20, 20), dtype=np.uint8)
    expected[:, 9] = 255
    assert np.array_equal(canny(image, 100, 200), expected)
    assert not canny(np.full((20, 20, 3), 77, dtype=np.uint8)).any()      # flat: no edges


def test_hysteresis_keeps_weak_pixels_8_connected_to_strong_ones():
    strong, weak = np.zeros((8, 8), dtype=bool), np.zeros((8, 8), dtype=bool)
    strong[0, 0] = True
    weak[[1, 2, 3, 3, 6], [1, 2, 3, 4, 6]] = True               # a diagonal chain from it, and a loner
    expected = strong.copy()
    expected[[1, 2, 3, 3], [1, 2, 3, 4]] = True
    assert np.array_equal(hysteresis(strong, weak | strong), expected)


@pytest.mark.parametrize("low, high, l2", [(100, 200, False), (50, 100, True), (10, 30, False),
                                           (200, 100, False), (300, 600, True)])
def test_canny_equals_opencv(low, high, l2):
    cv2 = pytest.importorskip("cv2")
    scene = _scene()
    noise = np.random.default_rng(1).integers(0, 256, (64, 80, 3), dtype=np.uint8)
    for image in (scene, scene[..., 1], noise):
        expected = cv2.Canny(image, low, high, L2gradient=l2)
        assert np.array_equal(canny(image, low, high, l2_gradient=l2), expected)


@pytest.mark.parametrize("sigma", [0.5, 0.8, 1.4, 3.0])
def test_blur_equals_opencv_bit_for_bit(sigma):
    cv2 = pytest.importorskip("cv2")
    scene = _scene()
    blurred = cv2.GaussianBlur(scene, (0, 0), sigma)
    assert np.array_equal(gaussian_blur(scene, sigma), blurred)
    assert np.array_equal(canny(scene, 50, 100, blur_sigma=sigma), cv2.Canny(blurred, 50, 100))


def test_blur_kernel_sums_to_one_and_keeps_flat_images():
    assert gaussian_kernel(1.7).sum() == 256 and len(gaussian_kernel(1.7)) == 11     # round(6σ + 1) | 1
    flat = np.full((9, 11, 3), 123, dtype=np.uint8)
    assert np.array_equal(gaussian_blur(flat, 1.7), flat)


def test_bad_canny_inputs_fail_clearly():
    with pytest.raises(UserError, match="uint8"):
        canny(np.zeros((8, 8), dtype=np.float32))
    with pytest.raises(UserError, match="thresholds"):
        canny(np.zeros((8, 8), dtype=np.uint8), -1, 10)


# An 18-keypoint person on a 512 x 768 canvas, in pixels; the left ear (17) is missing.
PERSON = [(256, 120), (256, 200), (200, 200), (170, 300), (150, 390), (312, 200), (340, 300), (360, 390),
          (220, 400), (215, 540), (210, 680), (292, 400), (300, 540), (310, 680), (240, 105), (272, 105),
          (225, 115), (288, 115)]


def _pose_json(points, width=512, height=768, missing=(17,), scale=(1.0, 1.0)) -> dict:
    flat = []
    for k, (x, y) in enumerate(points):
        flat += [0.0, 0.0, 0.0] if k in missing else [x * scale[0], y * scale[1], 1.0]
    return {"canvas_width": width, "canvas_height": height, "people": [{"pose_keypoints_2d": flat}]}


def test_one_limb_and_its_joints_closed_form():
    """Neck (1) and right shoulder (2) only: limb 0 in 60% red between them, the joints in full colour."""
    points = [(0, 0)] * 18
    points[1], points[2] = (100, 50), (60, 50)
    image = np.asarray(openpose_image(_pose_json(points, 128, 96, missing=set(range(18)) - {1, 2})))
    assert image.shape == (96, 128, 3)
    assert tuple(image[50, 80]) == (153, 0, 0)                  # floor(0.6 * 255) at the limb's middle
    assert tuple(image[50, 100]) == COLORS[1] and tuple(image[50, 60]) == COLORS[2]
    assert tuple(image[46, 100]) == COLORS[1] and tuple(image[45, 100]) == (0, 0, 0)   # radius-4 dots
    assert image[:40].max() == 0 and image[60:].max() == 0      # a 4-pixel-wide limb, nothing else


def test_pixel_and_normalized_coordinates_draw_the_same_image():
    centres = [(x + 0.5, y + 0.5) for x, y in PERSON]             # pixel centres: no rounding at the edge
    pixels = openpose_image(_pose_json(centres))
    normalized = openpose_image(_pose_json(centres, scale=(1 / 512, 1 / 768)))
    as_text = openpose_image(json.dumps([_pose_json(centres)]))            # a one-image list, as text
    assert np.array_equal(np.asarray(pixels), np.asarray(normalized))
    assert np.array_equal(np.asarray(pixels), np.asarray(as_text))


def test_skeleton_matches_the_annotators_opencv_drawing():
    """The annotators' rules drawn with OpenCV's primitives (ellipse polygons, filled circles)."""
    cv2 = pytest.importorskip("cv2")
    ours = np.asarray(openpose_image(_pose_json(PERSON)))
    canvas = np.zeros((768, 512, 3), dtype=np.uint8)
    present = [None if k == 17 else p for k, p in enumerate(PERSON)]
    for (a, b), color in zip(LIMBS, COLORS):
        if present[a] and present[b]:
            (x0, y0), (x1, y1) = present[a], present[b]
            angle = int(math.degrees(math.atan2(y0 - y1, x0 - x1)))
            polygon = cv2.ellipse2Poly((int((x0 + x1) / 2), int((y0 + y1) / 2)),
                                       (int(math.hypot(x0 - x1, y0 - y1) / 2), 4), angle, 0, 360, 1)
            cv2.fillConvexPoly(canvas, polygon, color)
    canvas = (canvas * 0.6).astype(np.uint8)
    for point, color in zip(present, COLORS):
        if point:
            cv2.circle(canvas, point, 4, color, thickness=-1)
    drawn = (canvas > 0).any(axis=2) | (ours > 0).any(axis=2)
    differing = (canvas != ours).any(axis=2)
    assert differing.sum() <= 0.02 * drawn.sum()               # polygon edges rasterised a little differently


def test_two_people_are_drawn_one_after_another():
    data = _pose_json(PERSON, missing=set(range(18)) - {1, 2})
    data["people"].append({"pose_keypoints_2d": _pose_json([(x + 150, y) for x, y in PERSON],
                                                           missing=set(range(18)) - {1, 2})
                           ["people"][0]["pose_keypoints_2d"]})
    image = np.asarray(openpose_image(data))
    assert tuple(image[200, 228]) == (91, 0, 0)       # the first person's limb dimmed twice: 255 * 0.6 * 0.6
    assert tuple(image[200, 378]) == (153, 0, 0)
    assert tuple(image[200, 256]) == (153, 51, 0)     # and its joint once


def test_hands_and_face_are_drawn_when_given():
    data = _pose_json(PERSON)
    data["people"][0]["hand_right_keypoints_2d"] = [v for k in range(21) for v in (150 + k, 400 + 2 * k, 1.0)]
    data["people"][0]["face_keypoints_2d"] = [256.0, 140.0, 1.0] * 70
    image = np.asarray(openpose_image(data))
    assert tuple(image[440, 170]) == (0, 0, 255)      # the last hand point's blue dot
    assert tuple(image[140, 256]) == (255, 255, 255)  # a face point


@pytest.mark.parametrize("data, message", [
    ({"people": []}, "no canvas_width"),
    ({"canvas_width": 64, "canvas_height": 64, "people": [{"pose_keypoints_2d": [1.0] * 75}]}, "BODY_25"),
    ({"canvas_width": 64, "canvas_height": 64, "people": [{"pose_keypoints_2d": [1.0] * 10}]}, "triples"),
    ([{"people": []}, {"people": []}], "one image's poses"),
    ("{not json", "not valid OpenPose JSON"),
])
def test_bad_pose_json_fails_clearly(data, message):
    with pytest.raises(UserError, match=message):
        read_openpose_json(data)
    assert read_openpose_json({"people": []}, 64, 32)[1:] == (64, 32)     # the size can come from the caller


def _stripes(width: int, height: int) -> Image.Image:
    """Thirds of red, green and blue from left to right."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    third = width // 3
    pixels[:, :third, 0], pixels[:, third:2 * third, 1], pixels[:, 2 * third:, 2] = 255, 255, 255
    return Image.fromarray(pixels)


def test_just_resize_stretches():
    image = fit_control_image(_stripes(300, 100), 150, 100)
    assert image.size == (150, 100) and image.getpixel((10, 50)) == (255, 0, 0)
    same = _stripes(64, 64)
    assert np.array_equal(np.asarray(fit_control_image(same, 64, 64, "crop_and_resize")), np.asarray(same))


def test_crop_and_resize_cuts_the_overhang_evenly():
    image = np.asarray(fit_control_image(_stripes(300, 100), 100, 100, "Crop and Resize"))   # A1111's name
    assert image.shape == (100, 100, 3)
    assert (image[:, :, 1] == 255).all()                     # scale 1, columns 100..199: all green


def test_resize_and_fill_pads_with_the_border_median():
    pixels = np.full((50, 100, 3), (10, 20, 30), dtype=np.uint8)
    pixels[10:40, 10:90] = (250, 250, 250)
    image = np.asarray(fit_control_image(Image.fromarray(pixels), 200, 200, "resize_and_fill"))
    assert image.shape == (200, 200, 3)
    assert tuple(image[0, 0]) == (10, 20, 30) and tuple(image[199, 100]) == (10, 20, 30)   # padding
    assert tuple(image[100, 100]) == (250, 250, 250)          # scale 2, pasted at rows 50..149


def test_rgba_becomes_white_behind_and_tensors_are_in_zero_one():
    image = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert to_rgb(image).getpixel((0, 0)) == (255, 255, 255)
    tensor = control_tensor(Image.fromarray(np.full((8, 16, 3), 255, dtype=np.uint8)))
    assert tensor.shape == (1, 3, 8, 16) and tensor.dtype == torch.float32 and torch.all(tensor == 1)


def test_unknown_resize_mode_lists_the_valid_ones():
    with pytest.raises(UserError, match="just_resize, crop_and_resize, resize_and_fill"):
        fit_control_image(_stripes(30, 30), 10, 10, "stretch")
