"""What the worker does with one job: make its images one by one, as the `generate` command does
(pipelines/image_loop.py: image k with seed + k, alone, so that each PNG replays by itself with `nanodiffusion
generate --from`), and encode each as a PNG carrying the same metadata as `generate` writes.

While it samples, the worker decodes the current denoised estimate now and then as a preview, within a time
budget; a stop request is checked before every layer of the networks (`interrupt.checked`), and an
interrupted or skipped image comes back as its last denoised estimate, decoded.
"""

import io
import time
from contextlib import contextmanager
from dataclasses import replace

from nanodiffusion.images import to_pil, write_png
from nanodiffusion.pipelines.image_loop import generate_each
from nanodiffusion.pipelines.metadata import PARAMETERS_KEY, ModelRecord
from nanodiffusion.server.interrupt import checked
from nanodiffusion.server.jobs import GeneratedImage, Job

PREVIEW_BUDGET = 0.05           # previews may take this fraction of the sampling time
PREVIEW_SIZE = 256              # previews are PNGs of at most this many pixels along a side
# Larger latents are decoded in tiles of this many latent pixels: a whole SD decode at 2048x2048 holds several
# 2 GB feature maps, which must not take the server down; the PNG records the tiling, so it still replays.
VAE_TILE = 128


class Previews:
    """Decides when a preview is due: when the decodes so far plus one more stay within `budget` of the
    sampling time. The cost of a decode is remembered from the last one (across jobs)."""

    def __init__(self, budget: float = PREVIEW_BUDGET):
        self.budget, self.decode_seconds = budget, 0.0

    def start(self) -> None:
        self.started, self.spent = time.perf_counter(), 0.0

    def due(self) -> bool:
        elapsed = time.perf_counter() - self.started
        return self.budget > 0 and self.spent + self.decode_seconds <= self.budget * (elapsed - self.spent)

    def spend(self, seconds: float) -> None:
        self.decode_seconds, self.spent = seconds, self.spent + seconds


def run_job(pipe, model: ModelRecord, job: Job, previews: Previews | None = None) -> None:
    """Generate the job's images with `pipe` (a TextToImage) through the one per-image loop
    (pipelines/image_loop.py), appending each to `job.images` when done."""
    previews = previews or Previews(0.0)
    edits = job.inputs or None

    def progress(k: int, steps_done: int, denoised) -> None:
        if steps_done == 0:
            job.clear_skip()                            # a skip ends the image being made, not the next one
            previews.start()
        job.step_done(k, steps_done)
        if denoised is not None and previews.due():
            started = time.perf_counter()
            job.preview = (steps_done, _preview_png(pipe, denoised, edits[k % len(edits)] if edits else None))
            previews.spend(time.perf_counter() - started)

    tile = _vae_tile(pipe, job.request)
    if hasattr(pipe, "vae_tile_size"):
        pipe.vae_tile_size = tile
    made = generate_each(pipe, job.request, job.num_images, replace(model, vae_tile=tile), progress=progress,
                         edits=edits, stop_checks=lambda: checked(_networks(pipe), job.check_stop),
                         control_images=[control.image for control in job.controls] or None)
    with job_controlnets(pipe, job.controls):
        for image, text, done, interrupted in made:
            job.images.append(GeneratedImage(png_bytes(image, text), done.seed, text[PARAMETERS_KEY], done,
                                             interrupted))
            job.preview = None
            job.clear_skip()


@contextmanager
def job_controlnets(pipe, controls):
    """The job's ControlNets (server/controlnets.ControlInput) attached to `pipe` while the job runs."""
    for control in controls:
        settings = control.settings
        pipe.load_controlnet(control.network, name=settings.model, digest=settings.model_hash)
    try:
        yield
    finally:
        if controls:
            pipe.controlnets.clear()


def _vae_tile(pipe, request) -> int | None:
    """VAE_TILE for latents larger than it, else None (a whole decode)."""
    factor = getattr(pipe, "vae_factor", None)
    return VAE_TILE if factor and max(request.height, request.width) // factor > VAE_TILE else None


def _networks(pipe) -> list:
    networks = [getattr(pipe, name) for name in ("unet", "vae", "text_encoder") if hasattr(pipe, name)]
    return networks + [attached.network for attached in getattr(pipe, "controlnets", {}).values()]


def _preview_png(pipe, denoised, edit) -> bytes:
    """The decoded denoised estimate as a small PNG (pasted back over the original when inpainting)."""
    image = to_pil(pipe.decode_latents(denoised))[0]
    if edit is not None:
        image = edit.finish(image)
    image.thumbnail((PREVIEW_SIZE, PREVIEW_SIZE))
    return png_bytes(image, {})


def png_bytes(image, text: dict[str, str]) -> bytes:
    """`image` (PIL) as PNG file bytes with `text` as text chunks, as `images.save_png` writes them."""
    buffer = io.BytesIO()
    write_png(image, buffer, text)
    return buffer.getvalue()
