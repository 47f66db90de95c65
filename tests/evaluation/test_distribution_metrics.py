"""The distribution distances on hand-made cases: Fréchet distance (closed form), KID
(hand-computed MMD²), precision / recall / density / coverage."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from edmcli.evaluation.metrics.distribution import (
    feature_statistics,
    frechet_distance,
    frechet_distance_from_features,
    kid,
    knn_radii,
    polynomial_mmd2_unbiased,
    prdc,
)


# --------------------------------------------------------------------------- Fréchet distance
def _plus_minus(scales: np.ndarray, dim: int, shift: np.ndarray | None = None) -> np.ndarray:
    """Rows ±s_i·e_i (i < len(scales)) in ``dim`` dimensions: mean exactly 0 (or ``shift``) and
    sample covariance exactly diag(2 s_i² / (n − 1)), n = 2·len(scales)."""
    rows = np.zeros((2 * len(scales), dim))
    for i, s in enumerate(scales):
        rows[2 * i, i], rows[2 * i + 1, i] = s, -s
    return rows + (0.0 if shift is None else shift)


def _closed_form_diagonal(mu1, var1, mu2, var2) -> float:
    """‖Δμ‖² + tr(Σ1 + Σ2 − 2(Σ1Σ2)^½) for diagonal Σ: ‖Δμ‖² + Σᵢ (√aᵢ − √bᵢ)²."""
    return float(np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2))


def test_frechet_distance_of_shifted_gaussians_is_the_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.5, 1.0, 0.0])
    var1, var2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    # by hand: ‖Δμ‖² = 2.25 + 0 + 4 = 6.25; Σ(√a − √b)² = 4 + 1 + 0 = 5
    assert _closed_form_diagonal(mu1, var1, mu2, var2) == pytest.approx(11.25)
    fd = frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2))
    assert fd == pytest.approx(11.25, rel=1e-12)
    assert frechet_distance(mu2, np.diag(var2), mu1, np.diag(var1)) == pytest.approx(fd)
    assert frechet_distance(mu1, np.diag(var1), mu1, np.diag(var1)) == pytest.approx(0, abs=1e-12)


@pytest.mark.parametrize("dim", [4, 60])  # the D × D route, and the low-rank route (n < D)
def test_frechet_distance_from_features_matches_the_closed_form(dim):
    s1, s2 = np.array([1.0, 2.0, 0.5]), np.array([3.0, 0.5, 0.5])
    shift = np.zeros(dim)
    shift[:2] = [0.7, -1.2]
    a, b = _plus_minus(s1, dim), _plus_minus(s2, dim, shift)
    var1 = np.zeros(dim)
    var2 = np.zeros(dim)
    var1[:3], var2[:3] = 2 * s1**2 / 5, 2 * s2**2 / 5  # n − 1 = 5
    expected = _closed_form_diagonal(np.zeros(dim), var1, shift, var2)
    assert frechet_distance_from_features(a, b) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance_from_features(a, a) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_routes_agree_with_scipy_sqrtm():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(40, 12)) @ rng.normal(size=(12, 12))
    b = rng.normal(size=(300, 12)) * 1.5 + 0.3
    mu1, s1 = feature_statistics(a)
    mu2, s2 = feature_statistics(b)
    reference = float(
        np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    )
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(reference, rel=1e-8)
    assert frechet_distance_from_features(a, b) == pytest.approx(reference, rel=1e-8)
    few = rng.normal(size=(10, 300))  # rank 9 covariances in 300 dimensions: no NaN
    assert np.isfinite(frechet_distance_from_features(few, few + 1.0))
    assert frechet_distance_from_features(few, few + 1.0) == pytest.approx(300.0, rel=1e-6)


def test_frechet_distance_refuses_bad_shapes():
    with pytest.raises(ValueError, match="do not match"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance_from_features(np.zeros((1, 3)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="non-finite"):
        frechet_distance_from_features(np.full((3, 2), np.nan), np.zeros((3, 2)))


# --------------------------------------------------------------------------- KID
def test_polynomial_mmd_by_hand():
    # k(u, v) = (uv + 1)³ in 1-D: k(0,1) = 1, k(1,2) = 27, Kxy = {1, 1, 8, 27} → mean 9.25
    x, y = np.array([[0.0], [1.0]]), np.array([[1.0], [2.0]])
    assert polynomial_mmd2_unbiased(x, y) == pytest.approx(1 + 27 - 2 * 9.25)


def test_polynomial_mmd_matches_a_double_loop():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(6, 3)), rng.normal(size=(5, 3)) + 0.5
    k = lambda u, v: (u @ v / 3 + 1) ** 3  # noqa: E731
    xx = np.mean([k(x[i], x[j]) for i in range(6) for j in range(6) if i != j])
    yy = np.mean([k(y[i], y[j]) for i in range(5) for j in range(5) if i != j])
    xy = np.mean([k(x[i], y[j]) for i in range(6) for j in range(5)])
    assert polynomial_mmd2_unbiased(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-12)


def test_kid_of_identical_sets_is_its_closed_form_and_vanishes_with_n():
    # One subset holding the whole set: x = y = A, and the unbiased MMD² reduces to
    # 2(S − T)/(N(N − 1)) − 2S/N² = −2 (mean diag K − mean K) / (N − 1), S = ΣK, T = tr K.
    rng = np.random.default_rng(2)
    values = []
    for n in (100, 1600):
        a = rng.normal(size=(n, 8))
        k = (a @ a.T / 8 + 1) ** 3
        expected = -2 * (np.diag(k).mean() - k.mean()) / (n - 1)
        got = kid(a, a, subsets=1, subset_size=n)
        assert got.mean == pytest.approx(expected, rel=1e-9)
        values.append(abs(got.mean))
    assert values[1] < values[0] / 8  # O(1/N): ≈ 0 for large identical sets


def test_kid_is_near_zero_for_one_distribution_and_grows_with_the_shift():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(400, 8)), rng.normal(size=(400, 8))
    same = kid(a, b, subsets=50, subset_size=200)
    near = kid(a, b + 0.25, subsets=50, subset_size=200)
    far = kid(a, b + 1.0, subsets=50, subset_size=200)
    assert abs(same.mean) < 0.1 * near.mean < near.mean < far.mean
    assert same.subset_size == 200 and same.subsets == 50
    assert kid(a, b, subsets=5, subset_size=10_000).subset_size == 400  # capped by the sets
    assert kid(a, b + 1.0, seed=3).mean == kid(a, b + 1.0, seed=3).mean  # seeded


# --------------------------------------------------------------------------- PRDC
def test_knn_radii_by_hand():
    points = np.array([[0.0], [1.0], [3.0]])
    assert knn_radii(points, 1).tolist() == [1.0, 1.0, 2.0]
    assert knn_radii(points, 2).tolist() == [3.0, 2.0, 3.0]
    assert knn_radii(points, 1, chunk=1).tolist() == [1.0, 1.0, 2.0]
    with pytest.raises(ValueError, match="more than k"):
        knn_radii(points, 3)


def test_prdc_on_hand_made_points():
    real = np.array([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [3.0, 0.0]])  # k = 1: real radii 1
    fake = np.array([[0.5, 0.0], [10.0, 0.0]])  # fake radii: 9.5 (each other)
    got = prdc(real, fake, k=1)
    # precision: 0.5 lies in the balls of reals 0 and 1, 10 in none → 1/2
    # recall: every real lies within 9.5 of fake 0.5 → 1 (one outlier inflates recall)
    # density: (2 + 0) / (k · 2) = 1; coverage: reals 0 and 1 have a fake in their ball → 1/2
    assert got == {"precision": 0.5, "recall": 1.0, "density": 1.0, "coverage": 0.5}


def test_prdc_identical_and_disjoint_sets():
    rng = np.random.default_rng(4)
    real = rng.normal(size=(60, 5))
    same = prdc(real, real.copy(), k=5)
    assert same["precision"] == same["recall"] == same["coverage"] == 1.0
    assert same["density"] >= 1.0  # each point sits in its own ball and in some neighbours'
    apart = prdc(real, real + 100.0, k=5)
    assert apart == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}
