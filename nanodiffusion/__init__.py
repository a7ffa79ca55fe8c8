"""nanodiffusion: a compact, readable and fast diffusion image-synthesis toolkit."""

__version__ = "0.1.0"
