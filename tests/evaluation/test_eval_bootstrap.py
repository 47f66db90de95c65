"""The paper's bootstrap: 80 % subsets without replacement, mean ± std, percentile interval."""

from __future__ import annotations

import numpy as np
import pytest

from edmcli.evaluation.bootstrap import (
    bootstrap_mean,
    bootstrap_statistic,
    subset_indices,
    subset_size,
)


def test_subsets_are_seeded_80_percent_draws_without_replacement():
    rows = subset_indices(50, 0.8, 300, seed=4)
    assert rows.shape == (300, 40) and subset_size(50) == 40
    assert all(len(set(r.tolist())) == 40 for r in rows)
    assert rows.min() >= 0 and rows.max() < 50
    np.testing.assert_array_equal(rows, subset_indices(50, 0.8, 300, seed=4))
    assert not np.array_equal(rows, subset_indices(50, 0.8, 300, seed=5))
    # Every image is drawn with probability 0.8.
    freq = np.bincount(rows.ravel(), minlength=50) / 300
    assert abs(freq.mean() - 0.8) < 1e-12 and freq.min() > 0.6


def test_std_matches_the_finite_population_closed_form():
    rng = np.random.default_rng(0)
    values = rng.normal(0.85, 0.05, size=60)
    n, k = 60, 48
    est = bootstrap_mean(values, 0.8, iterations=20000, seed=1)
    # Mean of k draws without replacement: Var = σ²/k · (n − k)/(n − 1), σ² the population
    # variance of the n values.
    expected = np.sqrt(values.var() / k * (n - k) / (n - 1))
    assert est.std == pytest.approx(expected, rel=0.03)
    assert est.mean == pytest.approx(values.mean(), abs=3 * expected / np.sqrt(20000) + 1e-12)
    assert est.value == pytest.approx(values.mean())
    assert est.ci_low < est.mean < est.ci_high
    # The 95 % percentile interval of a near-normal statistic is ≈ mean ± 1.96 std.
    assert est.ci_high - est.ci_low == pytest.approx(2 * 1.96 * expected, rel=0.06)
    assert (est.n, est.subset_size, est.iterations) == (60, 48, 20000)


def test_interval_is_the_percentiles_of_the_subset_means():
    values = np.arange(10, dtype=float)
    est = bootstrap_mean(values, 0.8, iterations=500, seed=2, confidence=0.9)
    means = values[subset_indices(10, 0.8, 500, seed=2)].mean(1)
    assert est.mean == pytest.approx(means.mean()) and est.std == pytest.approx(means.std())
    assert (est.ci_low, est.ci_high) == pytest.approx(tuple(np.percentile(means, [5, 95])))


def test_degenerate_cases():
    constant = bootstrap_mean(np.full(7, 0.9), iterations=50)
    assert (constant.mean, constant.std, constant.ci_low, constant.ci_high) == pytest.approx(
        (0.9, 0.0, 0.9, 0.9)
    )
    whole = bootstrap_mean(np.arange(5.0), fraction=1.0, iterations=20)
    assert whole.std == 0.0 and whole.mean == 2.0
    single = bootstrap_mean([1.0], iterations=10)
    assert single.subset_size == 1 and single.mean == 1.0


def test_same_subsets_make_a_paired_gap():
    rng = np.random.default_rng(3)
    a, b = rng.random(40), rng.random(40)
    gap = bootstrap_mean(a - b, iterations=200, seed=9)
    ea, eb = bootstrap_mean(a, iterations=200, seed=9), bootstrap_mean(b, iterations=200, seed=9)
    assert gap.mean == pytest.approx(ea.mean - eb.mean)
    assert gap.value == pytest.approx(ea.value - eb.value)


def test_any_statistic_on_the_same_subsets():
    values = np.random.default_rng(4).random(30)
    by_mean = bootstrap_mean(values, iterations=100, seed=6)
    by_fn = bootstrap_statistic(lambda idx: float(values[idx].mean()), 30, iterations=100, seed=6)
    assert by_fn.as_dict() == pytest.approx(by_mean.as_dict())
    median = bootstrap_statistic(lambda idx: float(np.median(values[idx])), 30, iterations=50)
    assert median.value == pytest.approx(np.median(values))


def test_bad_inputs():
    with pytest.raises(ValueError, match="finite"):
        bootstrap_mean([0.5, float("nan")])
    with pytest.raises(ValueError, match="at least one value"):
        bootstrap_mean([])
    with pytest.raises(ValueError, match="fraction"):
        subset_indices(10, 0.0)
    with pytest.raises(ValueError, match="iterations"):
        subset_indices(10, 0.8, 0)
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_mean([1.0, 2.0], confidence=1.0)
