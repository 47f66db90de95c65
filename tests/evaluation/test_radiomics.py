"""The radiomic features on hand-made cases: first order against numpy / scipy on the masked
pixels, the GLCM against a slow pixel-loop reference and a count by hand, the gradient of a
ramp, masks, batching, speckle against blur, broken masks and constant regions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.ndimage
import scipy.stats
import torch

from edmcli.evaluation.metrics.radiomics import (
    FEATURE_NAMES,
    FIRST_ORDER_NAMES,
    GLCM_DISTANCES,
    GLCM_NAMES,
    GREY_LEVELS,
    radiomics_features,
)


def _column(name: str) -> int:
    return FEATURE_NAMES.index(name)


def _glcm_columns(d: int) -> list[int]:
    return [_column(f"glcm_{name}_d{d}") for name in GLCM_NAMES]


def _sector(h: int, w: int) -> np.ndarray:
    """A fan-shaped bool mask with its apex at the top centre, like an ultrasound sector."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    dx, dy = x - (w - 1) / 2, y + 1.0
    return (np.hypot(dx, dy) < 0.95 * h) & (np.abs(np.arctan2(dx, dy)) < math.radians(40))


# --------------------------------------------------------------------------- slow references
def _reference_glcm(levels: np.ndarray, mask: np.ndarray, d: int) -> np.ndarray:
    """Symmetric co-occurrence counts by a loop over the pixels and their 8 neighbours at
    distance d (0°, 45°, 90°, 135° in both directions), both pixels in the mask."""
    h, w = levels.shape
    counts = np.zeros((GREY_LEVELS, GREY_LEVELS))
    for y in range(h):
        for x in range(w):
            if not mask[y, x]:
                continue
            for dy, dx in ((0, d), (0, -d), (d, 0), (-d, 0), (d, d), (-d, -d), (d, -d), (-d, d)):
                yy, xx = y + dy, x + dx
                if 0 <= yy < h and 0 <= xx < w and mask[yy, xx]:
                    counts[levels[y, x], levels[yy, xx]] += 1
    return counts


def _reference_glcm_features(counts: np.ndarray) -> list[float]:
    """The GLCM features of GLCM_NAMES by explicit loops over (i, j), levels 1 … L."""
    p = counts / counts.sum()
    n = len(p)
    mu = sum((i + 1) * p[i, j] for i in range(n) for j in range(n))
    mu_j = sum((j + 1) * p[i, j] for i in range(n) for j in range(n))
    var = sum((i + 1 - mu) ** 2 * p[i, j] for i in range(n) for j in range(n))
    var_j = sum((j + 1 - mu_j) ** 2 * p[i, j] for i in range(n) for j in range(n))
    cov = sum((i + 1 - mu) * (j + 1 - mu_j) * p[i, j] for i in range(n) for j in range(n))
    out = dict.fromkeys(GLCM_NAMES, 0.0)
    for i in range(n):
        for j in range(n):
            if p[i, j] == 0:
                continue
            out["contrast"] += (i - j) ** 2 * p[i, j]
            out["dissimilarity"] += abs(i - j) * p[i, j]
            out["homogeneity"] += p[i, j] / (1 + abs(i - j))
            out["asm"] += p[i, j] ** 2
            out["joint_entropy"] -= p[i, j] * math.log2(p[i, j])
            out["cluster_shade"] += (i + j + 2 - mu - mu_j) ** 3 * p[i, j]
            out["cluster_prominence"] += (i + j + 2 - mu - mu_j) ** 4 * p[i, j]
    out["correlation"] = cov / math.sqrt(var * var_j) if var * var_j > 0 else 0.0
    return [out[name] for name in GLCM_NAMES]


# --------------------------------------------------------------------------- tests
def test_feature_names_and_shapes():
    assert len(FEATURE_NAMES) == len(set(FEATURE_NAMES)) == 16 + 8 * len(GLCM_DISTANCES) == 40
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 1, 12, 12, generator=g)
    masks = torch.ones(3, 12, 12, dtype=torch.bool)
    four_d = radiomics_features(images, masks)
    assert four_d.shape == (3, 40) and four_d.dtype == np.float64
    np.testing.assert_array_equal(four_d, radiomics_features(images[:, 0], masks))


def test_first_order_features_match_numpy_and_scipy():
    rng = np.random.default_rng(1)
    image = rng.beta(2.0, 5.0, size=(15, 13))
    mask = _sector(15, 13)
    v = image[mask]
    features = dict(zip(FEATURE_NAMES, radiomics_features(image[None], mask[None])[0], strict=True))
    p10, p25, p50, p75, p90 = np.percentile(v, [10, 25, 50, 75, 90])
    inner = v[(v >= p10) & (v <= p90)]
    hist = np.histogram(v, bins=GREY_LEVELS, range=(0.0, 1.0))[0] / v.size
    hist = hist[hist > 0]
    expected = {
        "firstorder_mean": v.mean(),
        "firstorder_std": v.std(),
        "firstorder_skewness": scipy.stats.skew(v),
        "firstorder_kurtosis": scipy.stats.kurtosis(v, fisher=True),
        "firstorder_p10": p10,
        "firstorder_p25": p25,
        "firstorder_p50": p50,
        "firstorder_p75": p75,
        "firstorder_p90": p90,
        "firstorder_iqr": p75 - p25,
        "firstorder_mad": np.abs(v - v.mean()).mean(),
        "firstorder_robust_mad": np.abs(inner - inner.mean()).mean(),
        "firstorder_entropy": -(hist * np.log2(hist)).sum(),
        "firstorder_uniformity": (hist**2).sum(),
    }
    assert set(expected) == set(FIRST_ORDER_NAMES)
    for name, value in expected.items():
        assert features[name] == pytest.approx(value, rel=1e-10, abs=1e-12), name


def test_glcm_of_stripes_by_hand_and_by_pixel_loops():
    # columns alternate between levels 3 (0.1) and 19 (0.6); d = 1 by hand: 0° gives 30
    # unlike pairs, 90° 15 (3, 3) and 15 (19, 19) pairs, 45° and 135° 25 unlike pairs each:
    # symmetric counts (3, 19) = (19, 3) = 80, (3, 3) = (19, 19) = 30, total 220
    image = np.tile(np.array([0.1, 0.6]), (6, 3))
    assert image.shape == (6, 6)
    levels = np.floor(image * GREY_LEVELS).astype(int)
    assert set(levels.ravel()) == {3, 19}
    mask = np.ones((6, 6), dtype=bool)
    counts = _reference_glcm(levels, mask, 1)
    assert counts[3, 19] == counts[19, 3] == 80 and counts[3, 3] == counts[19, 19] == 30
    features = radiomics_features(image[None], mask[None])[0]
    glcm_d1 = dict(zip(GLCM_NAMES, features[_glcm_columns(1)], strict=True))
    assert glcm_d1["contrast"] == pytest.approx(2 * 80 / 220 * 16**2)
    assert glcm_d1["dissimilarity"] == pytest.approx(2 * 80 / 220 * 16)
    assert glcm_d1["homogeneity"] == pytest.approx(60 / 220 + 160 / 220 / 17)
    assert glcm_d1["asm"] == pytest.approx(2 * (80 / 220) ** 2 + 2 * (30 / 220) ** 2)
    assert glcm_d1["correlation"] == pytest.approx((60 - 160) / 220)  # ±8 about μ = 11
    assert glcm_d1["cluster_shade"] == pytest.approx(0.0, abs=1e-9)  # symmetric about 2μ
    for d in GLCM_DISTANCES:
        expected = _reference_glcm_features(_reference_glcm(levels, mask, d))
        np.testing.assert_allclose(features[_glcm_columns(d)], expected, rtol=1e-10, atol=1e-10)


def test_glcm_counts_only_pairs_inside_an_irregular_mask():
    rng = np.random.default_rng(2)
    image = rng.random((2, 11, 9))
    masks = np.stack([_sector(11, 9), rng.random((11, 9)) < 0.7])
    features = radiomics_features(image, masks)
    levels = np.minimum(np.floor(image * GREY_LEVELS), GREY_LEVELS - 1).astype(int)
    for k in range(2):
        for d in GLCM_DISTANCES:
            expected = _reference_glcm_features(_reference_glcm(levels[k], masks[k], d))
            np.testing.assert_allclose(
                features[k, _glcm_columns(d)], expected, rtol=1e-10, atol=1e-10
            )


def test_gradient_of_a_ramp():
    image = np.tile(np.arange(10) * 0.05, (8, 1))[None]  # ∂x = 0.05 per pixel, ∂y = 0
    features = radiomics_features(image, np.ones_like(image, dtype=bool))[0]
    assert features[_column("gradient_mean")] == pytest.approx(0.05)
    assert features[_column("gradient_std")] == pytest.approx(0.0, abs=1e-12)


def test_pixels_outside_the_mask_change_nothing():
    rng = np.random.default_rng(3)
    image = rng.random((3, 20, 18))
    masks = np.broadcast_to(_sector(20, 18), image.shape)
    other = np.where(masks, image, rng.random(image.shape))
    other[:, 0, 0] = np.nan  # outside the sector: never read
    assert not masks[:, 0, 0].any()
    np.testing.assert_allclose(
        radiomics_features(image, masks), radiomics_features(other, masks), rtol=1e-12, atol=0
    )


def test_features_do_not_depend_on_the_batch_size():
    g = torch.Generator().manual_seed(4)
    images = torch.rand(5, 1, 16, 16, generator=g) ** 2
    masks = torch.rand(5, 16, 16, generator=g) < 0.8
    np.testing.assert_allclose(
        radiomics_features(images, masks, batch=2),
        radiomics_features(images, masks, batch=256),
        rtol=1e-12,
        atol=1e-15,
    )


def test_speckle_and_blurred_speckle_have_different_texture():
    rng = np.random.default_rng(5)
    speckle = np.clip(rng.rayleigh(0.2, size=(4, 48, 48)), 0.0, 1.0)
    blurred = scipy.ndimage.gaussian_filter(speckle, sigma=(0, 2, 2))
    masks = np.broadcast_to(_sector(48, 48), speckle.shape)
    a, b = radiomics_features(speckle, masks), radiomics_features(blurred, masks)
    for d in GLCM_DISTANCES[:2]:
        contrast, homogeneity = _column(f"glcm_contrast_d{d}"), _column(f"glcm_homogeneity_d{d}")
        assert a[:, contrast].min() > 10 * b[:, contrast].max()
        assert a[:, homogeneity].max() < b[:, homogeneity].min() - 0.2
    assert a[:, _column("gradient_mean")].min() > 3 * b[:, _column("gradient_mean")].max()


def test_broken_masks_and_unscaled_images_raise():
    images = torch.rand(3, 10, 10)
    masks = torch.ones(3, 10, 10, dtype=torch.bool)
    masks[0] = False  # empty
    masks[2] = False
    masks[2, 4, 4:6] = True  # two pixels, one pair at distance 1, none further
    with pytest.raises(ValueError, match="2 of 3 images"):
        radiomics_features(images, masks)
    full = torch.ones(3, 10, 10, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"1 of 3 images .*\[0, 1\]"):
        radiomics_features(torch.cat([images[:2], images[2:] * 2 - 1]), full)
    with pytest.raises(ValueError, match="bool"):
        radiomics_features(images, full.float())
    with pytest.raises(ValueError, match="do not match"):
        radiomics_features(images, full[:, :9])


def test_constant_image_gives_finite_features():
    features = radiomics_features(torch.full((2, 1, 12, 12), 0.5), torch.ones(2, 12, 12).bool())
    assert np.all(np.isfinite(features))
    row = dict(zip(FEATURE_NAMES, features[0], strict=True))
    for name in ("std", "skewness", "kurtosis", "iqr", "mad", "robust_mad", "entropy"):
        assert row[f"firstorder_{name}"] == 0.0, name
    assert row["firstorder_mean"] == row["firstorder_p50"] == 0.5
    assert row["firstorder_uniformity"] == 1.0
    for d in GLCM_DISTANCES:
        assert row[f"glcm_correlation_d{d}"] == 0.0 and row[f"glcm_contrast_d{d}"] == 0.0
        assert row[f"glcm_asm_d{d}"] == 1.0 and row[f"glcm_joint_entropy_d{d}"] == 0.0
