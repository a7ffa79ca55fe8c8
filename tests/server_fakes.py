"""Helpers of the server tests: a fake pipeline whose steps the test paces, the served model's record, and
small waits and decoders."""

import base64
import io
import threading
import time
from dataclasses import replace
from pathlib import Path

from PIL import Image

from nanodiffusion.pipelines.text_to_image import GenerationRequest, TextToImageOutput
from nanodiffusion.server.generation import ServedModel

MODEL = ServedModel("tiny-sd", Path("tiny-sd"), "0123456789", "fp32", "cpu")
WAIT = 10.0                                               # seconds before a test gives up on an event


def png(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def b64_image(image: Image.Image, format: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class FakePipe:
    """A pipeline whose steps take `step_seconds`, or, with `gated=True`, each wait for a permit the test
    hands out with `allow(n)`; it fails on prompts that start with "fail"."""

    native_size = 16
    generation_defaults = {}

    def __init__(self, step_seconds: float = 0.0, gated: bool = False):
        self.step_seconds, self.gated = step_seconds, gated
        self.permits = threading.Semaphore(0)
        self.running = threading.Event()

    def sigmas(self, sampler: str, num_steps: int, sigma_schedule: str):
        return None

    def allow(self, steps: int) -> None:
        for _ in range(steps):
            self.permits.release()

    def generate(self, request: GenerationRequest, callback=None) -> TextToImageOutput:
        if request.prompt.startswith("fail"):
            raise RuntimeError("the fake pipeline fails on purpose")
        self.running.set()
        for i in range(request.num_steps):
            if self.gated:
                assert self.permits.acquire(timeout=WAIT), "the test handed out too few steps"
            time.sleep(self.step_seconds)
            callback(i, None, None)
        done = replace(request, height=request.height or 16, width=request.width or 16)
        return TextToImageOutput([Image.new("RGB", (done.width, done.height), (200, 10, 10))], done)


def wait_until(condition, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)
