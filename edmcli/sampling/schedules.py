"""Noise-level (sigma) discretisations for sampling.

Every schedule returns a float64 CPU tensor ``[sigma_0 > sigma_1 > ... > sigma_{N-1}, 0]``: N
noise levels, descending, plus the final 0 that the last solver step lands on. All models are
sampled in the sigma parameterisation x = y + sigma n, so one schedule works with every solver
of :mod:`edmcli.sampling.solvers`. The formulas follow Karras et al. 2022, Table 1:

| schedule | sigma_i, i = 0..N-1 | defaults |
|---|---|---|
| ``edm`` | (s_max^(1/rho) + i/(N-1) (s_min^(1/rho) - s_max^(1/rho)))^rho | 0.002..80, rho 7 |
| ``ve`` | sqrt(t_i), t_i = s_max^2 (s_min^2 / s_max^2)^(i/(N-1)) | 0.02..100 |
| ``vp`` | sigma_vp(t_i), t_i = 1 + i/(N-1) (eps_s - 1) | beta_d 19.9, beta_min 0.1, eps_s 1e-3 |
| ``ddpm`` | sigma_t = sqrt((1 - abar_t) / abar_t) of the model, t strided T-1..0 | T 1000 |

with sigma_vp(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1). With N = 1 the single level is
the largest one. Which schedule each model uses by default is part of its spec
(:attr:`edmcli.models.registry.ModelSpec.schedule`); ``ddpm`` visits all 1000 timesteps for 1000
steps and an even stride for fewer.

:func:`network_sigmas` gives a named schedule for a given network: ``edm`` over EDM's range
0.002..80 clipped to the network's [sigma_min, sigma_max] (EDM's and the authors' generation
default for every model: VE 0.02..80, VP and EDM 0.002..80), ``ve`` and ``vp`` the native
Table-1 levels (VP with the network's beta_d, beta_min), ``ddpm`` the network's discrete levels.

Every schedule takes a ``round_sigma`` hook (e.g. ``model.round_sigma``) that snaps the positive
levels to the ones a model can represent; it runs once, on the host, before sampling.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable

import torch

from edmcli.models.ddpm import ddpm_alphas_cumprod
from edmcli.models.preconditioning import vp_sigma

__all__ = [
    "EDM_SIGMA_MAX",
    "EDM_SIGMA_MIN",
    "SCHEDULES",
    "check_sigmas",
    "ddpm_sigmas",
    "ddpm_timesteps",
    "edm_sigmas",
    "network_sigmas",
    "snap_sigmas",
    "ve_sigmas",
    "vp_sigmas",
]

RoundSigma = Callable[[torch.Tensor], torch.Tensor]
EDM_SIGMA_MIN = 0.002  # EDM's sampling range (Karras et al. 2022), clipped to each network's
EDM_SIGMA_MAX = 80.0


def _check_n(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"The number of noise levels must be an integer >= 1, got {n!r}.")


def _fractions(n: int) -> torch.Tensor:
    """i / (N - 1) for i = 0..N-1 in float64 (just 0 when N = 1)."""
    if n == 1:
        return torch.zeros(1, dtype=torch.float64)
    return torch.arange(n, dtype=torch.float64) / (n - 1)


def check_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    """Validate a schedule and return it as a float64 CPU tensor.

    A schedule is 1-D, holds at least one positive level followed by a final 0, and is strictly
    decreasing.
    """
    if not isinstance(sigmas, torch.Tensor):
        raise ValueError(f"sigmas must be a torch.Tensor, got {type(sigmas).__name__}.")
    sigmas = sigmas.detach().to("cpu", torch.float64)
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(
            f"sigmas must be 1-D with at least two entries (levels and a final 0), got shape "
            f"{tuple(sigmas.shape)}."
        )
    if (
        sigmas[-1] != 0
        or not bool(torch.isfinite(sigmas).all())
        or not bool((sigmas[:-1] > 0).all())
    ):
        raise ValueError("sigmas must hold finite positive noise levels followed by a final 0.")
    if not bool((sigmas[1:] < sigmas[:-1]).all()):
        raise ValueError("sigmas must be strictly decreasing.")
    return sigmas


def snap_sigmas(sigmas: torch.Tensor, round_sigma: RoundSigma | None) -> torch.Tensor:
    """Apply ``round_sigma`` to the positive levels of a schedule (the final 0 stays).

    Raises ValueError when snapping merges two levels, since that would silently change the
    number of steps.
    """
    sigmas = check_sigmas(sigmas)
    if round_sigma is None:
        return sigmas
    levels = torch.as_tensor(round_sigma(sigmas[:-1])).detach().to("cpu", torch.float64)
    if levels.shape != sigmas[:-1].shape:
        raise ValueError(
            f"round_sigma must keep the shape {tuple(sigmas[:-1].shape)}, got "
            f"{tuple(levels.shape)}."
        )
    snapped = torch.cat([levels.reshape(-1), sigmas.new_zeros(1)])
    if not bool((snapped[1:] < snapped[:-1]).all()):
        raise ValueError(
            f"round_sigma maps {sigmas.numel() - 1} noise levels onto fewer distinct ones; use "
            "fewer steps or a schedule the model can represent."
        )
    return check_sigmas(snapped)


def edm_sigmas(
    n: int,
    sigma_min: float = EDM_SIGMA_MIN,
    sigma_max: float = EDM_SIGMA_MAX,
    rho: float = 7.0,
    *,
    round_sigma: RoundSigma | None = None,
) -> torch.Tensor:
    """EDM's levels: uniform in sigma^(1/rho) from ``sigma_max`` to ``sigma_min``, then 0."""
    _check_n(n)
    if not 0 < sigma_min < sigma_max or rho <= 0:
        raise ValueError(
            f"edm_sigmas needs 0 < sigma_min < sigma_max and rho > 0, got {sigma_min}, "
            f"{sigma_max}, {rho}."
        )
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    levels = (hi + _fractions(n) * (lo - hi)) ** rho
    return snap_sigmas(torch.cat([levels, levels.new_zeros(1)]), round_sigma)


def ve_sigmas(
    n: int,
    sigma_min: float = 0.02,
    sigma_max: float = 100.0,
    *,
    round_sigma: RoundSigma | None = None,
) -> torch.Tensor:
    """VE's levels: t = sigma^2 geometric from ``sigma_max^2`` to ``sigma_min^2``, then 0."""
    _check_n(n)
    if not 0 < sigma_min < sigma_max:
        raise ValueError(
            f"ve_sigmas needs 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}."
        )
    t = sigma_max**2 * (sigma_min**2 / sigma_max**2) ** _fractions(n)
    levels = t.sqrt()
    return snap_sigmas(torch.cat([levels, levels.new_zeros(1)]), round_sigma)


def vp_sigmas(
    n: int,
    beta_d: float = 19.9,
    beta_min: float = 0.1,
    eps_s: float = 1e-3,
    *,
    round_sigma: RoundSigma | None = None,
) -> torch.Tensor:
    """VP's levels: sigma_vp(t) at t uniform from 1 to ``eps_s``, then 0."""
    _check_n(n)
    if beta_d <= 0 or beta_min < 0 or not 0 < eps_s < 1:
        raise ValueError(
            f"vp_sigmas needs beta_d > 0, beta_min >= 0 and 0 < eps_s < 1, got {beta_d}, "
            f"{beta_min}, {eps_s}."
        )
    t = 1 + _fractions(n) * (eps_s - 1)
    levels = vp_sigma(t, beta_d, beta_min)  # t is float64: so is sigma
    return snap_sigmas(torch.cat([levels, levels.new_zeros(1)]), round_sigma)


def ddpm_timesteps(n: int, num_timesteps: int = 1000) -> torch.Tensor:
    """``n`` integer timesteps evenly strided from ``num_timesteps - 1`` down to 0 (all of
    them, in reverse order, when ``n == num_timesteps``; just the largest when ``n == 1``)."""
    _check_n(n)
    if n > num_timesteps:
        raise ValueError(
            f"A DDPM with {num_timesteps} timesteps takes at most {num_timesteps} steps, got {n}."
        )
    if n == 1:
        return torch.tensor([num_timesteps - 1], dtype=torch.long)
    steps = torch.arange(n, dtype=torch.float64) * ((num_timesteps - 1) / (n - 1))
    return (num_timesteps - 1 - steps.round()).long()


def ddpm_sigmas(
    n: int = 1000,
    *,
    alphas_cumprod: torch.Tensor | None = None,
    sigmas: torch.Tensor | None = None,
    round_sigma: RoundSigma | None = None,
) -> torch.Tensor:
    """A DDPM's discrete levels sigma_t = sqrt((1 - abar_t) / abar_t) at ``n`` strided timesteps.

    Give the model's ``alphas_cumprod`` or its ``sigmas`` (both indexed by timestep t = 0..T-1,
    so sigma ascending); with neither, the 1000-step linear-beta DDPM (beta 1e-4..0.02) is used.
    With ``n = T`` every timestep is visited; with fewer, timesteps evenly strided from T-1 down
    to 0 (:func:`ddpm_timesteps`), so the schedule always starts at the largest level and ends
    at the smallest before the final 0.
    """
    if alphas_cumprod is not None and sigmas is not None:
        raise ValueError("ddpm_sigmas takes alphas_cumprod or sigmas, not both.")
    if sigmas is None:
        abar = ddpm_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod
        abar = torch.as_tensor(abar).detach().to("cpu", torch.float64)
        if abar.ndim != 1 or not bool(((abar > 0) & (abar < 1)).all()):
            raise ValueError("alphas_cumprod must be 1-D with every value in (0, 1).")
        table = ((1 - abar) / abar).sqrt()
    else:
        table = torch.as_tensor(sigmas).detach().to("cpu", torch.float64)
        if table.ndim != 1 or not bool((table > 0).all()):
            raise ValueError("sigmas must be 1-D with every value positive.")
    if table.numel() < 2 or not bool((table[1:] > table[:-1]).all()):
        raise ValueError(
            "The DDPM noise levels must increase strictly with the timestep (abar decreasing)."
        )
    levels = table[ddpm_timesteps(n, table.numel())]
    return snap_sigmas(torch.cat([levels, levels.new_zeros(1)]), round_sigma)


SCHEDULES: dict[str, Callable[..., torch.Tensor]] = {
    "edm": edm_sigmas,
    "ve": ve_sigmas,
    "vp": vp_sigmas,
    "ddpm": ddpm_sigmas,
}
"""Schedule name -> function ``(n, ..., round_sigma=None) -> sigmas``."""


def network_sigmas(schedule: str, n: int, net: object) -> torch.Tensor:
    """Schedule ``schedule`` of :data:`SCHEDULES` with ``n`` levels (+ the final 0) for the
    network ``net`` (a preconditioning, or a module passing its attributes through):

    * ``edm``: rho = 7 over [max(0.002, net.sigma_min), min(80, net.sigma_max)];
    * ``ve``, ``vp``: the native levels of Table 1 (``vp`` with the network's beta_d, beta_min
      when it has them);
    * ``ddpm``: the network's discrete ``sigmas`` at ``n`` strided timesteps.

    Positive levels are snapped with the network's ``round_sigma`` (a DDPM's discrete levels).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"Unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}.")
    round_sigma = getattr(net, "round_sigma", None)
    if schedule == "ddpm":
        table = getattr(net, "sigmas", None)
        if table is None:
            raise ValueError("The ddpm schedule needs a discrete-time model (one with sigmas).")
        return ddpm_sigmas(n, sigmas=table)
    if schedule == "edm":
        lo = max(EDM_SIGMA_MIN, float(getattr(net, "sigma_min", EDM_SIGMA_MIN)))
        hi = min(EDM_SIGMA_MAX, float(getattr(net, "sigma_max", EDM_SIGMA_MAX)))
        return edm_sigmas(n, lo, hi, round_sigma=round_sigma)
    if schedule == "vp":
        beta = {k: float(getattr(net, k)) for k in ("beta_d", "beta_min") if hasattr(net, k)}
        return vp_sigmas(n, **beta, round_sigma=round_sigma)
    return SCHEDULES[schedule](n, round_sigma=round_sigma)
