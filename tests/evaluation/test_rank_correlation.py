"""Spearman's ρ with its bootstrap interval on known rankings."""

from __future__ import annotations

import numpy as np
import pytest

from edmcli.evaluation.metrics.rank_correlation import spearman_with_interval


def test_spearman_on_a_known_ranking():
    # d = rank differences (0, 1, 1, 1, 1): ρ = 1 − 6·Σd² / (n(n² − 1)) = 1 − 24/120 = 0.8
    est = spearman_with_interval([1, 2, 3, 4, 5], [1, 3, 2, 5, 4], iterations=500)
    assert est.rho == pytest.approx(0.8)
    assert -1.0 <= est.ci_low <= est.rho <= est.ci_high <= 1.0 and est.n == 5
    assert est.valid_resamples <= est.iterations == 500
    same = spearman_with_interval([1, 2, 3, 4, 5], [1, 3, 2, 5, 4], iterations=500)
    assert same == est  # seeded
    up = spearman_with_interval([1, 2, 3, 4], [10, 20, 35, 40])
    assert up.rho == pytest.approx(1.0) and up.ci_low == pytest.approx(1.0)
    down = spearman_with_interval([1, 2, 3, 4], [3, 2, 1, 0])
    assert down.rho == pytest.approx(-1.0) and down.ci_high == pytest.approx(-1.0)
    flat = spearman_with_interval([1, 2, 3], [5, 5, 5])
    assert np.isnan(flat.rho) and flat.valid_resamples == 0
    with pytest.raises(ValueError, match="at least 3"):
        spearman_with_interval([1, 2], [2, 1])
