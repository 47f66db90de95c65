"""Downstream metrics on hand-computed cases and against a brute-force Hausdorff reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from edmcli.evaluation.metrics import (
    accuracy,
    balanced_accuracy,
    classification_metrics,
    confusion_matrix,
    dice_per_structure,
    hausdorff_distance,
    image_diagonal,
    segmentation_metrics,
    to_scoring_labels,
)

H = W = 16


def _maps(*boxes_per_image):
    """Label maps (N, H, W) from boxes (label, r0, r1, c0, c1) per image, sector 4 elsewhere."""
    out = np.full((len(boxes_per_image), H, W), 4, dtype=np.int64)
    out[:, :, :2] = 0  # a strip outside the sector
    for i, boxes in enumerate(boxes_per_image):
        for label, r0, r1, c0, c1 in boxes:
            out[i, r0:r1, c0:c1] = label
    return out


def test_perfect_disjoint_and_partial_dice():
    target = _maps([(1, 2, 6, 4, 8), (2, 8, 10, 4, 8), (3, 12, 14, 4, 8)])
    np.testing.assert_allclose(dice_per_structure(target, target), [[1, 1, 1]])
    # LV moved away entirely: Dice 0; myocardium and LA untouched.
    disjoint = _maps([(1, 2, 6, 10, 14), (2, 8, 10, 4, 8), (3, 12, 14, 4, 8)])
    np.testing.assert_allclose(dice_per_structure(disjoint, target), [[0, 1, 1]])
    # LV 4×4 shifted by 2 columns: |X∩Y| = 8, |X| + |Y| = 32 → 0.5; LA 2×4 vs 2×2 inside:
    # 2·4 / (8 + 4) = 2/3.
    partial = _maps([(1, 2, 6, 6, 10), (2, 8, 10, 4, 8), (3, 12, 14, 4, 6)])
    np.testing.assert_allclose(dice_per_structure(partial, target), [[0.5, 1, 2 / 3]])


def test_dice_matches_the_set_formula_on_random_maps():
    rng = np.random.default_rng(0)
    pred = rng.integers(0, 5, (3, H, W))
    target = rng.integers(0, 5, (3, H, W))
    expected = np.zeros((3, 3))
    for i in range(3):
        for k, label in enumerate((1, 2, 3)):
            x, y = pred[i] == label, target[i] == label
            expected[i, k] = 2 * (x & y).sum() / (x.sum() + y.sum())
    np.testing.assert_allclose(dice_per_structure(pred, target), expected, rtol=1e-6)


def test_sector_and_outside_are_both_background():
    target = _maps([(1, 2, 6, 4, 8)])
    pred = target.copy()
    pred[pred == 4] = 0  # the whole sector predicted as outside: still perfect
    assert torch.equal(to_scoring_labels(pred), to_scoring_labels(target))
    np.testing.assert_allclose(dice_per_structure(pred, target), [[1, 1, 1]])


def test_empty_prediction_and_empty_ground_truth_are_not_perfect():
    target = _maps([(1, 2, 6, 4, 8)])  # LV only: myocardium and LA empty in the ground truth
    empty = _maps([])
    dice = dice_per_structure(empty, target)
    np.testing.assert_allclose(dice, [[0, 1, 1]])  # LV missed: 0; both empty: 1
    invented = _maps([(1, 2, 6, 4, 8), (3, 12, 14, 4, 8)])  # an LA the ground truth lacks
    np.testing.assert_allclose(dice_per_structure(invented, target), [[1, 1, 0]])
    hd, failed = hausdorff_distance(empty, target)
    assert failed.tolist() == [True] and hd[0] == pytest.approx(math.hypot(H - 1, W - 1))
    hd, failed = hausdorff_distance(target, empty)  # empty ground truth, LV predicted
    assert failed.tolist() == [True] and hd[0] == pytest.approx(math.hypot(H - 1, W - 1))
    hd, failed = hausdorff_distance(empty, empty)  # nothing to find, nothing found
    assert failed.tolist() == [False] and hd.tolist() == [0.0]
    hd95, _ = hausdorff_distance(empty, target, percentile=95)
    assert np.isfinite(hd95).all() and hd95[0] == pytest.approx(math.hypot(H - 1, W - 1))


def test_hausdorff_on_known_geometry():
    # Squares shifted by 3 columns: every boundary point moves by 3.
    a, b = _maps([(1, 4, 9, 3, 8)]), _maps([(1, 4, 9, 6, 11)])
    assert hausdorff_distance(a, b)[0][0] == pytest.approx(3.0)
    # Concentric squares 10×10 and 6×6: the outer corner is √8 from the inner corner.
    outer, inner = _maps([(1, 3, 13, 3, 13)]), _maps([(1, 5, 11, 5, 11)])
    assert hausdorff_distance(inner, outer)[0][0] == pytest.approx(math.sqrt(8))
    assert hausdorff_distance(outer, inner)[0][0] == pytest.approx(math.sqrt(8))
    assert hausdorff_distance(outer, outer)[0][0] == 0.0


def _brute_force_hd(pred, target, percentile=None, spacing=(1.0, 1.0)):
    def boundary(mask):
        return np.argwhere(mask & ~ndimage.binary_erosion(mask)) * np.asarray(spacing)

    p, t = boundary(pred == 1), boundary(target == 1)
    d = np.sqrt(((p[:, None, :] - t[None, :, :]) ** 2).sum(-1))
    directed = [d.min(1), d.min(0)]
    if percentile is None:
        return max(x.max() for x in directed)
    return max(np.percentile(x, percentile) for x in directed)


@pytest.mark.parametrize("percentile", [None, 95])
def test_hausdorff_matches_a_brute_force_reference(percentile):
    rng = np.random.default_rng(1)
    pred, target = np.zeros((2, H, W), np.int64), np.zeros((2, H, W), np.int64)
    for m in (pred, target):
        for i in range(2):
            blob = ndimage.binary_dilation(rng.random((H, W)) > 0.93, iterations=2)
            m[i][blob] = 1
    spacing = np.array([[0.5, 2.0], [1.5, 0.25]])
    hd, failed = hausdorff_distance(pred, target, percentile=percentile, spacing=spacing)
    assert not failed.any()
    for i in range(2):
        expected = _brute_force_hd(pred[i], target[i], percentile, spacing[i])
        assert hd[i] == pytest.approx(expected, rel=1e-5)


def test_spacing_gives_millimetres_row_then_column():
    a = _maps([(1, 4, 9, 3, 8)])
    right, down = _maps([(1, 4, 9, 5, 10)]), _maps([(1, 6, 11, 3, 8)])
    assert hausdorff_distance(a, right, spacing=(2.0, 0.5))[0][0] == pytest.approx(1.0)
    assert hausdorff_distance(a, down, spacing=(2.0, 0.5))[0][0] == pytest.approx(4.0)
    assert image_diagonal((H, W), (2.0, 0.5)) == pytest.approx(math.hypot(30, 7.5))
    hd, failed = hausdorff_distance(_maps([]), a, spacing=(2.0, 0.5))
    assert failed[0] and hd[0] == pytest.approx(math.hypot(30, 7.5))
    with pytest.raises(ValueError, match="spacing must be finite"):
        hausdorff_distance(a, a, spacing=(float("nan"), 1.0))


def test_segmentation_metrics_bundle():
    target = _maps([(1, 2, 6, 4, 8), (2, 8, 10, 4, 8)], [(1, 2, 6, 4, 8)])
    pred = _maps([(1, 2, 6, 4, 8), (2, 8, 10, 4, 8)], [])
    m = segmentation_metrics(pred, target, spacing=np.full((2, 2), 0.5))
    np.testing.assert_allclose(m["dice_lv_endocardium"], [1, 0])
    np.testing.assert_allclose(m["dice_mean"], [1, 2 / 3])  # (0 + 1 + 1) / 3
    assert m["hd_failed"].tolist() == [False, True]
    np.testing.assert_allclose(m["hd_lv_mm"], 0.5 * m["hd_lv_px"])
    assert "hd_lv_mm" not in segmentation_metrics(pred, target)


def test_bad_segmentation_inputs():
    a = _maps([])
    with pytest.raises(ValueError, match="must both be"):
        dice_per_structure(a, a[:, :8])
    with pytest.raises(ValueError, match="ids in 0..4"):
        dice_per_structure(a + 5, a)
    with pytest.raises(ValueError, match="integers"):
        dice_per_structure(a.astype(np.float32), a)


def test_confusion_matrix_accuracy_balanced_accuracy():
    pred, target = [0, 0, 1, 1, 1], [0, 1, 1, 1, 1]
    np.testing.assert_array_equal(confusion_matrix(pred, target), [[1, 0], [1, 3]])
    assert accuracy(pred, target) == pytest.approx(4 / 5)
    assert balanced_accuracy(pred, target) == pytest.approx((1 / 1 + 3 / 4) / 2)
    # Always answering the majority class: accuracy flatters, balanced accuracy does not.
    assert accuracy([1] * 5, target) == pytest.approx(0.8)
    assert balanced_accuracy([1] * 5, target) == pytest.approx(0.5)
    # A class absent from the ground truth has no recall: only present classes count.
    assert balanced_accuracy([1, 0, 1], [1, 1, 1]) == pytest.approx(2 / 3)
    m = classification_metrics(pred, target)
    assert m["correct"].tolist() == [1, 0, 1, 1, 1] and m["accuracy"] == pytest.approx(0.8)
    with pytest.raises(ValueError, match="outside 0..1"):
        accuracy([0, 2], [0, 1])
    with pytest.raises(ValueError, match="no predictions"):
        accuracy([], [])
