"""The linear cost model of generation: seconds per batch against NFE, fitted and checked.

Generating a batch of B images with a budget of N network evaluations costs

    seconds(N) = fixed + N · per_nfe + (N − 1) · noise_per_step,   images/s(N) = B / seconds(N),

where ``per_nfe`` is one denoiser call with SPADE γ/β taken from the cache, ``fixed`` is what a
batch costs once whatever N is, and ``noise_per_step`` is the fresh Gaussian noise a stochastic
sampler draws at every step but the last (ancestral DDPM, one NFE per step: N − 1 draws of the
per-sample noise streams; 0 for the deterministic ODE solvers) (:mod:`edmcli.bench.throughput`
measures all three). :class:`CostModel` holds the numbers and predicts every NFE;
:func:`pick_check_nfes` chooses the NFEs at which the model is checked end to end,
:func:`relative_error` compares prediction and measurement.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["CostModel", "fit_cost_model", "pick_check_nfes", "relative_error"]


@dataclass(frozen=True)
class CostModel:
    """Seconds per batch of ``batch`` images at N NFE:
    ``fixed_s + N · per_nfe_s + max(N − 1, 0) · noise_per_step_s``."""

    batch: int
    per_nfe_s: float
    fixed_s: float
    noise_per_step_s: float = 0.0

    def seconds(self, nfe: float) -> float:
        """Predicted seconds for one batch at ``nfe`` network evaluations."""
        return self.fixed_s + nfe * self.per_nfe_s + max(nfe - 1, 0) * self.noise_per_step_s

    def images_per_s(self, nfe: float) -> float:
        """Predicted images per second at ``nfe``: ``batch / seconds(nfe)``."""
        return self.batch / self.seconds(nfe)

    def to_dict(self) -> dict[str, float]:
        return {"batch": self.batch, "per_nfe_s": self.per_nfe_s, "fixed_s": self.fixed_s,
                "noise_per_step_s": self.noise_per_step_s}  # fmt: skip

    @classmethod
    def from_dict(cls, record: dict) -> CostModel:
        """The model of a bench record's ``cost_model`` (other keys ignored; a record without
        ``noise_per_step_s``, written before it existed, has none)."""
        return cls(int(record["batch"]), float(record["per_nfe_s"]), float(record["fixed_s"]),
                   float(record.get("noise_per_step_s") or 0.0))  # fmt: skip


def fit_cost_model(nfes: Sequence[float], seconds: Sequence[float], batch: int) -> CostModel:
    """Least-squares ``seconds ≈ fixed + nfe · per_nfe`` through end-to-end timings at two or
    more distinct NFEs (exact through two points)."""
    n = np.asarray(nfes, dtype=float)
    t = np.asarray(seconds, dtype=float)
    if n.shape != t.shape or len(np.unique(n)) < 2:
        raise ValueError("fit_cost_model needs timings at two or more distinct NFEs.")
    slope, intercept = np.polyfit(n, t, 1)
    return CostModel(batch, float(slope), float(intercept))


def relative_error(predicted: float, measured: float) -> float:
    """``(predicted − measured) / measured``."""
    return (predicted - measured) / measured


def pick_check_nfes(
    nfes: Sequence[int], seconds_of: Callable[[int], float], budget_s: float, most: int = 3
) -> list[int]:
    """Up to ``most`` NFEs of ``nfes`` to time end to end within ``budget_s`` predicted seconds:
    the smallest, then the largest that still fits, then the one nearest their geometric middle
    that fits. Empty when even the smallest does not fit."""
    ordered = sorted(set(int(n) for n in nfes))
    if not ordered or most < 1 or seconds_of(ordered[0]) > budget_s:
        return []
    chosen = [ordered[0]]
    left = budget_s - seconds_of(ordered[0])
    if most >= 2:
        fits = [n for n in ordered[1:] if seconds_of(n) <= left]
        if fits:
            chosen.append(fits[-1])
            left -= seconds_of(fits[-1])
    if most >= 3 and len(chosen) == 2:
        middle = (chosen[0] * chosen[1]) ** 0.5
        inner = [n for n in ordered if chosen[0] < n < chosen[1] and seconds_of(n) <= left]
        if inner:
            chosen.append(min(inner, key=lambda n: abs(np.log(n / middle))))
    return sorted(chosen)
