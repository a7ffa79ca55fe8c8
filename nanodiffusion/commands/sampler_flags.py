"""The standard sampler-option flags of `generate` and `sample` (--eta, --s-noise, --s-churn, --s-tmin,
--s-tmax): k-diffusion's and A1111's noise options, each taken by the samplers that have the concept
(docs/samplers.md, "Options"); one the chosen sampler does not take is an error listing the ones it does.
"""

import argparse

from nanodiffusion.validation import finite_float

FLAGS = {
    "eta": "amount of fresh noise per step: ancestral and SDE samplers (default 1), DDIM's eta (0), "
           "TCD's gamma (0.3)",
    "s_noise": "multiplies every fresh noise draw (default 1)",
    "s_churn": "Karras et al.'s churn for euler, heun, dpm_2: extra noise per step (default 0: none)",
    "s_tmin": "churn only where sigma >= S_TMIN (default 0)",
    "s_tmax": "churn only where sigma <= S_TMAX (default: no bound)",
}


def add_sampler_option_flags(parser: argparse.ArgumentParser) -> None:
    """Add the flags; one not given stays unset (the sampler's default)."""
    for name, text in FLAGS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=finite_float,
                            default=argparse.SUPPRESS,
                            metavar=name.upper(), help=text)


def sampler_option_flags(args: argparse.Namespace) -> dict[str, float]:
    """The sampler options given as flags, e.g. {"eta": 0.5}."""
    return {name: getattr(args, name) for name in FLAGS if hasattr(args, name)}
