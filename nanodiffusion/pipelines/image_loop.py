"""The images of one request made one by one, as `nanodiffusion generate -n N` and the server make them:
image k with seed + k, on its own, so that each PNG replays alone with `generate --from`; each with the PNG
text that says how it was made.
"""

from collections.abc import Callable, Iterator
from dataclasses import replace

from PIL import Image

from nanodiffusion.pipelines.metadata import ModelRecord, png_text
from nanodiffusion.pipelines.request import GenerationRequest


def generate_each(pipe, request: GenerationRequest, num_images: int, model: ModelRecord, *,
                  progress: Callable | None = None) -> Iterator[tuple[Image.Image, dict, GenerationRequest]]:
    """Yield (image, PNG text, request as run) for k = 0 .. num_images - 1: `request` with seed `request.seed
    + k`, run by `pipe` (a TextToImage). `progress(k, steps_done, denoised)` runs before image k (0 steps,
    denoised None) and after each of its sampler steps (denoised: the step's clean-latent estimate)."""
    for k in range(num_images):
        def step(i, x, denoised, k=k):
            progress(k, i + 1, denoised)

        if progress is not None:
            progress(k, 0, None)
        output = pipe.generate(replace(request, seed=request.seed + k),
                               callback=step if progress is not None else None)
        done = output.request
        yield output.images[0], png_text(done, model), done
