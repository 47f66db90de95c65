"""Segmentation metrics: Dice per structure and the Hausdorff distance of a structure (paper
eqs. 16–17), per image for the downstream test and batched over every image at once for the
label-fidelity judgement of ``evaluate --fidelity``.

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

The batched versions (:func:`structure_dice`, :func:`hausdorff_percentile`,
:func:`structure_hd95`) give the same values under the same policy for thousands of images at
once: one per-image confusion matrix (``bincount``) for Dice, one KD-tree for the boundary
pixels of the whole batch.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.metrics import compute_dice, compute_hausdorff_distance
from scipy.spatial import KDTree

from edmcli.data.labels import LA, LV, MYO, OUTSIDE, SECTOR

__all__ = [
    "SCORING_CLASSES",
    "STRUCTURES",
    "STRUCTURE_SHORT",
    "dice_per_structure",
    "hausdorff_distance",
    "hausdorff_percentile",
    "image_diagonal",
    "mask_edges",
    "segmentation_metrics",
    "structure_dice",
    "structure_hd95",
    "to_scoring_labels",
]

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


# --------------------------------------------------------------------------- batched
def _scoring_uint8(labels: torch.Tensor) -> torch.Tensor:
    """Store label ids (0–4) or scoring classes (0–3) → scoring classes as uint8 (*sector*
    joins background), checked like :func:`to_scoring_labels`."""
    labels = torch.as_tensor(labels)
    if labels.is_floating_point():
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > SECTOR):
        raise ValueError(f"labels must be ids in 0..{SECTOR}")
    labels = labels.to(torch.uint8)
    return labels * (labels != SECTOR)


def structure_dice(pred: torch.Tensor, target: torch.Tensor) -> np.ndarray:
    """Dice of LV endocardium, myocardium and LA per image, (N, 3) float64, every image at
    once through one per-image confusion matrix (``bincount``); store label ids are merged to
    the scoring classes first. Values and empty-mask policy are those of
    :func:`dice_per_structure` (both empty 1, one empty 0)."""
    pred, target = _scoring_uint8(pred), _scoring_uint8(target)
    if pred.ndim != 3 or pred.shape != target.shape:
        raise ValueError(f"pred and target must be (N, H, W), got {pred.shape}, {target.shape}")
    n, c = pred.shape[0], SCORING_CLASSES
    chunk = max(1, (1 << 22) // max(1, pred[0].numel()))  # images per bincount (memory bound)
    parts = []
    for start in range(0, n, chunk):
        p, t = pred[start : start + chunk], target[start : start + chunk]
        image = torch.arange(len(p)).repeat_interleave(p[0].numel())
        code = image * (c * c) + p.flatten().long() * c + t.flatten().long()
        parts.append(torch.bincount(code, minlength=len(p) * c * c).view(len(p), c, c))
    confusion = torch.cat(parts).double() if parts else torch.zeros(0, c, c).double()
    ids = list(STRUCTURES.values())
    inter = confusion.diagonal(dim1=1, dim2=2)[:, ids]
    total = confusion.sum(2)[:, ids] + confusion.sum(1)[:, ids]  # |pred| + |target|
    return torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.ones_like(total)).numpy()


def mask_edges(masks: torch.Tensor) -> torch.Tensor:
    """Inner boundary of (N, H, W) boolean masks: the pixels of a mask with a 4-neighbour
    outside it or beyond the image border (``mask XOR binary_erosion(mask)``, scipy's cross
    structure and border value 0: MONAI's ``get_mask_edges``)."""
    m = torch.as_tensor(masks).bool()
    eroded = m.clone()
    eroded[:, 1:] &= m[:, :-1]  # the pixel above is inside
    eroded[:, :-1] &= m[:, 1:]  # below
    eroded[:, :, 1:] &= m[:, :, :-1]  # left
    eroded[:, :, :-1] &= m[:, :, 1:]  # right
    eroded[:, [0, -1]] = False  # beyond the border is outside
    eroded[:, :, [0, -1]] = False
    return m & ~eroded


def _directed_percentiles(
    source: np.ndarray, target: np.ndarray, n: int, gap: float, percentile: float | None
) -> np.ndarray:
    """Per image, the percentile (None: maximum) of the distances from its ``source`` edge
    points to the nearest ``target`` edge point of the same image. Points are (image, row, col)
    rows with the image index scaled by ``gap`` (larger than any in-image distance), so one
    KD-tree serves every image. Images without source points get NaN."""
    out = np.full(n, np.nan)
    if len(source) == 0 or len(target) == 0:
        return out
    scale = np.array([gap, 1.0, 1.0])
    dist = KDTree(target * scale).query(source * scale, k=1)[0]
    image = source[:, 0].astype(np.int64)
    order = np.lexsort((dist, image))  # by image, then distance
    dist, image = dist[order], image[order]
    ids, starts, counts = np.unique(image, return_index=True, return_counts=True)
    if percentile is None:
        out[ids] = dist[starts + counts - 1]
        return out
    pos = (counts - 1) * (percentile / 100.0)  # torch.quantile / numpy "linear"
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, counts - 1)
    frac = pos - lo
    out[ids] = dist[starts + lo] + (dist[starts + hi] - dist[starts + lo]) * frac
    return out


def hausdorff_percentile(
    pred: torch.Tensor | np.ndarray,
    target: torch.Tensor | np.ndarray,
    percentile: float | None = 95.0,
    spacing: tuple[float, float] | None = None,
) -> np.ndarray:
    """Symmetric (percentile) Hausdorff distance of binary masks, every image at once: the
    maximum over both directions of the ``percentile`` (None: the maximum) of the Euclidean
    distances from each boundary pixel (:func:`mask_edges`) of one mask to the nearest boundary
    pixel of the other (MONAI's ``compute_hausdorff_distance``, one KD-tree for the batch instead
    of one per image).

    Args:
        pred, target: (N, H, W) boolean masks.
        percentile: in (0, 100], or None for the classic Hausdorff distance.
        spacing: (row, col) pixel size (None: pixels).

    Returns:
        (N,) float64 distances; NaN where either mask is empty (the caller's policy decides).
    """
    pred, target = torch.as_tensor(pred).bool(), torch.as_tensor(target).bool()
    if pred.ndim != 3 or pred.shape != target.shape:
        raise ValueError(
            f"pred and target must both be (N, H, W), got {pred.shape}, {target.shape}"
        )
    if percentile is not None and not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    n, h, w = pred.shape
    sy, sx = (1.0, 1.0) if spacing is None else (float(spacing[0]), float(spacing[1]))
    gap = 2.0 * math.hypot(h * sy, w * sx) + 1.0
    points = []
    for edges in (mask_edges(pred), mask_edges(target)):
        p = edges.nonzero().numpy().astype(np.float64)
        p[:, 1] *= sy
        p[:, 2] *= sx
        points.append(p)
    forward = _directed_percentiles(points[0], points[1], n, gap, percentile)
    backward = _directed_percentiles(points[1], points[0], n, gap, percentile)
    both = pred.flatten(1).any(1).numpy() & target.flatten(1).any(1).numpy()
    return np.where(both, np.fmax(forward, backward), np.nan)


def structure_hd95(
    pred: torch.Tensor, target: torch.Tensor
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """HD95 (pixels) per structure and image, every image at once
    (:func:`hausdorff_percentile`), with the policy of :func:`hausdorff_distance`: both masks
    empty 0; exactly one empty the image diagonal, flagged as failed. Returns (structure → (N,)
    distances, structure → (N,) failed)."""
    pred, target = _scoring_uint8(pred), _scoring_uint8(target)
    penalty = image_diagonal(tuple(pred.shape[-2:]))
    values, failed = {}, {}
    for name, structure in STRUCTURES.items():
        p, t = pred == structure, target == structure
        has_p, has_t = p.flatten(1).any(1).numpy(), t.flatten(1).any(1).numpy()
        d = hausdorff_percentile(p, t, 95)
        failed[name] = has_p != has_t
        values[name] = np.where(failed[name], penalty, np.where(has_p & has_t, d, 0.0))
    return values, failed
