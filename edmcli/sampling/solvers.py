"""ODE/SDE solvers for sampling a denoiser in the sigma parameterisation.

Every model of the project is a denoiser D(x; sigma) of x = y + sigma n (the preconditionings of
:mod:`edmcli.models.preconditioning`; the DDPM model of :mod:`edmcli.models.ddpm` through
x = x_t / sqrt(abar_t), sigma = sqrt((1 - abar) / abar)). The probability-flow ODE is then

    dx / dsigma = (x - D(x; sigma)) / sigma,

and every solver here is a small pure function

    solver(denoise, x, sigmas, *, noise=None, **options) -> x_0

* ``denoise(x, sigma) -> D(x; sigma)`` takes ``sigma`` as a 0-dim tensor on x's device;
* ``x`` is x_T already scaled by the caller (sigma_0 z for the continuous models;
  sqrt(1 + sigma_0^2) z reproduces the textbook DDPM start x_T = z exactly);
* ``sigmas`` is a schedule of :mod:`edmcli.sampling.schedules` (levels descending, final 0);
* ``noise(i)`` returns fresh standard Gaussian noise shaped like x for the stochastic part of
  step i (the caller builds it from per-sample generators so that results do not depend on the
  batch composition); default :func:`torch.randn_like`.

The schedule is moved to x's device once and every per-step coefficient is a Python float
computed from the float64 CPU schedule before the loop, so the loop itself causes no host-device
synchronisation: it only launches kernels. Solvers do not switch autograd off; call them under
:func:`torch.inference_mode` (or ``no_grad``) when sampling.

| solver | method | NFE for N steps |
|---|---|---|
| ``euler`` | explicit Euler | N |
| ``heun`` | EDM Algorithm 2: Heun, optional churn; last step (to 0) Euler | 2N - 1 |
| ``dpmpp_2m`` | DPM-Solver++(2M) in log-sigma; first and last step first order | N |
| ``dpmpp_3m`` | DPM-Solver++(3M) in log-sigma; orders 1, 2, then 3; last step first order | N |
| ``consistency`` | a consistency student: one jump to x_0 per level, fresh noise between | N |
| ``ddim`` | DDIM, eta = 0 deterministic (= Euler in sigma form) | N |
| ``ddpm_ancestral`` | DDPM ancestral step: posterior mean, variance beta~, beta or learned | N |

The Heun correction evaluates the network at the Euler prediction (x', sigma_{i+1}); the
authors' code evaluates it at the old point (docs/reference.md), which costs a full order of
accuracy.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import torch

from edmcli.sampling.schedules import check_sigmas

__all__ = [
    "SOLVERS",
    "consistency",
    "VARIANCES",
    "Denoise",
    "Noise",
    "Solver",
    "ddim",
    "ddpm_ancestral",
    "dpmpp_2m",
    "dpmpp_3m",
    "euler",
    "heun",
    "nfe_cost",
]

Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Noise = Callable[[int], torch.Tensor]
Solver = Callable[..., torch.Tensor]


def _setup(
    x: torch.Tensor, sigmas: torch.Tensor, noise: Noise | None
) -> tuple[list[float], torch.Tensor, Noise]:
    """Host floats of the schedule, the schedule on x's device, and the noise source."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError("x must be a floating-point tensor (x_T scaled by the first sigma).")
    host = check_sigmas(sigmas)
    dtype = torch.promote_types(x.dtype, torch.float32)
    device_sigmas = host.to(device=x.device, dtype=dtype)

    def draw(i: int) -> torch.Tensor:
        z = torch.randn_like(x) if noise is None else noise(i)
        if z.shape != x.shape:
            raise ValueError(
                f"noise({i}) must have the shape of x {tuple(x.shape)}, got {tuple(z.shape)}."
            )
        return z.to(device=x.device, dtype=x.dtype)

    return host.tolist(), device_sigmas, draw


def euler(
    denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor, *, noise: Noise | None = None
) -> torch.Tensor:
    """Explicit Euler on the probability-flow ODE (first order, N NFE); ``noise`` is unused.

    One step: x' = D + (sigma'/sigma)(x - D), i.e. x + (sigma' - sigma) (x - D) / sigma.
    """
    s, s_dev, _ = _setup(x, sigmas, noise)
    for i in range(len(s) - 1):
        denoised = denoise(x, s_dev[i])
        x = denoised + (s[i + 1] / s[i]) * (x - denoised)
    return x


def heun(
    denoise: Denoise,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise: Noise | None = None,
    s_churn: float = 0.0,
    s_min: float = 0.0,
    s_max: float = math.inf,
    s_noise: float = 1.0,
    round_sigma: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """EDM's Algorithm 2: Heun's second-order method with optional stochastic churn.

    Step i (N steps): with gamma_i = min(s_churn / N, sqrt(2) - 1) where
    ``s_min <= sigma_i <= s_max`` (else 0), raise the noise to sigma_hat = sigma_i (1 + gamma_i)
    by adding sqrt(sigma_hat^2 - sigma_i^2) ``s_noise`` z, take an Euler step to sigma_{i+1} and,
    unless sigma_{i+1} = 0, correct it with the slope at the Euler prediction (x', sigma_{i+1}).
    NFE = 2N - 1. ``s_churn = 0`` (the default) is deterministic and never calls ``noise``.
    ``round_sigma`` snaps the raised levels sigma_hat to the model's representable ones (the
    schedule itself is snapped by :mod:`edmcli.sampling.schedules`).
    """
    if s_churn < 0 or s_noise < 0 or s_min < 0 or s_max < s_min:
        raise ValueError(
            f"heun needs s_churn >= 0, s_noise >= 0 and 0 <= s_min <= s_max, got {s_churn}, "
            f"{s_noise}, {s_min}, {s_max}."
        )
    s, s_dev, draw = _setup(x, sigmas, noise)
    n = len(s) - 1
    gammas = [
        min(s_churn / n, math.sqrt(2) - 1) if s_min <= s[i] <= s_max else 0.0 for i in range(n)
    ]
    hat = torch.tensor([s[i] * (1 + g) for i, g in enumerate(gammas)], dtype=torch.float64)
    if round_sigma is not None and s_churn > 0:
        hat = torch.as_tensor(round_sigma(hat)).detach().to("cpu", torch.float64).reshape(n)
    hat_dev = hat.to(device=s_dev.device, dtype=s_dev.dtype)
    s_hat = hat.tolist()
    for i in range(n):
        if s_hat[i] > s[i]:
            x = x + (math.sqrt(s_hat[i] ** 2 - s[i] ** 2) * s_noise) * draw(i)
        h = s[i + 1] - s_hat[i]
        d = (x - denoise(x, hat_dev[i])) * (1 / s_hat[i])
        x_next = x + h * d
        if s[i + 1] > 0:
            d_next = (x_next - denoise(x_next, s_dev[i + 1])) * (1 / s[i + 1])
            x_next = x + (0.5 * h) * (d + d_next)
        x = x_next
    return x


def dpmpp_2m(
    denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor, *, noise: Noise | None = None
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022) in the sigma / log-sigma form; N NFE.

    With lambda = -log sigma and h_i = lambda_{i+1} - lambda_i, each step is the exponential
    integrator x' = (sigma'/sigma) x + (1 - sigma'/sigma) D_hat, where D_hat = D_i on the first
    step and on the last step (to sigma = 0) and otherwise the multistep extrapolation
    (1 + 1/(2 r)) D_i - 1/(2 r) D_{i-1}, r = h_{i-1} / h_i. ``noise`` is unused.
    """
    s, s_dev, _ = _setup(x, sigmas, noise)
    previous: torch.Tensor | None = None
    for i in range(len(s) - 1):
        denoised = denoise(x, s_dev[i])
        ratio = s[i + 1] / s[i]
        if previous is None or s[i + 1] == 0:
            target = denoised
        else:
            r = math.log(s[i - 1] / s[i]) / math.log(s[i] / s[i + 1])
            target = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * previous
        x = ratio * x + (1 - ratio) * target
        previous = denoised
    return x


def dpmpp_3m(
    denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor, *, noise: Noise | None = None
) -> torch.Tensor:
    """DPM-Solver++(3M): the multistep data-prediction exponential integrator of third order
    (Lu et al. 2022) in lambda = -log sigma; N NFE. ``noise`` is unused.

    The exact step is x' = (sigma'/sigma) x + sigma' * integral of e^lambda D(lambda) over
    [lambda_i, lambda_{i+1}] (h = lambda_{i+1} - lambda_i). D is replaced by the quadratic in
    u = lambda - lambda_i through the current and the two previous denoised values,
    D_i + B u + C u^2, and integrated exactly:

        x' = (sigma'/sigma) x + phi_1 D_i + phi_2 (h B) + psi_3 (h^2 C),
        phi_1 = 1 - e^-h,  phi_2 = 1 - phi_1 / h,  psi_3 = 1 - 2 phi_2 / h,

    with, from r_k = h_{i-k} / h, d0 = (D_i - D_{i-1}) / r_1 and d1 = (D_{i-1} - D_{i-2}) / r_2:
    h B = d0 + (d0 - d1) r_1 / (r_1 + r_2) and h^2 C = (d0 - d1) / (r_1 + r_2). (Written with
    phi_3 = phi_2 / h - 1/2, the quadratic's coefficient is -2 phi_3; with -phi_3, as some
    implementations have it, the method is second order: tests/sampling/test_solvers.py measures
    the order.) The first step is first order, the second uses the line through two values
    (h B = d0, C = 0); the last step (to sigma = 0, h infinite) is the first-order x' = D_i, as
    in :func:`dpmpp_2m`.
    """
    s, s_dev, _ = _setup(x, sigmas, noise)
    history: list[tuple[torch.Tensor, float]] = []  # (D_j, h_j), the last two steps
    for i in range(len(s) - 1):
        denoised = denoise(x, s_dev[i])
        if s[i + 1] == 0:
            return denoised
        ratio = s[i + 1] / s[i]
        h = math.log(s[i] / s[i + 1])
        phi_2 = 1 - (1 - ratio) / h
        x = ratio * x + (1 - ratio) * denoised
        if history:
            r1 = history[-1][1] / h
            d0 = (denoised - history[-1][0]) * (1 / r1)
            if len(history) == 2:
                r2 = history[-2][1] / h
                d1 = (history[-1][0] - history[-2][0]) * (1 / r2)
                linear = d0 + (d0 - d1) * (r1 / (r1 + r2))
                quadratic = (d0 - d1) * (1 / (r1 + r2))
                x = x + phi_2 * linear + (1 - 2 * phi_2 / h) * quadratic
            else:
                x = x + phi_2 * d0
        history = [*history[-1:], (denoised, h)]
    return x


def consistency(
    denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor, *, noise: Noise | None = None
) -> torch.Tensor:
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1) of a consistency student
    (:mod:`edmcli.models.consistency`), whose ``denoise`` maps a noisy image straight to the
    trajectory's end; N NFE for the N positive levels of ``sigmas``.

    x_0 = f(x, sigma_0); then for each further level sigma_i > 0: x = x_0 + sigma_i n_i (fresh
    noise, ``noise(i)``), x_0 = f(x, sigma_i). One level is one-step generation.
    """
    s, s_dev, draw = _setup(x, sigmas, noise)
    x0 = denoise(x, s_dev[0])
    for i in range(1, len(s) - 1):
        x0 = denoise(x0 + s[i] * draw(i), s_dev[i])
    return x0


def _ddim_steps(
    denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor, noise: Noise | None, eta: float
) -> torch.Tensor:
    s, s_dev, draw = _setup(x, sigmas, noise)
    for i in range(len(s) - 1):
        denoised = denoise(x, s_dev[i])
        ratio = s[i + 1] / s[i]
        s_up = eta * s[i + 1] * math.sqrt(1 - ratio**2)
        s_down = s[i + 1] * math.sqrt(1 - eta**2 * (1 - ratio**2))
        x = denoised + (s_down / s[i]) * (x - denoised)
        if s_up > 0:
            x = x + s_up * draw(i)
    return x


def ddim(
    denoise: Denoise,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise: Noise | None = None,
    eta: float = 0.0,
) -> torch.Tensor:
    """DDIM (Song et al. 2021) in the sigma form, for strided DDPM schedules; N NFE.

    With x = x_t / sqrt(abar_t) and abar = 1 / (1 + sigma^2) a DDIM step from sigma to sigma' is

        x' = D + (sigma_down / sigma) (x - D) + sigma_up z,
        sigma_up = eta sigma' sqrt(1 - sigma'^2 / sigma^2),  sigma_down^2 = sigma'^2 - sigma_up^2.

    ``eta = 0`` (the default) is deterministic and identical to :func:`euler`; ``eta = 1`` is the
    DDPM posterior (:func:`ddpm_ancestral`).
    """
    if not 0 <= eta <= 1:
        raise ValueError(f"ddim needs 0 <= eta <= 1, got {eta}.")
    return _ddim_steps(denoise, x, sigmas, noise, eta)


VARIANCES = ("small", "large", "learned")


def ddpm_ancestral(
    denoise: Denoise,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise: Noise | None = None,
    variance: str = "small",
) -> torch.Tensor:
    """Ancestral DDPM sampling (Ho et al. 2020; Nichol & Dhariwal 2021); N NFE.

    In x_t space the step from timestep t to s < t draws from a Gaussian with the mean of the
    posterior q(x_s | x_t, x_0), sqrt(abar_s) beta_ts / (1 - abar_t) x_0
    + sqrt(alpha_ts) (1 - abar_s) / (1 - abar_t) x_t, where alpha_ts = abar_t / abar_s
    = 1 - beta_ts and x_0 = D (clipped when the model clips it), and the variance

    * ``"small"`` (default): the posterior's, beta~_ts = (1 - abar_s) / (1 - abar_t) beta_ts;
    * ``"large"``: beta_ts;
    * ``"learned"``: exp(v' log beta_ts + (1 - v') log beta~_ts), where ``denoise`` returns the
      pair (D, v') (a :class:`~edmcli.models.ddpm.DDPMEpsModel` with
      ``learn_sigma`` called with ``return_variance=True``).

    beta_ts and beta~_ts are those of the chain of the schedule's own timesteps, so a strided
    (respaced) schedule recomputes them from abar at its timesteps. Dividing by sqrt(abar_s)
    and substituting abar = 1 / (1 + sigma^2), the step in the sigma form is

        x' = D + (sigma'^2 / sigma^2) (x - D) + sqrt(V) z,   V = (1 + sigma'^2) Sigma_ts,
        beta_ts = (sigma^2 - sigma'^2) / (1 + sigma^2),
        beta~_ts = sigma'^2 (sigma^2 - sigma'^2) / (sigma^2 (1 + sigma'^2)),

    so ``"small"`` is DDIM with eta = 1. On the full 1000-step schedule it is the textbook
    sampler x_{t-1} = (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t) + sqrt(Sigma_t) z;
    the last step (to sigma = 0, abar = 1) returns D without noise.
    """
    if variance not in VARIANCES:
        raise ValueError(f"variance must be one of {', '.join(VARIANCES)}, got {variance!r}.")
    if variance == "small":
        return _ddim_steps(denoise, x, sigmas, noise, 1.0)
    s, s_dev, draw = _setup(x, sigmas, noise)
    for i in range(len(s) - 1):
        out = denoise(x, s_dev[i])
        if variance == "learned":
            if not isinstance(out, tuple) or len(out) != 2:
                raise ValueError(
                    'variance="learned" needs denoise(x, sigma) to return (D, v\'), the '
                    "learned interpolation fraction of the variance."
                )
            denoised, frac = out
        else:
            denoised = out
        sig, nxt = s[i], s[i + 1]
        x = denoised + (nxt**2 / sig**2) * (x - denoised)
        if nxt == 0:
            continue
        log_large = math.log((sig**2 - nxt**2) / (1 + sig**2))
        log_small = math.log(nxt**2 * (sig**2 - nxt**2) / (sig**2 * (1 + nxt**2)))
        scale = math.log1p(nxt**2)  # x_t space -> sigma form: V = (1 + sigma'^2) Sigma
        if variance == "large":
            x = x + math.exp(0.5 * (log_large + scale)) * draw(i)
        else:
            log_var = frac * log_large + (1 - frac) * log_small + scale
            x = x + torch.exp(0.5 * log_var) * draw(i)
    return x


SOLVERS: dict[str, Solver] = {
    "euler": euler,
    "heun": heun,
    "dpmpp_2m": dpmpp_2m,
    "dpmpp_3m": dpmpp_3m,
    "consistency": consistency,
    "ddim": ddim,
    "ddpm_ancestral": ddpm_ancestral,
}
"""Solver name -> function ``(denoise, x, sigmas, *, noise=None, **options) -> x_0``."""


def nfe_cost(solver: str, steps: int) -> int:
    """Network evaluations that ``solver`` spends on a schedule of ``steps`` steps (ending at 0):
    2N - 1 for Heun (its last step, to sigma = 0, is an Euler step), N for the others."""
    if solver not in SOLVERS:
        raise ValueError(f"Unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}.")
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"The number of steps must be an integer >= 1, got {steps!r}.")
    steps = int(steps)
    return 2 * steps - 1 if solver == "heun" else steps
