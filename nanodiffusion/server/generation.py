"""What the worker does with one job: make its images one by one (image k with seed + k, alone, so that each
PNG replays by itself with `nanodiffusion generate --from`, as the `generate` command does), and encode each
as a PNG carrying the same metadata as `generate` writes.
"""

import io
from dataclasses import dataclass, replace
from pathlib import Path

from nanodiffusion.images import write_png
from nanodiffusion.pipelines.metadata import PARAMETERS_KEY, SETTINGS_KEY, a1111_parameters, settings_json
from nanodiffusion.server.jobs import GeneratedImage, Job


@dataclass(frozen=True)
class ServedModel:
    """The served model as the PNG metadata records it (see `nanodiffusion generate`)."""

    argument: str           # --model as given
    path: Path              # where it was loaded from
    hash: str | None        # A1111's "Model hash"
    dtype: str              # "fp32", "fp16" or "bf16"
    device: str             # device type: "cpu", "cuda"

    @property
    def name(self) -> str:
        """A1111's "Model": the file's stem or the folder's name."""
        return self.path.stem if self.path.is_file() else Path(self.argument).name


def run_job(pipe, model: ServedModel, job: Job) -> None:
    """Generate the job's images with `pipe` (a TextToImage), appending each to `job.images` when done."""
    for k in range(job.num_images):
        request = replace(job.request, seed=job.request.seed + k)
        job.step_done(k, 0)
        output = pipe.generate(request, callback=lambda i, x, denoised: job.step_done(k, i + 1))
        done = output.request
        text = {PARAMETERS_KEY: a1111_parameters(done, model.name, model.hash),
                SETTINGS_KEY: settings_json(done, model=model.argument, model_hash=model.hash,
                                            dtype=model.dtype, device=model.device)}
        job.images.append(GeneratedImage(png_bytes(output.images[0], text), done.seed,
                                         text[PARAMETERS_KEY], done))


def png_bytes(image, text: dict[str, str]) -> bytes:
    """`image` (PIL) as PNG file bytes with `text` as text chunks, as `images.save_png` writes them."""
    buffer = io.BytesIO()
    write_png(image, buffer, text)
    return buffer.getvalue()
