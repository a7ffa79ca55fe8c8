"""Multistep samplers: each step reuses denoiser outputs from earlier steps (LMS, PLMS, UniPC; DPM-Solver++
is in samplers_dpmpp).

Same conventions as samplers_onestep: x = x0 + sigma·eps, `model(x, sigma)` returns the clean estimate and
`callback(i, x, denoised)` runs after step i. UniPC, an exponential integrator, steps in lambda = -log sigma,
half the log signal-to-noise ratio (Lu et al. 2022).
"""

import math

import numpy as np
import torch

from nanodiffusion.diffusion.samplers_onestep import report_step, sigma_steps
from nanodiffusion.errors import UserError

# Adams-Bashforth weights for equal steps, newest value first (PLMS of Liu et al. 2022 uses all four)
ADAMS_BASHFORTH = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12),
                   4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def lms_coefficient(sigmas: list[float], i: int, j: int, order: int) -> float:
    """Return ∫ over [sigmas[i], sigmas[i+1]] of the Lagrange basis polynomial through sigmas[i-order+1..i]
    that is 1 at sigmas[i-j] (k-diffusion's `linear_multistep_coeff`).

    Gauss-Legendre with `order` nodes is exact for the basis, a polynomial of degree order - 1.
    """
    nodes, weights = np.polynomial.legendre.leggauss(order)
    a, b = sigmas[i], sigmas[i + 1]
    tau = (b - a) / 2 * nodes + (a + b) / 2
    basis = np.ones_like(tau)
    for k in range(order):
        if k != j:
            basis *= (tau - sigmas[i - k]) / (sigmas[i - j] - sigmas[i - k])
    return float((b - a) / 2 * (weights * basis).sum())


@torch.no_grad()
def sample_lms(model, x, sigmas, *, order=4, generator=None, callback=None):
    """Linear multistep in sigma on the probability-flow ODE (Karras et al. 2022, eq. 4; k-diffusion's K-LMS).

    The slopes of the last `order` steps are interpolated by a polynomial in sigma and integrated over the
    step, so unequal steps are handled exactly; the first steps use the slopes available.
    """
    sigma_list = [float(s) for s in sigmas]
    slopes = []
    for i in range(len(sigmas) - 1):
        sigma = sigma_list[i]
        denoised = model(x, sigma)
        slopes = (slopes + [(x - denoised) / sigma])[-order:]
        current_order = len(slopes)
        for j, slope in enumerate(reversed(slopes)):
            x = x + lms_coefficient(sigma_list, i, j, current_order) * slope
        report_step(callback, i, x, denoised)
    return x


def _eps_from_denoised(x, sigma, denoised):
    return (x - denoised) / sigma


def _v_from_denoised(x, sigma, denoised):
    # v = sqrt(ᾱ)·eps - sqrt(1-ᾱ)·x0 with sqrt(ᾱ) = 1/sqrt(1+sigma²) and eps = (x - x0)/sigma
    return (x / (1 + sigma**2) - denoised) * math.sqrt(1 + sigma**2) / sigma


def _eps_from_v(x, sigma, v):
    # eps = sqrt(ᾱ)·v + sqrt(1-ᾱ)·x_vp, with x_vp = x / sqrt(1+sigma²) (Salimans & Ho 2022, §4)
    return (v + sigma * x / math.sqrt(1 + sigma**2)) / math.sqrt(1 + sigma**2)


# What PLMS extrapolates, by the network's prediction type: (output from D, eps from output). x0-models
# extrapolate eps too (diffusers' PNDMScheduler takes none).
_EPS = (_eps_from_denoised, lambda x, sigma, eps: eps)
PLMS_OUTPUTS = {"epsilon": _EPS, "sample": _EPS, "v_prediction": (_v_from_denoised, _eps_from_v)}


@torch.no_grad()
def sample_plms(model, x, sigmas, *, generator=None, callback=None, prediction="epsilon"):
    """Pseudo linear multistep (PLMS, Liu et al. 2022, §3), as SD's PNDMScheduler(skip_prk_steps=True).

    Adams-Bashforth with equal-step weights on eps = dx/dsigma; the paper's transfer part is the DDIM step,
    which in x = x0 + sigma·eps is x + (sigma' - sigma)·eps. Instead of the paper's Runge-Kutta start, the
    first step is CompVis' pseudo improved Euler (a Heun step in eps); later steps use up to 4 past eps.
    `prediction="v_prediction"` extrapolates v instead, read as eps at the current x only after the
    combination: what diffusers' PNDMScheduler does with a v-model's raw outputs (not the same steps).
    """
    if prediction not in PLMS_OUTPUTS:
        raise UserError(f"unknown prediction {prediction!r}; valid: {', '.join(PLMS_OUTPUTS)}")
    output_of, eps_of = PLMS_OUTPUTS[prediction]
    history = []
    for i, sigma, sigma_next in sigma_steps(sigmas):
        denoised = model(x, sigma)
        output = output_of(x, sigma, denoised)
        history = (history + [output])[-4:]
        if i == 0 and len(sigmas) > 2:                   # no history yet: average with the slope at the end
            x_euler = x + eps_of(x, sigma, output) * (sigma_next - sigma)
            step = (output + output_of(x_euler, sigma_next, model(x_euler, sigma_next))) / 2
        else:
            weights = ADAMS_BASHFORTH[len(history)]
            step = sum(w * o for w, o in zip(weights, reversed(history)))
        x = x + eps_of(x, sigma, step) * (sigma_next - sigma)
        report_step(callback, i, x, denoised)
    return x


def _unipc_step(x, lambdas, denoised, lambda_next, order, variant, denoised_next=None):
    """One UniP step (denoised_next None) or UniC correction of order `order` from lambdas[-1] to lambda_next.

    `lambdas`, `denoised`: past -log sigma and D(x, sigma), oldest first, the newest at the step's start
    (Zhao et al. 2023, UniP and UniC in data prediction). UniC reuses D at the step's end, evaluated at the
    predicted point.
    """
    h = lambda_next - lambdas[-1]
    h_phi_1 = math.expm1(-h)
    b_h = h_phi_1 if variant == "bh2" else -h              # B(h): e^{-h} - 1 or -h, h taken in -lambda
    ratios = [(lambdas[-1 - k] - lambdas[-1]) / h for k in range(1, order)]       # r_k < 0: past points
    diffs = [(denoised[-1 - k] - denoised[-1]) / r for k, r in enumerate(ratios, 1)]
    # b_j = j!·(-h)·phi_{j+1}(-h)/B(h), with the exponential-integrator phi_{k+1}(z) = (phi_k(z) - 1/k!)/z
    b, phi, factorial = [], h_phi_1 / -h - 1, 1
    for j in range(1, order + 1):
        b.append(phi * factorial / b_h)
        factorial *= j + 1
        phi = phi / -h - 1 / factorial
    powers = torch.tensor([[r**j for r in ratios + [1.0]] for j in range(order)], dtype=torch.float64)
    b = torch.tensor(b, dtype=torch.float64)
    x_next = math.exp(-h) * x - h_phi_1 * denoised[-1]
    if denoised_next is None:
        # order 2 takes rho = 1/2 as the UniPC reference code does, higher orders solve the Vandermonde system
        rhos = [0.5] if order == 2 else torch.linalg.solve(powers[:-1, :-1], b[:-1]).tolist()
        return x_next - b_h * sum(rho * d for rho, d in zip(rhos, diffs))
    rhos = [0.5] if order == 1 else torch.linalg.solve(powers, b).tolist()
    correction = sum(rho * d for rho, d in zip(rhos[:-1], diffs)) + rhos[-1] * (denoised_next - denoised[-1])
    return x_next - b_h * correction


@torch.no_grad()
def sample_unipc(model, x, sigmas, *, order=2, variant="bh2", generator=None, callback=None):
    """UniPC (Zhao et al. 2023): a UniP-`order` predictor and the UniC corrector, reusing the next model call.

    Data prediction with B(h) = e^h - 1 ("bh2", diffusers' default for SD) or h ("bh1"); the order warms up
    from 1 and drops to 1 for the last step, as diffusers' UniPCMultistepScheduler(lower_order_final=True).
    """
    if variant not in ("bh1", "bh2"):
        raise UserError(f"unknown UniPC variant {variant!r}; valid: bh1, bh2")
    if order not in (1, 2, 3):
        raise UserError(f"UniPC order must be 1, 2 or 3, got {order!r}")
    n = len(sigmas) - 1
    lambdas, history, x_start, last_order = [], [], None, 0
    for i in range(n):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = model(x, sigma)
        if x_start is not None:                                    # UniC: correct x with the call just made
            x = _unipc_step(x_start, lambdas, history, -math.log(sigma), last_order, variant, denoised)
        lambdas, history = (lambdas + [-math.log(sigma)])[-order:], (history + [denoised])[-order:]
        last_order = min(order, i + 1, n - i)
        x_start = x
        if sigma_next == 0:
            x = denoised
        else:
            x = _unipc_step(x, lambdas, history, -math.log(sigma_next), last_order, variant)
        report_step(callback, i, x, denoised)
    return x
