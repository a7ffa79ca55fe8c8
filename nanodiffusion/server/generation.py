"""What the worker does with one job: make its images one by one (image k with seed + k, alone, so that each
PNG replays by itself with `nanodiffusion generate --from`, as the `generate` command does), and encode each
as a PNG carrying the same metadata as `generate` writes.

While it samples, the worker decodes the current denoised estimate now and then as a preview, within a time
budget; a stop request is checked before every layer of the networks (`interrupt.checked`), and an
interrupted or skipped image comes back as its last denoised estimate, decoded.
"""

import io
import time
from dataclasses import dataclass, replace
from pathlib import Path

from nanodiffusion.images import to_pil, write_png
from nanodiffusion.pipelines.metadata import PARAMETERS_KEY, SETTINGS_KEY, a1111_parameters, settings_json
from nanodiffusion.pipelines.scheduling import resolve_sampler
from nanodiffusion.server.interrupt import checked
from nanodiffusion.server.jobs import CANCEL, SKIP, GeneratedImage, Job, Stopped

PREVIEW_BUDGET = 0.05           # previews may take this fraction of the sampling time
PREVIEW_SIZE = 256              # previews are PNGs of at most this many pixels along a side
# Larger latents are decoded in tiles of this many latent pixels: a whole SD decode at 2048x2048 holds several
# 2 GB feature maps, which must not take the server down; the PNG records the tiling, so it still replays.
VAE_TILE = 128


@dataclass(frozen=True)
class ServedModel:
    """The served model as the PNG metadata records it (see `nanodiffusion generate`)."""

    argument: str           # --model as given, or the name in --models-dir
    path: Path              # where it was loaded from
    hash: str | None        # A1111's "Model hash"
    dtype: str              # "fp32", "fp16" or "bf16"
    device: str             # device type: "cpu", "cuda"

    @property
    def name(self) -> str:
        """A1111's "Model": the file's stem or the folder's name."""
        return self.path.stem if self.path.is_file() else Path(self.argument).name


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


def run_job(pipe, model: ServedModel, job: Job, previews: Previews | None = None) -> None:
    """Generate the job's images with `pipe` (a TextToImage), appending each to `job.images` when done."""
    previews = previews or Previews(0.0)
    for k in range(job.num_images):
        request = replace(job.request, seed=job.request.seed + k)
        edit = job.inputs[k % len(job.inputs)] if job.inputs else None
        latest = []                                     # the last denoised estimate, for a stopped image

        def callback(i, x, denoised, k=k, latest=latest):
            latest[:] = [denoised]
            job.step_done(k, i + 1)
            if previews.due() and denoised is not None:
                started = time.perf_counter()
                job.preview = (i + 1, _preview_png(pipe, denoised, edit))
                previews.spend(time.perf_counter() - started)

        job.step_done(k, 0)
        tile = _vae_tile(pipe, request)
        if hasattr(pipe, "vae_tile_size"):
            pipe.vae_tile_size = tile
        previews.start()
        try:
            with checked(_networks(pipe), job.check_stop):
                output = pipe.generate(request, callback=callback, **_edit_arguments(edit))
            image, done, stopped = output.images[0], output.request, None
        except Stopped as stop:
            if stop.kind == CANCEL:
                raise
            if not latest or latest[0] is None:         # stopped before its first step: nothing to show
                if stop.kind != SKIP:
                    raise
                job.clear_skip()
                continue
            image, done, stopped = to_pil(pipe.decode_latents(latest[0]))[0], request, stop
        image = edit.finish(image) if edit else image
        job.images.append(_encode(model, image, done, stopped is not None, tile))
        job.preview = None
        if stopped is not None and stopped.kind != SKIP:
            raise stopped
        job.clear_skip()


def _vae_tile(pipe, request) -> int | None:
    """VAE_TILE for latents larger than it, else None (a whole decode)."""
    factor = getattr(pipe, "vae_factor", None)
    return VAE_TILE if factor and max(request.height, request.width) // factor > VAE_TILE else None


def _networks(pipe) -> list:
    return [getattr(pipe, name) for name in ("unet", "vae", "text_encoder") if hasattr(pipe, name)]


def _edit_arguments(edit) -> dict:
    if edit is None:
        return {}
    return {"image": edit.init, **({"mask_image": edit.mask} if edit.mask is not None else {})}


def _preview_png(pipe, denoised, edit) -> bytes:
    """The decoded denoised estimate as a small PNG (pasted back over the original when inpainting)."""
    image = to_pil(pipe.decode_latents(denoised))[0]
    if edit is not None:
        image = edit.finish(image)
    image.thumbnail((PREVIEW_SIZE, PREVIEW_SIZE))
    return png_bytes(image, {})


def _encode(model: ServedModel, image, done, partial: bool, vae_tile: int | None) -> GeneratedImage:
    """The PNG with `generate`'s metadata (a partial image says that it is one)."""
    parameters = a1111_parameters(done, resolve_sampler(done.sampler), model.name, model.hash)
    text = {PARAMETERS_KEY: parameters + (", Interrupted: true" if partial else ""),
            SETTINGS_KEY: settings_json(done, model=model.argument, model_hash=model.hash,
                                        dtype=model.dtype, device=model.device, vae_tile=vae_tile)}
    return GeneratedImage(png_bytes(image, text), done.seed, text[PARAMETERS_KEY], done, partial)


def png_bytes(image, text: dict[str, str]) -> bytes:
    """`image` (PIL) as PNG file bytes with `text` as text chunks, as `images.save_png` writes them."""
    buffer = io.BytesIO()
    write_png(image, buffer, text)
    return buffer.getvalue()
