"""What the worker does with one job: make its images one by one, as the `generate` command does
(pipelines/image_loop.py), and encode each as a PNG carrying the same metadata as `generate` writes.
"""

import io

from nanodiffusion.images import write_png
from nanodiffusion.pipelines.image_loop import generate_each
from nanodiffusion.pipelines.metadata import PARAMETERS_KEY, ModelRecord
from nanodiffusion.server.jobs import GeneratedImage, Job


def run_job(pipe, model: ModelRecord, job: Job) -> None:
    """Generate the job's images with `pipe` (a TextToImage), appending each to `job.images` when done."""
    images = generate_each(pipe, job.request, job.num_images, model,
                           progress=lambda k, step, denoised: job.step_done(k, step))
    for image, text, done in images:
        job.images.append(GeneratedImage(png_bytes(image, text), done.seed, text[PARAMETERS_KEY], done))


def png_bytes(image, text: dict[str, str]) -> bytes:
    """`image` (PIL) as PNG file bytes with `text` as text chunks, as `images.save_png` writes them."""
    buffer = io.BytesIO()
    write_png(image, buffer, text)
    return buffer.getvalue()
