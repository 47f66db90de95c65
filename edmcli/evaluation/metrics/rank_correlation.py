"""Rank correlation with an uncertainty: Spearman's ρ (``scipy.stats.spearmanr``) with a
percentile bootstrap interval, the items (here: synthetic stores) resampled with replacement
(:func:`spearman_with_interval`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import rankdata, spearmanr

__all__ = ["SpearmanEstimate", "spearman_with_interval"]


@dataclass(frozen=True)
class SpearmanEstimate:
    """Spearman's ρ of n items with its bootstrap percentile interval (items resampled with
    replacement; resamples where either variable is constant have no ρ and are left out)."""

    rho: float
    p_value: float
    ci_low: float
    ci_high: float
    confidence: float
    n: int
    iterations: int
    valid_resamples: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def _rank_rows(x: np.ndarray) -> np.ndarray:
    return rankdata(x, axis=-1)


def _pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(-1, keepdims=True)
    b = b - b.mean(-1, keepdims=True)
    den = np.sqrt((a * a).sum(-1) * (b * b).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (a * b).sum(-1) / np.where(den > 0, den, 1.0), np.nan)


def spearman_with_interval(
    x: np.ndarray,
    y: np.ndarray,
    iterations: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> SpearmanEstimate:
    """Spearman's rank correlation of paired values (``scipy.stats.spearmanr``: Pearson's r of
    the ranks, ties given their mean rank) and a percentile bootstrap interval over the items.

    Args:
        x, y: (n,) paired values, n ≥ 3, finite.
        iterations: bootstrap resamples of the n items with replacement.
        confidence: of the interval.
        seed: of the resampling.

    Returns:
        ρ (NaN when x or y is constant), its two-sided p-value, and the interval (NaN when no
        resample has a defined ρ). With few items the interval is wide and rough.
    """
    x, y = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"x and y differ in length: {x.size} and {y.size}")
    if x.size < 3:
        raise ValueError(f"a rank correlation needs at least 3 items, got {x.size}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("x and y must be finite")
    if iterations < 1 or not 0.0 < confidence < 1.0:
        raise ValueError(f"iterations {iterations} must be ≥ 1 and confidence in (0, 1)")
    constant = np.ptp(x) == 0 or np.ptp(y) == 0
    if constant:
        rho, p = float("nan"), float("nan")
    else:
        result = spearmanr(x, y)
        rho, p = float(result.statistic), float(result.pvalue)
    rng = np.random.default_rng(np.random.SeedSequence([seed, x.size, 0x5EA]))
    rows = rng.integers(0, x.size, size=(iterations, x.size))
    boot = _pearson_rows(_rank_rows(x[rows]), _rank_rows(y[rows]))
    boot = boot[np.isfinite(boot)]
    alpha = (1.0 - confidence) / 2
    if len(boot):
        lo, hi = (float(v) for v in np.quantile(boot, [alpha, 1.0 - alpha]))
    else:
        lo = hi = float("nan")
    return SpearmanEstimate(rho, p, lo, hi, confidence, int(x.size), iterations, int(len(boot)))
