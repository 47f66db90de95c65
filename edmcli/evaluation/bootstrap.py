"""Bootstrap of test-set metrics as in the paper (section III.D): a random 80 % subset of the
test images (drawn without replacement), 1000 times; reported as mean ± std over the subsets,
plus a 95 % percentile interval and the value on the whole test set.

Subsets depend only on ``(n, fraction, iterations, seed)``, so two models scored on the same
test set see the same subsets: the bootstrap of the per-image *difference* of their metrics is
the paired bootstrap of the gap between them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

DEFAULT_FRACTION = 0.8
DEFAULT_ITERATIONS = 1000
DEFAULT_CONFIDENCE = 0.95


@dataclass(frozen=True)
class BootstrapEstimate:
    """``value``: the statistic on all test images; ``mean``/``std``: over the subsets;
    ``ci_low``/``ci_high``: percentile interval of the subsets' statistics."""

    value: float
    mean: float
    std: float
    ci_low: float
    ci_high: float
    n: int
    subset_size: int
    iterations: int
    confidence: float

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def subset_size(n: int, fraction: float = DEFAULT_FRACTION) -> int:
    """Images per subset: ``round(fraction · n)``, at least 1."""
    return max(1, int(round(fraction * n)))


def subset_indices(
    n: int,
    fraction: float = DEFAULT_FRACTION,
    iterations: int = DEFAULT_ITERATIONS,
    seed: int = 0,
) -> np.ndarray:
    """(iterations, k) indices into ``range(n)``: each row a subset of ``k = round(fraction·n)``
    distinct images, drawn with a generator seeded by ``seed``."""
    if n < 1:
        raise ValueError(f"the bootstrap needs at least one value, got n={n}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if iterations < 1:
        raise ValueError(f"iterations must be at least 1, got {iterations}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, n, 0xB007]))
    k = subset_size(n, fraction)
    rows = np.empty((iterations, k), dtype=np.int64)
    chunk = max(1, (1 << 22) // n)  # bound the memory of one draw
    for start in range(0, iterations, chunk):
        stop = min(iterations, start + chunk)
        order = rng.permuted(np.broadcast_to(np.arange(n), (stop - start, n)), axis=1)
        rows[start:stop] = order[:, :k]
    return rows


def _estimate(
    full: float, stats: np.ndarray, n: int, k: int, confidence: float
) -> BootstrapEstimate:
    tail = 100.0 * (1.0 - confidence) / 2.0
    low, high = np.percentile(stats, [tail, 100.0 - tail])
    return BootstrapEstimate(
        value=float(full),
        mean=float(stats.mean()),
        std=float(stats.std()),
        ci_low=float(low),
        ci_high=float(high),
        n=n,
        subset_size=k,
        iterations=len(stats),
        confidence=confidence,
    )


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def bootstrap_mean(
    values: np.ndarray,
    fraction: float = DEFAULT_FRACTION,
    iterations: int = DEFAULT_ITERATIONS,
    seed: int = 0,
    confidence: float = DEFAULT_CONFIDENCE,
) -> BootstrapEstimate:
    """Bootstrap of the mean of per-image values (Dice, HD, 0/1 correctness, differences).

    ``values`` must be finite: the metrics replace undefined cases by documented penalties
    before they get here, so a NaN is a bug upstream, not something to average away.
    """
    _check_confidence(confidence)
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size and not np.all(np.isfinite(values)):
        raise ValueError("bootstrap values must be finite (got NaN or inf)")
    rows = subset_indices(values.size, fraction, iterations, seed)
    stats = values[rows].mean(1)
    return _estimate(values.mean(), stats, values.size, rows.shape[1], confidence)


def bootstrap_statistic(
    statistic: Callable[[np.ndarray], float],
    n: int,
    fraction: float = DEFAULT_FRACTION,
    iterations: int = DEFAULT_ITERATIONS,
    seed: int = 0,
    confidence: float = DEFAULT_CONFIDENCE,
) -> BootstrapEstimate:
    """Bootstrap of any statistic of a subset, given as ``statistic(indices) → float`` (e.g.
    balanced accuracy, which is not a mean of per-image values)."""
    _check_confidence(confidence)
    rows = subset_indices(n, fraction, iterations, seed)
    stats = np.array([statistic(row) for row in rows], dtype=np.float64)
    return _estimate(statistic(np.arange(n)), stats, n, rows.shape[1], confidence)
