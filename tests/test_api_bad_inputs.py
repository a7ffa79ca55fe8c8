"""Misuse of the Python API (issue 13): each mistake is refused at the public boundary with a UserError (a
ValueError), or a UserTypeError (also a TypeError) for a wrong type, naming the argument and its value, before
any network runs. Table-driven over `TextToImage.__call__` and `DDPMPipeline.__call__`.
"""

import pytest
import torch
from PIL import Image

from nanodiffusion.errors import UserError
from nanodiffusion.pipelines.ddpm import DDPMPipeline
from fixtures import tiny_ours

IMAGE, MASK = Image.new("RGB", (32, 32)), Image.new("L", (16, 16))


class CudaGenerator(torch.Generator):
    """A generator that says it is on a GPU, which this CPU-only machine cannot make."""
    device = torch.device("cuda")

WRONG_TYPE, WRONG_VALUE = TypeError, ValueError

TEXT_TO_IMAGE = [       # (arguments, keyword arguments, error class, message)
    ((5,), {}, WRONG_TYPE, "prompt must be a string or a non-empty list of strings, got 5 \\(int\\)"),
    (([],), {}, WRONG_VALUE, "prompt must be a string or a non-empty list of strings, got an empty list"),
    ((["a", 2],), {}, WRONG_TYPE, "prompt\\[1\\] must be a string, got 2"),
    (("a", 3), {}, WRONG_TYPE, "negative_prompt must be a string or a non-empty list of strings, got 3"),
    ((["a", "b"], ["c"]), {}, WRONG_VALUE, "got 2 prompts but 1 negative prompts"),
    (("a\udcff",), {}, WRONG_VALUE, "prompt is not valid text: character 1 is a lone surrogate"),
    (("(a:" + "9" * 400 + ")",), {}, WRONG_VALUE, "the emphasis weight of 'a' is inf"),
    (("a",), {"height": 36}, WRONG_VALUE, "height must be a positive multiple of 8, got 36"),
    (("a",), {"width": "32"}, WRONG_TYPE, "width must be an integer, got '32'"),
    (("a",), {"strength": 1.5}, WRONG_VALUE, "strength must be between 0 and 1, got 1.5"),
    (("a",), {"guidance_scale": float("nan")}, WRONG_VALUE, "guidance_scale must be a finite number"),
    (("a",), {"guidance_scale": "7"}, WRONG_TYPE, "guidance_scale must be a number, got '7'"),
    (("a",), {"seed": 2**64}, WRONG_VALUE, "seed must be an integer from 0 to 2\\*\\*64 - 1"),
    (("a",), {"seed": 1.5}, WRONG_TYPE, "seed must be an integer, got 1.5"),
    (("a",), {"num_steps": 5000}, WRONG_VALUE, "the number of steps \\(5000\\) exceeds the schedule's 1000"),
    (("a",), {"clip_skip": 9}, WRONG_VALUE, "clip_skip must be between 1 and 2 \\(this model's text encoder"),
    (("a",), {"sampler": 3}, WRONG_TYPE, "sampler must be a string, got 3"),
    (("a",), {"emphasis": "yes"}, WRONG_TYPE, "emphasis must be True or False, got 'yes'"),
    (("a",), {"output_type": "jpg"}, WRONG_VALUE, "unknown output_type 'jpg'; valid: pil, np, latent"),
    (("a",), {"generator": "42", "seed": None}, WRONG_TYPE, "generator must be a torch.Generator, got '42'"),
    (("a",), {"generator": CudaGenerator(), "seed": None}, WRONG_VALUE, "generator is on cuda but the"),
    (("a",), {"latents": [0.0]}, WRONG_TYPE, "latents must be a float tensor, got list"),
    (("a",), {"latents": torch.zeros(1, 4, 3, 3)}, WRONG_VALUE, "latents must have shape \\(1, 4, 16, 16\\)"),
    (("a",), {"image": "cat.png"}, WRONG_TYPE, "image must be a PIL image.*\\(open a file with PIL"),
    (("a",), {"image": torch.full((1, 3, 32, 32), 255.0)}, WRONG_VALUE,
     "image as a tensor must hold values in \\[-1, 1\\], got 255 to 255"),
    (("a",), {"mask_image": MASK}, WRONG_VALUE, "mask_image needs the image to inpaint"),
    (("a",), {"image": IMAGE, "mask_image": MASK}, WRONG_VALUE, "the mask is 16x16 but the image is 32x32"),
    (("a",), {"callback": 3}, WRONG_TYPE, "callback must be callable"),
    (("a",), {"steps": 3}, WRONG_VALUE, "unknown generation settings: steps"),
]


@pytest.fixture(scope="module")
def pipe():
    return tiny_ours()


@pytest.mark.parametrize("args, kwargs, kind, message", TEXT_TO_IMAGE)
def test_text_to_image_refuses(pipe, monkeypatch, args, kwargs, kind, message):
    def never(*args, **kwargs):
        raise AssertionError("the UNet ran before the arguments were checked")

    monkeypatch.setattr(pipe.unet, "forward", never)
    settings = {"num_steps": 1, "seed": 0, "height": None if "image" in kwargs else 32,
                "width": None if "image" in kwargs else 32}
    with pytest.raises(UserError, match=message) as error:
        pipe(*args, **{**settings, **kwargs})
    assert isinstance(error.value, kind)


DDPM = [
    ({"num_images": 0}, WRONG_VALUE, "num_images must be >= 1, got 0"),
    ({"num_images": "2"}, WRONG_TYPE, "num_images must be an integer, got '2'"),
    ({"seed": -1}, WRONG_VALUE, "seed must be an integer from 0 to 2\\*\\*64 - 1, got -1"),
    ({"guidance_scale": float("inf")}, WRONG_VALUE, "guidance_scale must be a finite number, got inf"),
    ({"labels": "Dress"}, WRONG_TYPE, "labels must be a list of class indices or class names, got 'Dress'"),
    ({"gif_frames": 9}, WRONG_VALUE, "a GIF of the reverse process has 2 .* = 3 frames, asked for 9"),
    ({"sampler": "euler", "eta": 0.5}, WRONG_VALUE, "sampler 'euler' takes no option eta"),
]


@pytest.mark.parametrize("kwargs, kind, message", DDPM)
def test_ddpm_pipeline_refuses(kwargs, kind, message):
    pipe = DDPMPipeline.from_pretrained("fashion-mnist")
    with pytest.raises(UserError, match=message) as error:
        pipe(**{"num_images": 2, "num_steps": 2, "progress": False, **kwargs})
    assert isinstance(error.value, kind)
