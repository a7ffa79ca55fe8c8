"""Noise schedules: discrete betas / alphas_cumprod, their sigmas, and the sigma grids that samplers walk.

A variance-preserving schedule with cumulative product ᾱ_t corresponds to the noise level
sigma_t = sqrt((1 - ᾱ_t) / ᾱ_t) of the equivalent variance-exploding process x = x0 + sigma·eps
(Karras et al. 2022, Table 1). Schedules are computed in float64: ᾱ_t near 1 loses digits in float32.
"""

import math
from dataclasses import dataclass

import torch

from nanodiffusion.config import JSONConfig
from nanodiffusion.errors import UserError

SCHEDULE_DEFAULTS = {                   # kind -> (beta_start, beta_end)
    "linear": (1e-4, 0.02),             # Ho et al. 2020, and the classic DDPM tutorial
    "scaled_linear": (0.00085, 0.012),  # Stable Diffusion v1.x: linear in sqrt(beta)
    "cosine": (None, None),             # Nichol & Dhariwal 2021, eq. 17 (no betas to set)
}


@dataclass(frozen=True)
class ScheduleConfig(JSONConfig):
    """A discrete noise schedule: `kind` in SCHEDULE_DEFAULTS, T steps; betas default per kind."""

    kind: str = "linear"
    num_timesteps: int = 1000
    beta_start: float | None = None
    beta_end: float | None = None

    def __post_init__(self):
        if self.kind not in SCHEDULE_DEFAULTS:
            raise UserError(f"unknown noise schedule {self.kind!r}; valid: {', '.join(SCHEDULE_DEFAULTS)}")
        if self.num_timesteps < 2:
            raise UserError(f"num_timesteps must be at least 2, got {self.num_timesteps}")
        start, end = self.betas_range
        if start is not None and not 0 < start < end < 1:
            raise UserError(f"betas must satisfy 0 < beta_start < beta_end < 1, got {start} and {end}")

    @property
    def betas_range(self) -> tuple[float | None, float | None]:
        default_start, default_end = SCHEDULE_DEFAULTS[self.kind]
        start = default_start if self.beta_start is None else self.beta_start
        end = default_end if self.beta_end is None else self.beta_end
        return start, end


def get_betas(config: ScheduleConfig) -> torch.Tensor:
    """Return the (T,) float64 betas of the schedule."""
    T = config.num_timesteps
    start, end = config.betas_range
    if config.kind == "linear":
        return torch.linspace(start, end, T, dtype=torch.float64)
    if config.kind == "scaled_linear":
        return torch.linspace(start**0.5, end**0.5, T, dtype=torch.float64) ** 2
    # cosine: ᾱ(t) = f(t)/f(0), f(t) = cos²((t/T + s)/(1 + s)·π/2), betas clipped at 0.999 (Nichol & Dhariwal, §3.2)
    s = 0.008
    steps = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=0.999)


def get_alphas_cumprod(config: ScheduleConfig) -> torch.Tensor:
    """Return ᾱ_t = prod_{s<=t} (1 - beta_s), shape (T,), float64."""
    return torch.cumprod(1 - get_betas(config), dim=0)


def alphas_cumprod_to_sigmas(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Return sigma_t = sqrt((1 - ᾱ_t) / ᾱ_t): the noise level of the equivalent VE process."""
    return ((1 - alphas_cumprod) / alphas_cumprod).sqrt()


def sigma_to_alpha_cumprod(sigma: torch.Tensor) -> torch.Tensor:
    """Return ᾱ = 1 / (1 + sigma²), the inverse of `alphas_cumprod_to_sigmas`."""
    return 1 / (1 + sigma**2)


def sigma_to_t(sigma: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Return the (fractional) timestep of each sigma by interpolating linearly in log-sigma.

    `sigmas` is the increasing (T,) discrete table; sigmas outside its range are clamped to t in [0, T-1].
    """
    log_table = sigmas.double().log()
    log_sigma = torch.as_tensor(sigma, dtype=torch.float64, device=sigmas.device).log()
    high = torch.searchsorted(log_table, log_sigma).clamp(1, len(log_table) - 1)
    low = high - 1
    w = (log_sigma - log_table[low]) / (log_table[high] - log_table[low])
    return (low + w.clamp(0, 1)).to(torch.float32)


def t_to_sigma(t: torch.Tensor, sigmas: torch.Tensor, interpolation: str = "log") -> torch.Tensor:
    """Return sigma at (fractional) timesteps t, interpolating the discrete table in log-sigma.

    interpolation="linear" interpolates sigma itself, as diffusers' k-schedulers (Euler, Heun, LMS...) do.
    """
    if interpolation not in ("log", "linear"):
        raise UserError(f"unknown sigma interpolation {interpolation!r}; valid: log, linear")
    t = torch.as_tensor(t, dtype=torch.float64, device=sigmas.device)
    low = t.floor().long().clamp(0, len(sigmas) - 1)
    high = (low + 1).clamp(max=len(sigmas) - 1)
    w = t - low
    if interpolation == "linear":
        table = sigmas.double()
        return (1 - w) * table[low] + w * table[high]
    log_table = sigmas.double().log()
    return ((1 - w) * log_table[low] + w * log_table[high]).exp()


def get_timesteps(num_steps: int, num_timesteps: int, spacing: str = "leading",
                  steps_offset: int = 0) -> torch.Tensor:
    """Return `num_steps` decreasing timesteps in [0, T-1] spaced as diffusers' `timestep_spacing` does.

    "leading" (SD v1.x with steps_offset=1), "trailing" (Lin et al. 2023, Table 2) or "linspace" (fractional).
    """
    check_num_steps(num_steps, num_timesteps)
    T = num_timesteps
    if spacing == "leading":
        ratio = T // num_steps
        t = torch.arange(num_steps, dtype=torch.float64) * ratio + steps_offset
    elif spacing == "trailing":
        # diffusers' np.arange(T, 0, -T/n) is T + i·delta with numpy's rounded delta; it sometimes yields an
        # (n+1)-th, negative timestep (n = 61, 103, ...), which we leave out
        delta = (T - T / num_steps) - T
        t = (torch.round(T + torch.arange(num_steps, dtype=torch.float64) * delta) - 1).flip(0)
    elif spacing == "linspace":
        # as np.linspace computes it (i·step, exact end), so that rounding at .5 agrees with diffusers
        t = torch.arange(num_steps, dtype=torch.float64) * ((T - 1) / max(num_steps - 1, 1))
        t[-1] = T - 1 if num_steps > 1 else 0
    else:
        raise UserError(f"unknown timestep spacing {spacing!r}; valid: leading, trailing, linspace")
    return t.flip(0)


def check_num_steps(num_steps: int, num_timesteps: int | None = None) -> None:
    """Raise a UserError unless 1 <= num_steps (<= num_timesteps when given)."""
    if not isinstance(num_steps, int) or num_steps < 1:
        raise UserError(f"the number of steps must be an integer >= 1, got {num_steps!r}")
    if num_timesteps is not None and num_steps > num_timesteps:
        raise UserError(f"the number of steps ({num_steps}) exceeds the schedule's {num_timesteps} timesteps")


def append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def get_sigmas_from_timesteps(timesteps: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Return the sigmas of decreasing timesteps followed by a final 0, for samplers."""
    return append_zero(t_to_sigma(timesteps, sigmas))


def get_sigmas_karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0,
                      dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Return n sigmas from sigma_max to sigma_min evenly spaced in sigma^(1/rho), then 0 (Karras eq. 5)."""
    check_num_steps(n)
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return append_zero((hi + ramp * (lo - hi)) ** rho).to(dtype)


def get_sigmas_exponential(n: int, sigma_min: float, sigma_max: float,
                           dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Return n sigmas from sigma_max to sigma_min evenly spaced in log-sigma, then 0."""
    check_num_steps(n)
    log_sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64)
    return append_zero(log_sigmas.exp()).to(dtype)


# --- A1111's sigma schedules (its modules/sd_schedulers.py), each a function of the (T,) increasing table ---

def get_sigmas_normal(n: int, sigmas: torch.Tensor, sgm: bool = False) -> torch.Tensor:
    """n sigmas at timesteps evenly spaced from T-1 down to 0, read from the table in log-sigma, then 0.

    A1111's "Normal" and "Uniform" (k-diffusion's `get_sigmas(n)`); sgm=True spaces n + 1 timesteps and
    leaves out t = 0, as Stability's SGM code (A1111's "SGM Uniform").
    """
    check_num_steps(n)
    t = torch.linspace(len(sigmas) - 1, 0, n + 1 if sgm else n, dtype=torch.float64)
    return append_zero(t_to_sigma(t[:n], sigmas))


def get_sigmas_simple(n: int, sigmas: torch.Tensor) -> torch.Tensor:
    """n table sigmas every T/n timesteps from the top, the index truncated to an integer, then 0 (A1111's and
    ComfyUI's "Simple")."""
    check_num_steps(n, len(sigmas))
    stride = len(sigmas) / n
    return append_zero(sigmas.double()[[len(sigmas) - 1 - int(i * stride) for i in range(n)]])


def get_sigmas_ddim_uniform(n: int, sigmas: torch.Tensor) -> torch.Tensor:
    """Table sigmas at DDIM's timesteps 1 + k·(T // n), k < n, highest first, then 0 (A1111's "DDIM",
    ComfyUI's "ddim_uniform"). Both keep adding timesteps below T: when n does not divide T, more steps."""
    check_num_steps(n)
    if n >= len(sigmas):
        raise UserError(f"the DDIM schedule takes at most {len(sigmas) - 1} steps, got {n}")
    t = get_timesteps(n, len(sigmas), "leading", steps_offset=1).long()
    return append_zero(sigmas.double()[t])


def get_sigmas_beta(n: int, sigma_min: float, sigma_max: float, alpha: float = 0.6,
                    beta: float = 0.6) -> torch.Tensor:
    """Sigmas at the Beta(alpha, beta) quantiles of 1 - i/(n-1), mapped linearly onto [sigma_min, sigma_max],
    then 0 (Lee et al. 2024, "Beta Sampling is All You Need"; A1111's "Beta" and its defaults 0.6, 0.6)."""
    check_num_steps(n)
    levels = 1 - torch.linspace(0, 1, n, dtype=torch.float64)
    quantiles = torch.tensor([beta_quantile(float(p), alpha, beta) for p in levels], dtype=torch.float64)
    return append_zero(sigma_min + quantiles * (sigma_max - sigma_min))


# Align Your Steps' 10-step schedule for SD v1.5 (Sabour et al. 2024; NVIDIA's AYS how-to page)
AYS_SD15_SIGMAS = (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029)


def get_sigmas_align_your_steps(n: int) -> torch.Tensor:
    """The 11 published SD v1.5 sigmas of Align Your Steps interpolated log-linearly to n points, then 0.

    A1111's rule: n = 11 steps walks them as published (their 10 steps, then one more from 0.029 to 0).
    """
    check_num_steps(n)
    published = torch.tensor(AYS_SD15_SIGMAS, dtype=torch.float64)
    position = torch.linspace(0, len(published) - 1, n, dtype=torch.float64)
    return append_zero(t_to_sigma(position, published))


def beta_quantile(p: float, alpha: float, beta: float) -> float:
    """The x in [0, 1] with I_x(alpha, beta) = p, the Beta distribution's quantile, by bisection to 1e-15."""
    if not 0 < p < 1:
        return float(p >= 1)
    low, high = 0.0, 1.0
    while high - low > 1e-15:
        middle = (low + high) / 2
        low, high = (middle, high) if _regularized_beta(middle, alpha, beta) < p else (low, middle)
    return (low + high) / 2


def _regularized_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b), the Beta(a, b) CDF, from its continued fraction (Abramowitz & Stegun 26.5.8) by Lentz's
    method; the fraction converges fast below the mean, so above it we use I_x(a, b) = 1 - I_{1-x}(b, a)."""
    if x <= 0 or x >= 1:
        return float(x >= 1)
    if x > (a + 1) / (a + b + 2):
        return 1 - _regularized_beta(1 - x, b, a)
    log_front = a * math.log(x) + b * math.log1p(-x) + math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    tiny, f, c, d = 1e-300, 1.0, 1.0, 0.0
    for i in range(1, 500):                    # f = 1 + d_1/(1 + d_2/(1 + ...)), with A&S's d_i
        m = i // 2
        if i % 2:
            coefficient = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        else:
            coefficient = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        d = 1 / (1 + coefficient * d if abs(1 + coefficient * d) > tiny else tiny)
        c = 1 + coefficient / c if abs(1 + coefficient / c) > tiny else tiny
        f *= c * d
        if abs(c * d - 1) < 1e-16:
            break
    return math.exp(log_front) / (a * f)
