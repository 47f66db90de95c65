"""From a budget of network evaluations (``--nfe``) to a number of solver steps.

``--nfe`` always counts network evaluations (docs/design.md). Most solvers spend one per step, so
N = NFE. Heun spends two per step except on its last step (to sigma = 0, an Euler step), so N
steps cost 2N - 1: only odd budgets are reachable, and an even one is refused with the two
nearest reachable budgets rather than silently rounded. NFE = 1 with Heun is one step, which is
an Euler step from sigma_max straight to 0 (the denoiser's one-shot estimate D(x_T; sigma_max)).
The DDPM solvers (``ddpm_ancestral``, ``ddim``) visit discrete timesteps, so they take at most
as many steps as the model has timesteps (1000 for SDM).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

from edmcli.errors import EchoSynthError
from edmcli.sampling.solvers import SOLVERS, nfe_cost

__all__ = ["DDPM_TIMESTEPS", "NFEError", "StepPlan", "plan"]

DDPM_TIMESTEPS = 1000
"""Default step cap of the discrete-time solvers: the SDM model's number of timesteps."""

_DISCRETE = ("ddpm_ancestral", "ddim")


class NFEError(EchoSynthError, ValueError):
    """An NFE budget that a solver cannot spend exactly (a ValueError the CLI prints as is)."""


@dataclass(frozen=True)
class StepPlan:
    """``steps`` solver steps that cost exactly ``nfe`` network evaluations; ``note`` says how,
    in one line for the user."""

    steps: int
    nfe: int
    note: str


def plan(solver: str, nfe: int, *, max_steps: int | None = None) -> StepPlan:
    """The number of steps that spends exactly ``nfe`` network evaluations with ``solver``.

    ``max_steps`` caps the steps (default: :data:`DDPM_TIMESTEPS` for ``ddpm_ancestral`` and
    ``ddim``, no cap otherwise). Raises :class:`NFEError` (a ValueError) with one sentence when
    ``nfe`` is below 1, not reachable by the solver, or above the cap.
    """
    if solver not in SOLVERS:
        raise NFEError(f"Unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}.")
    if isinstance(nfe, bool) or not isinstance(nfe, numbers.Integral) or nfe < 1:
        raise NFEError(f"NFE (network evaluations) must be an integer >= 1, got {nfe!r}.")
    nfe = int(nfe)
    if max_steps is None and solver in _DISCRETE:
        max_steps = DDPM_TIMESTEPS
    if max_steps is not None and max_steps < 1:
        raise NFEError(f"max_steps must be >= 1, got {max_steps}.")
    if solver == "heun":
        if nfe % 2 == 0:
            lo, hi = nfe - 1, nfe + 1
            raise NFEError(
                f"Heun uses 2N-1 network evaluations for N steps, so NFE {nfe} is not reachable; "
                f"use {lo} ({(lo + 1) // 2} steps) or {hi} ({(hi + 1) // 2} steps)."
            )
        steps = (nfe + 1) // 2
    else:
        steps = nfe
    if max_steps is not None and steps > max_steps:
        most = nfe_cost(solver, max_steps)
        raise NFEError(
            f"{solver} takes at most {max_steps} steps ({most} NFE) here, so NFE {nfe} is not "
            f"reachable; use at most {most}."
        )
    if solver == "heun":
        note = (
            f"heun: {steps} step{'s' if steps > 1 else ''} = {nfe} NFE "
            f"(2 per step, 1 on the last step to sigma 0)"
        )
        if steps == 1:
            note += "; one step is an Euler step to sigma 0"
    elif solver in _DISCRETE and max_steps is not None and steps < max_steps:
        note = f"{solver}: {steps} steps = {nfe} NFE (timesteps strided over {max_steps})"
    else:
        note = f"{solver}: {steps} step{'s' if steps > 1 else ''} = {nfe} NFE"
    return StepPlan(steps=steps, nfe=nfe, note=note)
