"""Restart sampling (Xu et al. 2023), as A1111 runs it: Heun steps down the grid and, once a low noise level
is reached, jumps back up with fresh noise and walks down again, so that the added noise contracts the
errors accumulated so far (the paper's §3: the forward noise shrinks them, the ODE steps keep them small).
"""

import math

import torch

from nanodiffusion.diffusion.sampler_noise import add_noise, noise_source
from nanodiffusion.diffusion.samplers_onestep import heun_step, report_step
from nanodiffusion.diffusion.schedules import get_sigmas_karras

RESTART_MIN_STEPS = 20          # A1111 restarts from 20 steps on; below, Restart is Heun on the grid
RESTART_FROM, RESTART_TO = 0.1, 2.0     # restart from the grid's sigma nearest 0.1 back up to its nearest 2


def restart_segments(sigmas: torch.Tensor) -> list[tuple[float, float]]:
    """The (sigma, sigma_next) steps of A1111's default Restart plan for a grid of n = len(sigmas) - 1 steps.

    From 20 steps: K restarts of R steps (R = 9, K = 1; from 36 steps R = n // 4, K = 2) replace as many
    steps of the main walk, which becomes a Karras grid of n - R·K steps between sigmas[0] and sigmas[-2];
    after the step that reaches its sigma nearest 0.1 come K walks of R Karras steps from its sigma nearest 2.
    """
    n = len(sigmas) - 1
    if n < RESTART_MIN_STEPS:
        return [(float(sigmas[i]), float(sigmas[i + 1])) for i in range(n)]
    restart_steps, restart_times = (9, 1) if n < 36 else (n // 4, 2)
    grid = get_sigmas_karras(n - restart_steps * restart_times, float(sigmas[-2]), float(sigmas[0]))
    low = int((grid - RESTART_FROM).abs().argmin())
    high = int((grid - RESTART_TO).abs().argmin())
    restart = get_sigmas_karras(restart_steps + 1, float(grid[low]), float(grid[high]))[:-1].tolist()
    segments = []
    for i in range(len(grid) - 1):
        segments.append((float(grid[i]), float(grid[i + 1])))
        if i + 1 == low and high < low:
            segments += list(zip(restart[:-1], restart[1:])) * restart_times
    return segments


@torch.no_grad()
def sample_restart(model, x, sigmas, *, s_noise=1.0, noise_sampler=None, generator=None, callback=None):
    """Restart sampling (Xu et al. 2023, Algorithm 1) on A1111's plan (`restart_segments`): Heun steps, and
    before a step that starts above where the last one ended, fresh noise of std
    sqrt(sigma² - sigma_last²)·s_noise."""
    noise = noise_source(x, generator, noise_sampler)
    sigma_last = None
    for i, (sigma, sigma_next) in enumerate(restart_segments(sigmas)):
        if sigma_last is not None and sigma > sigma_last:
            x = add_noise(x, noise, sigma_last, sigma, s_noise * math.sqrt(sigma**2 - sigma_last**2))
        x, denoised = heun_step(model, x, sigma, sigma_next)
        report_step(callback, i, x, denoised)
        sigma_last = sigma_next
    return x
