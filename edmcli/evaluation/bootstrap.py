"""Uncertainty of test-set metrics, two ways.

* **Paper protocol** (section III.D), kept so that the numbers compare with the paper: a
  random 80 % subset of the test *images*, drawn without replacement, 1000 times; reported as
  mean ± std over the subsets (:func:`bootstrap_mean`, :func:`bootstrap_statistic`). It is not a
  confidence interval: a subset without replacement varies less than a fresh test set would
  (its std is ``√((1 − f)·n / (f·(n − 1)))`` ≈ 0.5 standard errors for ``f`` = 0.8), and the four
  images of a patient (A2C/A4C × ED/ES) are not independent of one another.
* **Patient bootstrap** (:func:`patient_bootstrap`), behind every 95 % interval: resample the
  test *patients* with replacement, each drawn patient bringing all of its images, and take the
  percentile interval of the statistic over the resamples. The patients drawn depend only on
  ``(set of patient ids, iterations, seed)``, so every run scored on the same test set sees the
  same resamples; the interval of a per-image *difference* between two runs is then the paired
  bootstrap interval of their gap.

Both draw with generators seeded from ``seed`` alone: the same call gives the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

DEFAULT_FRACTION = 0.8
DEFAULT_ITERATIONS = 1000
DEFAULT_CONFIDENCE = 0.95


# --------------------------------------------------------------------------- paper protocol
@dataclass(frozen=True)
class BootstrapEstimate:
    """The paper's protocol: ``value`` is the statistic on all test images, ``mean``/``std``
    are over ``iterations`` subsets of ``subset_size`` of the ``n`` images (no interval: see the
    module docstring)."""

    value: float
    mean: float
    std: float
    n: int
    subset_size: int
    fraction: float
    iterations: int

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
    _check_iterations(iterations)
    rng = np.random.default_rng(np.random.SeedSequence([seed, n, 0xB007]))
    k = subset_size(n, fraction)
    rows = np.empty((iterations, k), dtype=np.int64)
    chunk = max(1, (1 << 22) // n)  # bound the memory of one draw
    for start in range(0, iterations, chunk):
        stop = min(iterations, start + chunk)
        order = rng.permuted(np.broadcast_to(np.arange(n), (stop - start, n)), axis=1)
        rows[start:stop] = order[:, :k]
    return rows


def _paper_estimate(
    full: float, stats: np.ndarray, n: int, k: int, fraction: float
) -> BootstrapEstimate:
    return BootstrapEstimate(
        value=float(full),
        mean=float(stats.mean()),
        std=float(stats.std()),
        n=n,
        subset_size=k,
        fraction=float(fraction),
        iterations=len(stats),
    )


def bootstrap_mean(
    values: np.ndarray,
    fraction: float = DEFAULT_FRACTION,
    iterations: int = DEFAULT_ITERATIONS,
    seed: int = 0,
) -> BootstrapEstimate:
    """The paper's mean ± std of the mean of per-image values (Dice, HD, 0/1 correctness,
    differences) over random subsets.

    ``values`` must be finite: the metrics replace undefined cases by documented penalties
    before they get here, so a NaN is a bug upstream, not something to average away.
    """
    values = _finite(values)
    rows = subset_indices(values.size, fraction, iterations, seed)
    stats = values[rows].mean(1)
    return _paper_estimate(values.mean(), stats, values.size, rows.shape[1], fraction)


def bootstrap_statistic(
    statistic: Callable[[np.ndarray], float],
    n: int,
    fraction: float = DEFAULT_FRACTION,
    iterations: int = DEFAULT_ITERATIONS,
    seed: int = 0,
) -> BootstrapEstimate:
    """The paper's protocol for any statistic of a subset, given as ``statistic(indices) →
    float`` (e.g. balanced accuracy, which is not a mean of per-image values)."""
    rows = subset_indices(n, fraction, iterations, seed)
    stats = np.array([statistic(row) for row in rows], dtype=np.float64)
    return _paper_estimate(statistic(np.arange(n)), stats, n, rows.shape[1], fraction)


# --------------------------------------------------------------------------- patient bootstrap
@dataclass(frozen=True)
class PatientBootstrapEstimate:
    """``value``: the statistic on all ``n`` test images; ``ci_low``/``ci_high``: the
    ``confidence`` percentile interval of the statistic over ``iterations`` resamples of the
    ``patients`` test patients with replacement; ``standard_error``: the std of those
    resamples' statistics."""

    value: float
    ci_low: float
    ci_high: float
    standard_error: float
    confidence: float
    iterations: int
    n: int
    patients: int
    method: str = "percentile"

    def as_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


def patient_codes(groups) -> tuple[np.ndarray, np.ndarray]:
    """(codes, ids): ``ids`` the sorted distinct patient ids, ``codes[i]`` the position of image
    ``i``'s patient in ``ids``. Sorting makes a patient's code independent of image order."""
    groups = np.asarray(groups).ravel()
    if groups.size == 0:
        raise ValueError("the bootstrap needs at least one value, got n=0")
    ids, codes = np.unique(groups, return_inverse=True)
    return codes.ravel().astype(np.int64), ids


def patient_draws(n_patients: int, iterations: int = DEFAULT_ITERATIONS, seed: int = 0):
    """(iterations, n_patients) codes of the patients each resample takes, drawn uniformly with
    replacement by a generator seeded from ``(seed, n_patients)``."""
    if n_patients < 1:
        raise ValueError(f"the bootstrap needs at least one patient, got {n_patients}")
    _check_iterations(iterations)
    rng = np.random.default_rng(np.random.SeedSequence([seed, n_patients, 0x9A7]))
    return rng.integers(0, n_patients, size=(iterations, n_patients), dtype=np.int64)


def patient_resamples(
    groups, iterations: int = DEFAULT_ITERATIONS, seed: int = 0
) -> list[np.ndarray]:
    """Image indices of each resample: for every patient drawn (:func:`patient_draws`), all of
    its images in their original order, a patient drawn twice contributing its images twice."""
    codes, ids = patient_codes(groups)
    order = np.argsort(codes, kind="stable")
    members = np.split(order, np.cumsum(np.bincount(codes, minlength=len(ids)))[:-1])
    draws = patient_draws(len(ids), iterations, seed)
    return [np.concatenate([members[p] for p in row]) for row in draws]


def patient_replicates(
    values,
    groups,
    statistic: Callable[[np.ndarray], float] | None = None,
    iterations: int = DEFAULT_ITERATIONS,
    seed: int = 0,
) -> np.ndarray:
    """(iterations,) the statistic on each patient resample.

    ``statistic=None``: the mean of the per-image ``values`` over the resampled images
    (computed from per-patient sums, without building the resamples). Otherwise
    ``statistic(values[indices])`` for each resample's image indices, ``values`` an array whose
    first axis is the images (e.g. predicted and true view stacked as columns).
    """
    codes, ids = patient_codes(groups)
    if statistic is None:
        values = _finite(values)
        _check_length(values, codes)
        counts = _draw_counts(patient_draws(len(ids), iterations, seed), len(ids))
        sums = np.bincount(codes, weights=values, minlength=len(ids))
        sizes = np.bincount(codes, minlength=len(ids)).astype(np.float64)
        return (counts @ sums) / (counts @ sizes)
    values = np.asarray(values)
    _check_length(values, codes)
    return np.array(
        [statistic(values[idx]) for idx in patient_resamples(groups, iterations, seed)],
        dtype=np.float64,
    )


def patient_bootstrap(
    values,
    groups,
    statistic: Callable[[np.ndarray], float] | None = None,
    iterations: int = DEFAULT_ITERATIONS,
    seed: int = 0,
    confidence: float = DEFAULT_CONFIDENCE,
) -> PatientBootstrapEstimate:
    """Patient-level bootstrap with replacement of a statistic of per-image ``values`` whose
    patients are ``groups`` (one id per image): the value on all images and a percentile
    interval. ``statistic`` as in :func:`patient_replicates` (None: the mean).

    For the gap between two runs on the same test set pass the per-image difference (or, for a
    statistic that is not a mean, both runs' columns and a statistic of their difference): the
    resamples are those of each run's own interval, so the interval is the paired one.
    """
    _check_confidence(confidence)
    codes, ids = patient_codes(groups)
    reps = patient_replicates(values, groups, statistic, iterations, seed)
    if statistic is None:
        value = float(np.mean(np.asarray(values, dtype=np.float64)))
    else:
        value = float(statistic(np.asarray(values)))
    tail = 100.0 * (1.0 - confidence) / 2.0
    low, high = np.percentile(reps, [tail, 100.0 - tail])
    return PatientBootstrapEstimate(
        value=value,
        ci_low=float(low),
        ci_high=float(high),
        standard_error=float(reps.std()),
        confidence=float(confidence),
        iterations=int(iterations),
        n=int(codes.size),
        patients=len(ids),
    )


# --------------------------------------------------------------------------- checks
def _draw_counts(draws: np.ndarray, n_patients: int) -> np.ndarray:
    """(iterations, n_patients) how often each resample drew each patient."""
    rows = np.arange(draws.shape[0])[:, None] * n_patients
    flat = np.bincount((draws + rows).ravel(), minlength=draws.shape[0] * n_patients)
    return flat.reshape(draws.shape[0], n_patients).astype(np.float64)


def _finite(values) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0:
        raise ValueError("the bootstrap needs at least one value, got n=0")
    if not np.all(np.isfinite(values)):
        raise ValueError("bootstrap values must be finite (got NaN or inf)")
    return values


def _check_length(values: np.ndarray, codes: np.ndarray) -> None:
    if len(values) != codes.size:
        raise ValueError(f"{len(values)} values but {codes.size} patient ids; one id per image")


def _check_iterations(iterations: int) -> None:
    if iterations < 1:
        raise ValueError(f"iterations must be at least 1, got {iterations}")


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
