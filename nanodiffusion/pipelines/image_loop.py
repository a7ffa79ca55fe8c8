"""The images of one request made one by one, as `nanodiffusion generate -n N` and the server make them:
image k with seed + k, on its own, so that each PNG replays alone with `generate --from`; each with the PNG
text that says how it was made.

The server also stops images part-way: a `StopImage` raised during a generation (by `progress`, or by a
check inside the networks that `stop_checks` installs) ends the image being made, which is then returned as
far as it got (its last denoised estimate, decoded) when the stop says to keep it.
"""

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from typing import NamedTuple

from PIL import Image

from nanodiffusion.images import to_pil
from nanodiffusion.pipelines.metadata import PARAMETERS_KEY, ModelRecord, png_text
from nanodiffusion.pipelines.request import GenerationRequest


class StopImage(Exception):
    """Raised during a generation to stop the image being made. `keep`: yield it as far as it got (marked
    interrupted) before going on up; `resume`: go on with the next image instead of going on up."""

    keep = True
    resume = False


class MadeImage(NamedTuple):
    """One image of `generate_each`."""

    image: Image.Image
    text: dict[str, str]                # the PNG text chunks (png_text)
    request: GenerationRequest          # as run: seed, height and width filled in
    interrupted: bool = False           # stopped: the last denoised estimate, decoded


def generate_each(pipe, request: GenerationRequest, num_images: int, model: ModelRecord, *,
                  progress: Callable | None = None, edits: Sequence | None = None,
                  stop_checks: Callable[[], AbstractContextManager] | None = None,
                  control_images: Sequence | None = None) -> Iterator[MadeImage]:
    """Yield image k = 0 .. num_images - 1: `request` with seed `request.seed + k`, run by `pipe` (a
    TextToImage). `progress(k, steps_done, denoised)` runs before image k (0 steps, denoised None) and after
    each of its sampler steps (denoised: the step's clean-latent estimate).

    img2img: image k starts from `edits[k % len(edits)]`, an object with `init` and `mask` (PIL images, the
    mask None for plain img2img) and `finish(image)`, what the result becomes (e.g. pasted over the
    original). `stop_checks()` is entered around each generation (the server's checks inside the networks).
    `control_images`: one per `request.controls`, when they are not read from the files the request names.
    """
    for k in range(num_images):
        edit = edits[k % len(edits)] if edits else None
        latest = []                                     # the last denoised estimate, for a stopped image

        def step(i, x, denoised, k=k, latest=latest):
            latest[:] = [denoised]
            if progress is not None:
                progress(k, i + 1, denoised)

        if progress is not None:
            progress(k, 0, None)
        image_request = replace(request, seed=request.seed + k)
        inputs = {} if edit is None else {"image": edit.init, "mask_image": edit.mask}
        if control_images is not None:
            inputs["control_image"] = list(control_images)
        try:
            with stop_checks() if stop_checks is not None else nullcontext():
                output = pipe.generate(image_request, callback=step, **inputs)
            image, done, stop = output.images[0], output.request, None
        except StopImage as error:
            if not error.keep or not latest or latest[0] is None:   # nothing to keep
                if error.resume:
                    continue
                raise
            image, done, stop = to_pil(pipe.decode_latents(latest[0]))[0], image_request, error
        text = png_text(done, model, img2img=edit is not None, lora_hashes=_lora_hashes(pipe))
        if stop is not None:
            text[PARAMETERS_KEY] += ", Interrupted: true"
        yield MadeImage(edit.finish(image) if edit is not None else image, text, done, stop is not None)
        if stop is not None and not stop.resume:
            raise stop


def _lora_hashes(pipe) -> dict[str, str]:
    """The LoRAs active in `pipe` now ({} for a pipeline without LoRAs: DDPM's, the server tests' fakes)."""
    return pipe.lora_hashes() if hasattr(pipe, "lora_hashes") else {}
