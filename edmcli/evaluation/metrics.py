"""Downstream metrics: Dice per structure, Hausdorff distance of the LV endocardium, and the
view classifier's accuracy, balanced accuracy and confusion matrix (paper eqs. 16–18).

Scoring classes follow CAMUS: 0 background (labels 0 *outside* and 4 *sector* merged), 1 LV
endocardium, 2 LV myocardium, 3 left atrium. Dice and Hausdorff distances come from MONAI
(``compute_dice``, ``compute_hausdorff_distance``; HD on the structures' boundary pixels,
Euclidean, optionally in mm through the pixel spacing).

Empty masks (a structure absent from the prediction, the ground truth or both) never crash and
never count as perfect by accident:

* Dice of a structure: 0 when exactly one of prediction and ground truth is empty (nothing
  found, or a structure invented), 1 when both are empty (nothing to find, nothing found).
* Hausdorff distance (max and 95th percentile): 0 when both are empty. When exactly one is empty
  the distance is undefined (MONAI gives inf or NaN); it is replaced by a *penalty*, the image
  diagonal (the largest distance two pixels of the image can have, in pixels or in mm), and the
  image is counted as a Hausdorff failure (``hd_failed``), so means stay finite for the
  bootstrap and a model that predicts nothing is scored as the worst possible one.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.metrics import compute_dice, compute_hausdorff_distance

from edmcli.data.labels import LA, LV, MYO, OUTSIDE, SECTOR

SCORING_CLASSES = 4  # background (outside + sector), LV endocardium, myocardium, LA
STRUCTURES: dict[str, int] = {"lv_endocardium": LV, "lv_myocardium": MYO, "left_atrium": LA}
STRUCTURE_SHORT: dict[str, str] = {
    "lv_endocardium": "LV",
    "lv_myocardium": "Myo",
    "left_atrium": "LA",
}


def to_scoring_labels(labels: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Store labels (ids 0–4) → scoring classes 0–3: *outside* and *sector* become background.

    Labels already in 0–3 are returned unchanged (as an int64 tensor).
    """
    labels = torch.as_tensor(np.asarray(labels) if isinstance(labels, np.ndarray) else labels)
    if labels.is_floating_point():
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    labels = labels.long()
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > SECTOR):
        raise ValueError(f"labels must be ids in 0..{SECTOR}, got {labels.unique().tolist()}")
    return torch.where(labels == SECTOR, torch.full_like(labels, OUTSIDE), labels)


def _pair(pred, target) -> tuple[torch.Tensor, torch.Tensor]:
    pred, target = to_scoring_labels(pred), to_scoring_labels(target)
    if pred.ndim != 3 or pred.shape != target.shape:
        raise ValueError(
            f"prediction and ground truth must both be (N, H, W) label maps, got "
            f"{tuple(pred.shape)} and {tuple(target.shape)}"
        )
    return pred, target


def _one_hot(labels: torch.Tensor) -> torch.Tensor:
    return F.one_hot(labels, SCORING_CLASSES).permute(0, 3, 1, 2).float()


def dice_per_structure(
    pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray
) -> np.ndarray:
    """Dice of LV endocardium, myocardium and LA per image: (N, 3) float64 (order of
    :data:`STRUCTURES`). Empty masks follow the module's policy (both empty 1, one empty 0)."""
    pred, target = _pair(pred, target)
    dice = compute_dice(
        _one_hot(pred), _one_hot(target), include_background=False, ignore_empty=False
    )
    return dice.double().numpy()


def image_diagonal(
    image_size: tuple[int, int], spacing: Sequence[float] | np.ndarray | None = None
) -> float:
    """Largest distance between two pixel centres of an image (pixels, or mm with spacing
    ``(row, col)``): the Hausdorff penalty for an empty prediction or ground truth."""
    sy, sx = (1.0, 1.0) if spacing is None else (float(spacing[0]), float(spacing[1]))
    h, w = image_size
    return math.hypot((h - 1) * sy, (w - 1) * sx)


def hausdorff_distance(
    pred: torch.Tensor | np.ndarray,
    target: torch.Tensor | np.ndarray,
    structure: int = LV,
    percentile: float | None = None,
    spacing: np.ndarray | Sequence[float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric Hausdorff distance of one structure per image (MONAI, Euclidean, boundary
    pixels): the maximum (``percentile=None``) or a percentile (95 for HD95).

    ``spacing``: None (pixels), ``(row, col)`` mm for every image, or an (N, 2) array.
    Returns ``(distances (N,), failed (N,) bool)``; failed images (exactly one of the two masks
    empty) carry the image-diagonal penalty, images with both masks empty 0.
    """
    pred, target = _pair(pred, target)
    if structure not in STRUCTURES.values():
        raise ValueError(f"structure must be one of {sorted(STRUCTURES.values())}, got {structure}")
    if percentile is not None and not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    n, h, w = pred.shape
    if spacing is None:
        per_image = np.ones((n, 2))
    else:
        per_image = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (n, 2)).copy()
        if not np.all(np.isfinite(per_image) & (per_image > 0)):
            raise ValueError("spacing must be finite and positive for every image")
    p = (pred == structure).unsqueeze(1)
    t = (target == structure).unsqueeze(1)
    has_p, has_t = p.flatten(1).any(1).numpy(), t.flatten(1).any(1).numpy()
    out = np.zeros(n, dtype=np.float64)
    failed = has_p != has_t
    both = has_p & has_t
    for i in np.flatnonzero(failed):
        out[i] = image_diagonal((h, w), per_image[i])
    if both.any():
        rows = torch.from_numpy(np.flatnonzero(both))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MONAI warns about empty masks we handle above
            values = compute_hausdorff_distance(
                p[rows].float(),
                t[rows].float(),
                include_background=True,
                percentile=percentile,
                spacing=[tuple(s) for s in per_image[both]],
            )
        out[both] = values[:, 0].double().numpy()
    return out, failed


def segmentation_metrics(
    pred: torch.Tensor | np.ndarray,
    target: torch.Tensor | np.ndarray,
    spacing: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Per-image segmentation metrics: ``dice_<structure>``, ``dice_mean`` (mean of the three),
    ``hd_lv_px``, ``hd95_lv_px`` and, when ``spacing`` (N, 2) mm is given, ``hd_lv_mm`` and
    ``hd95_lv_mm``; ``hd_failed`` (bool) marks images whose LV distance is the penalty."""
    dice = dice_per_structure(pred, target)
    out: dict[str, np.ndarray] = {f"dice_{name}": dice[:, k] for k, name in enumerate(STRUCTURES)}
    out["dice_mean"] = dice.mean(1)
    out["hd_lv_px"], failed = hausdorff_distance(pred, target, LV)
    out["hd95_lv_px"], _ = hausdorff_distance(pred, target, LV, percentile=95)
    if spacing is not None:
        out["hd_lv_mm"], _ = hausdorff_distance(pred, target, LV, spacing=spacing)
        out["hd95_lv_mm"], _ = hausdorff_distance(pred, target, LV, 95, spacing=spacing)
    out["hd_failed"] = failed
    return out


def _classes(pred, target, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred).astype(np.int64).ravel()
    target = np.asarray(target).astype(np.int64).ravel()
    if pred.shape != target.shape:
        raise ValueError(f"pred and target differ in length: {pred.size} and {target.size}")
    if pred.size == 0:
        raise ValueError("no predictions to score")
    for name, values in (("pred", pred), ("target", target)):
        if values.min() < 0 or values.max() >= num_classes:
            raise ValueError(f"{name} holds classes outside 0..{num_classes - 1}")
    return pred, target


def confusion_matrix(pred, target, num_classes: int = 2) -> np.ndarray:
    """(C, C) counts; rows are the true classes, columns the predicted ones."""
    pred, target = _classes(pred, target, num_classes)
    flat = np.bincount(target * num_classes + pred, minlength=num_classes**2)
    return flat.reshape(num_classes, num_classes)


def accuracy(pred, target, num_classes: int = 2) -> float:
    """(TP + TN) / all (paper eq. 18), for any number of classes: trace / total."""
    cm = confusion_matrix(pred, target, num_classes)
    return float(np.trace(cm) / cm.sum())


def balanced_accuracy(pred, target, num_classes: int = 2) -> float:
    """Mean recall over the classes present in ``target`` (absent classes have no recall)."""
    cm = confusion_matrix(pred, target, num_classes)
    support = cm.sum(1)
    present = support > 0
    return float(np.mean(np.diag(cm)[present] / support[present]))


def classification_metrics(pred, target, num_classes: int = 2) -> dict[str, object]:
    """Accuracy, balanced accuracy, confusion matrix and per-image correctness (``correct``,
    float 0/1, the array the bootstrap resamples)."""
    p, t = _classes(pred, target, num_classes)
    return {
        "accuracy": accuracy(p, t, num_classes),
        "balanced_accuracy": balanced_accuracy(p, t, num_classes),
        "confusion_matrix": confusion_matrix(p, t, num_classes),
        "correct": (p == t).astype(np.float64),
    }
