"""Helpers of the server tests: a fake pipeline whose steps the test paces, the served model's record, and
small waits and decoders."""

import base64
import contextlib
import io
import os
import queue
import re
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from nanodiffusion.pipelines.metadata import ModelRecord
from nanodiffusion.pipelines.request import GenerationRequest, TextToImageOutput
from nanodiffusion.weights import SDComponents, save_diffusers
from fixtures import tiny_ours

MODEL = ModelRecord("tiny-sd", Path("tiny-sd"), "0123456789", "fp32", "cpu")
WAIT = 10.0                                               # seconds before a test gives up on an event
STARTUP_TIMEOUT = 90.0


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


def save_tiny_model(folder: Path, seed: int = 0) -> Path:
    """A tiny random model (fixtures.tiny_ours) written as a diffusers folder."""
    pipe = tiny_ours(seed)
    save_diffusers(SDComponents(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer,
                                pipe.scheduler_config), folder)
    return folder


@contextlib.contextmanager
def serve_process(*args: str):
    """`python -m nanodiffusion serve ARGS` on a free port of 127.0.0.1: yields (base URL, process) once it
    listens, and ends the process afterwards."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "nanodiffusion", "serve", "--host", "127.0.0.1", "--port", "0",
         "--device", "cpu", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    try:
        yield f"http://127.0.0.1:{_wait_for_port(process, lines)}", process
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def _wait_for_port(process, lines: queue.Queue) -> int:
    deadline, seen = time.monotonic() + STARTUP_TIMEOUT, []
    while time.monotonic() < deadline and process.poll() is None:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            continue
        seen.append(line)
        found = re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", line)
        if found:
            return int(found.group(1))
    pytest.fail("the server did not start:\n" + "".join(seen))
