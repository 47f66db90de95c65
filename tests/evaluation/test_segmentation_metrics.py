"""Segmentation metrics on hand-computed cases, against a brute-force Hausdorff reference, and the
batched versions (Dice, HD95, percentile Hausdorff) against the per-image ones and MONAI."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from edmcli.evaluation.metrics.segmentation import (
    dice_per_structure,
    hausdorff_distance,
    hausdorff_percentile,
    image_diagonal,
    mask_edges,
    segmentation_metrics,
    structure_dice,
    structure_hd95,
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


# --------------------------------------------------------------------------- batched
def test_mask_edges_are_the_inner_boundary():
    m = torch.zeros(1, 5, 5, dtype=torch.bool)
    m[0, 1:4, 1:4] = True
    edges = mask_edges(m)[0]
    assert edges.sum() == 8 and not edges[2, 2]  # a ring around the centre
    m[0, 0:3, 0:3] = True  # touching the border: border pixels are edges (border value 0)
    assert mask_edges(m)[0, 0, 1]


def test_hausdorff_by_hand():
    a = torch.zeros(2, 9, 9, dtype=torch.bool)
    b = torch.zeros(2, 9, 9, dtype=torch.bool)
    a[0, 2, 2], b[0, 2, 5] = True, True  # single pixels 3 apart
    a[1, 2:5, 2:5], b[1, 2:5, 4:7] = True, True  # a 3×3 square moved by 2 columns
    assert hausdorff_percentile(a, b, None).tolist() == [3.0, 2.0]
    assert hausdorff_percentile(a, b, None, spacing=(1.0, 0.5)).tolist() == [1.5, 1.0]
    b[1] = False
    assert np.isnan(hausdorff_percentile(a, b, 95)[1])  # an empty mask: the caller decides


def test_batched_hausdorff_matches_monai():
    from monai.metrics import compute_hausdorff_distance

    g = torch.Generator().manual_seed(5)
    x = torch.nn.functional.avg_pool2d(torch.rand(20, 1, 24, 24, generator=g), 5, 1, 2)[:, 0]
    a, b = x > 0.52, torch.roll(x, 2, 1) > 0.5
    a[0, :4] = True  # a mask on the border
    for percentile in (95, None):
        mine = hausdorff_percentile(a, b, percentile, spacing=(0.5, 0.3))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = compute_hausdorff_distance(
                a[:, None].float(), b[:, None].float(), include_background=True,
                percentile=percentile, spacing=(0.5, 0.3),
            )[:, 0].numpy()  # fmt: skip
        both = a.flatten(1).any(1).numpy() & b.flatten(1).any(1).numpy()
        assert both.sum() > 15
        np.testing.assert_allclose(mine[both], ref[both], rtol=1e-5, atol=1e-5)


def test_fast_dice_and_hd95_equal_the_downstream_metrics():
    g = torch.Generator().manual_seed(0)
    x = F.avg_pool2d(torch.rand(12, 1, 20, 20, generator=g), 5, 1, 2)[:, 0]
    a = (x * 12).long() % 5
    b = torch.roll(a, 1, 2)
    a[0], b[0] = 0, 0  # both empty
    a[1] = 4  # only the sector: every structure missing from the prediction
    np.testing.assert_allclose(structure_dice(a, b), dice_per_structure(a, b), atol=1e-12)
    values, failed = structure_hd95(a, b)
    for name, structure in (("lv_endocardium", 1), ("lv_myocardium", 2), ("left_atrium", 3)):
        ref, ref_failed = hausdorff_distance(a, b, structure, percentile=95)
        np.testing.assert_allclose(values[name], ref, rtol=1e-5, atol=1e-5)
        assert (failed[name] == ref_failed).all()
