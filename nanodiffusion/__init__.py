"""nanodiffusion: a compact, readable and fast diffusion image-synthesis toolkit.

    from nanodiffusion import TextToImage
    pipe = TextToImage.from_pretrained("builtin")           # the text-to-image model shipped in the package
    pipe("a photo of a sneaker", seed=1).images[0].save("sneaker.png")

The names below are imported on first use (PEP 562), so that `import nanodiffusion` and `nanodiffusion --help`
do not load torch.
"""

import importlib

__version__ = "0.1.0"

EXPORTS = {                         # name -> the module that defines it
    "TextToImage": "nanodiffusion.pipelines.text_to_image",
    "GenerationRequest": "nanodiffusion.pipelines.request",
    "TextToImageOutput": "nanodiffusion.pipelines.request",
    "DDPMPipeline": "nanodiffusion.pipelines.ddpm",
    "load_sd": "nanodiffusion.weights",
    "image_grid": "nanodiffusion.images",
    "SAMPLERS": "nanodiffusion.diffusion.samplers",
    "get_sampler": "nanodiffusion.diffusion.samplers",
    "resolve_sampler": "nanodiffusion.diffusion.samplers",
    "UserError": "nanodiffusion.errors",
}
__all__ = ["__version__", *EXPORTS]


def __getattr__(name: str):
    if name not in EXPORTS:
        raise AttributeError(f"module 'nanodiffusion' has no attribute {name!r}")
    value = getattr(importlib.import_module(EXPORTS[name]), name)
    globals()[name] = value                         # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *EXPORTS})
