"""The pure quality metrics on hand-made cases: Fréchet distance (closed form), KID (hand-computed
MMD²), precision / recall / density / coverage, batched Hausdorff (against MONAI), pairwise
diversity and Spearman's ρ with its bootstrap interval."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.linalg
import torch

from edmcli.evaluation import quality as q


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
    fd = q.frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2))
    assert fd == pytest.approx(11.25, rel=1e-12)
    assert q.frechet_distance(mu2, np.diag(var2), mu1, np.diag(var1)) == pytest.approx(fd)
    assert q.frechet_distance(mu1, np.diag(var1), mu1, np.diag(var1)) == pytest.approx(0, abs=1e-12)


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
    assert q.frechet_distance_from_features(a, b) == pytest.approx(expected, rel=1e-9)
    assert q.frechet_distance_from_features(a, a) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_routes_agree_with_scipy_sqrtm():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(40, 12)) @ rng.normal(size=(12, 12))
    b = rng.normal(size=(300, 12)) * 1.5 + 0.3
    mu1, s1 = q.feature_statistics(a)
    mu2, s2 = q.feature_statistics(b)
    reference = float(
        np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    )
    assert q.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(reference, rel=1e-8)
    assert q.frechet_distance_from_features(a, b) == pytest.approx(reference, rel=1e-8)
    few = rng.normal(size=(10, 300))  # rank 9 covariances in 300 dimensions: no NaN
    assert np.isfinite(q.frechet_distance_from_features(few, few + 1.0))
    assert q.frechet_distance_from_features(few, few + 1.0) == pytest.approx(300.0, rel=1e-6)


def test_frechet_distance_refuses_bad_shapes():
    with pytest.raises(ValueError, match="do not match"):
        q.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="at least 2"):
        q.frechet_distance_from_features(np.zeros((1, 3)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="non-finite"):
        q.frechet_distance_from_features(np.full((3, 2), np.nan), np.zeros((3, 2)))


# --------------------------------------------------------------------------- KID
def test_polynomial_mmd_by_hand():
    # k(u, v) = (uv + 1)³ in 1-D: k(0,1) = 1, k(1,2) = 27, Kxy = {1, 1, 8, 27} → mean 9.25
    x, y = np.array([[0.0], [1.0]]), np.array([[1.0], [2.0]])
    assert q.polynomial_mmd2_unbiased(x, y) == pytest.approx(1 + 27 - 2 * 9.25)


def test_polynomial_mmd_matches_a_double_loop():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(6, 3)), rng.normal(size=(5, 3)) + 0.5
    k = lambda u, v: (u @ v / 3 + 1) ** 3  # noqa: E731
    xx = np.mean([k(x[i], x[j]) for i in range(6) for j in range(6) if i != j])
    yy = np.mean([k(y[i], y[j]) for i in range(5) for j in range(5) if i != j])
    xy = np.mean([k(x[i], y[j]) for i in range(6) for j in range(5)])
    assert q.polynomial_mmd2_unbiased(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-12)


def test_kid_of_identical_sets_is_its_closed_form_and_vanishes_with_n():
    # One subset holding the whole set: x = y = A, and the unbiased MMD² reduces to
    # 2(S − T)/(N(N − 1)) − 2S/N² = −2 (mean diag K − mean K) / (N − 1), S = ΣK, T = tr K.
    rng = np.random.default_rng(2)
    values = []
    for n in (100, 1600):
        a = rng.normal(size=(n, 8))
        k = (a @ a.T / 8 + 1) ** 3
        expected = -2 * (np.diag(k).mean() - k.mean()) / (n - 1)
        got = q.kid(a, a, subsets=1, subset_size=n)
        assert got.mean == pytest.approx(expected, rel=1e-9)
        values.append(abs(got.mean))
    assert values[1] < values[0] / 8  # O(1/N): ≈ 0 for large identical sets


def test_kid_is_near_zero_for_one_distribution_and_grows_with_the_shift():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(400, 8)), rng.normal(size=(400, 8))
    same = q.kid(a, b, subsets=50, subset_size=200)
    near = q.kid(a, b + 0.25, subsets=50, subset_size=200)
    far = q.kid(a, b + 1.0, subsets=50, subset_size=200)
    assert abs(same.mean) < 0.1 * near.mean < near.mean < far.mean
    assert same.subset_size == 200 and same.subsets == 50
    assert q.kid(a, b, subsets=5, subset_size=10_000).subset_size == 400  # capped by the sets
    assert q.kid(a, b + 1.0, seed=3).mean == q.kid(a, b + 1.0, seed=3).mean  # seeded


# --------------------------------------------------------------------------- PRDC
def test_knn_radii_by_hand():
    points = np.array([[0.0], [1.0], [3.0]])
    assert q.knn_radii(points, 1).tolist() == [1.0, 1.0, 2.0]
    assert q.knn_radii(points, 2).tolist() == [3.0, 2.0, 3.0]
    assert q.knn_radii(points, 1, chunk=1).tolist() == [1.0, 1.0, 2.0]
    with pytest.raises(ValueError, match="more than k"):
        q.knn_radii(points, 3)


def test_prdc_on_hand_made_points():
    real = np.array([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [3.0, 0.0]])  # k = 1: real radii 1
    fake = np.array([[0.5, 0.0], [10.0, 0.0]])  # fake radii: 9.5 (each other)
    got = q.prdc(real, fake, k=1)
    # precision: 0.5 lies in the balls of reals 0 and 1, 10 in none → 1/2
    # recall: every real lies within 9.5 of fake 0.5 → 1 (one outlier inflates recall)
    # density: (2 + 0) / (k · 2) = 1; coverage: reals 0 and 1 have a fake in their ball → 1/2
    assert got == {"precision": 0.5, "recall": 1.0, "density": 1.0, "coverage": 0.5}


def test_prdc_identical_and_disjoint_sets():
    rng = np.random.default_rng(4)
    real = rng.normal(size=(60, 5))
    same = q.prdc(real, real.copy(), k=5)
    assert same["precision"] == same["recall"] == same["coverage"] == 1.0
    assert same["density"] >= 1.0  # each point sits in its own ball and in some neighbours'
    apart = q.prdc(real, real + 100.0, k=5)
    assert apart == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


# --------------------------------------------------------------------------- Hausdorff
def test_mask_edges_are_the_inner_boundary():
    m = torch.zeros(1, 5, 5, dtype=torch.bool)
    m[0, 1:4, 1:4] = True
    edges = q.mask_edges(m)[0]
    assert edges.sum() == 8 and not edges[2, 2]  # a ring around the centre
    m[0, 0:3, 0:3] = True  # touching the border: border pixels are edges (border value 0)
    assert q.mask_edges(m)[0, 0, 1]


def test_hausdorff_by_hand():
    a = torch.zeros(2, 9, 9, dtype=torch.bool)
    b = torch.zeros(2, 9, 9, dtype=torch.bool)
    a[0, 2, 2], b[0, 2, 5] = True, True  # single pixels 3 apart
    a[1, 2:5, 2:5], b[1, 2:5, 4:7] = True, True  # a 3×3 square moved by 2 columns
    assert q.hausdorff_percentile(a, b, None).tolist() == [3.0, 2.0]
    assert q.hausdorff_percentile(a, b, None, spacing=(1.0, 0.5)).tolist() == [1.5, 1.0]
    b[1] = False
    assert np.isnan(q.hausdorff_percentile(a, b, 95)[1])  # an empty mask: the caller decides


def test_batched_hausdorff_matches_monai():
    from monai.metrics import compute_hausdorff_distance

    g = torch.Generator().manual_seed(5)
    x = torch.nn.functional.avg_pool2d(torch.rand(20, 1, 24, 24, generator=g), 5, 1, 2)[:, 0]
    a, b = x > 0.52, torch.roll(x, 2, 1) > 0.5
    a[0, :4] = True  # a mask on the border
    for percentile in (95, None):
        mine = q.hausdorff_percentile(a, b, percentile, spacing=(0.5, 0.3))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = compute_hausdorff_distance(
                a[:, None].float(), b[:, None].float(), include_background=True,
                percentile=percentile, spacing=(0.5, 0.3),
            )[:, 0].numpy()  # fmt: skip
        both = a.flatten(1).any(1).numpy() & b.flatten(1).any(1).numpy()
        assert both.sum() > 15
        np.testing.assert_allclose(mine[both], ref[both], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- diversity
def test_group_pairs_by_hand():
    first, second = q.group_pairs(np.array([3, 1, 3, 1, 2, 3]))
    pairs = sorted(zip(first.tolist(), second.tolist(), strict=True))
    assert pairs == [(0, 2), (0, 5), (1, 3), (2, 5)]
    assert len(q.group_pairs(np.arange(4))[0]) == 0


def test_pairwise_diversity_of_copies_is_zero_and_of_noise_is_not():
    g = torch.Generator().manual_seed(6)
    base = torch.rand(4, 1, 16, 16, generator=g)
    copies = base.repeat_interleave(3, 0)  # three identical samples per group
    groups = np.repeat(np.arange(4), 3)
    for distance in ("ssim", "rms"):
        est = q.pairwise_diversity(copies, groups, distance=distance)
        assert est.mean == pytest.approx(0.0, abs=1e-6) and est.pairs == 12 and est.groups == 4
        noisy = (copies + 0.2 * torch.rand(copies.shape, generator=g)).clamp(0, 1)
        assert q.pairwise_diversity(noisy, groups, distance=distance).mean > 0.02
    assert q.pairwise_diversity(base, np.arange(4)) is None  # no group holds two images


def test_rms_distance_by_hand_and_masking():
    a = torch.zeros(1, 1, 8, 8)
    b = torch.full((1, 1, 8, 8), 0.5)
    b[..., :4] = 1.0  # differs more on the left half
    right = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    right[..., 4:] = True
    assert q.masked_rms_distance(a, b, right).item() == pytest.approx(0.5)
    assert q.masked_rms_distance(a, b, ~right).item() == pytest.approx(1.0)
    assert q.masked_ssim_distance(b, b, right).item() == pytest.approx(0.0, abs=1e-6)
    assert np.isnan(q.masked_rms_distance(a, b, torch.zeros_like(right)).item())


# --------------------------------------------------------------------------- Spearman
def test_spearman_on_a_known_ranking():
    # d = rank differences (0, 1, 1, 1, 1): ρ = 1 − 6·Σd² / (n(n² − 1)) = 1 − 24/120 = 0.8
    est = q.spearman_with_interval([1, 2, 3, 4, 5], [1, 3, 2, 5, 4], iterations=500)
    assert est.rho == pytest.approx(0.8)
    assert -1.0 <= est.ci_low <= est.rho <= est.ci_high <= 1.0 and est.n == 5
    assert est.valid_resamples <= est.iterations == 500
    same = q.spearman_with_interval([1, 2, 3, 4, 5], [1, 3, 2, 5, 4], iterations=500)
    assert same == est  # seeded
    up = q.spearman_with_interval([1, 2, 3, 4], [10, 20, 35, 40])
    assert up.rho == pytest.approx(1.0) and up.ci_low == pytest.approx(1.0)
    down = q.spearman_with_interval([1, 2, 3, 4], [3, 2, 1, 0])
    assert down.rho == pytest.approx(-1.0) and down.ci_high == pytest.approx(-1.0)
    flat = q.spearman_with_interval([1, 2, 3], [5, 5, 5])
    assert np.isnan(flat.rho) and flat.valid_resamples == 0
    with pytest.raises(ValueError, match="at least 3"):
        q.spearman_with_interval([1, 2], [2, 1])


def test_lpips_distance_averages_its_map_over_the_mask():
    class AbsMap(torch.nn.Module):  # stands in for MaskedLPIPS: a per-pixel distance map
        def __init__(self) -> None:
            super().__init__()
            self.unused = torch.nn.Parameter(torch.zeros(()))

        def forward(self, a, b, sector):
            return (a - b).abs() * sector

    a = torch.zeros(2, 1, 4, 4)
    b = torch.ones(2, 1, 4, 4)
    b[1, ..., :2] = 3.0
    mask = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    mask[..., :2] = True
    fn = q.lpips_distance(AbsMap())
    assert q.distance_name(fn) == "lpips"
    assert fn(a, b, mask).tolist() == [1.0, 3.0]
    est = q.pairwise_diversity(torch.cat([a, b]), np.array([0, 1, 0, 1]), distance=fn)
    assert est.distance == "lpips" and est.mean == pytest.approx((1.0 + 2.0) / 2)  # no mask: all
