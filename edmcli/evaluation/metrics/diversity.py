"""Diversity of a synthetic dataset: the mean distance between the images of a group (here:
samples of the same source label map), over every pair inside each group
(:func:`pairwise_diversity`). Distances: LPIPS (Zhang et al. 2018; the project's offline loader,
:mod:`edmcli.models.perceptual`), ``1 − SSIM`` (Wang et al. 2004; MONAI's SSIM map, Gaussian
window) or the root mean squared difference, each averaged over the union of the two images'
sectors. MS-SSIM is not offered: with its five scales and an 11-pixel window it needs images of
at least 161² pixels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from monai.metrics.regression import compute_ssim_and_cs

__all__ = [
    "DIVERSITY_DISTANCES",
    "DIVERSITY_TITLES",
    "DiversityEstimate",
    "distance_name",
    "group_pairs",
    "lpips_distance",
    "masked_rms_distance",
    "masked_ssim_distance",
    "pair_distances",
    "pairwise_diversity",
    "summarise_pairs",
]


DIVERSITY_DISTANCES = ("lpips", "ssim", "rms")
"""Image distances of :func:`pairwise_diversity` (``"auto"``: LPIPS when its backbone is
cached, else ``1 − SSIM``)."""
DIVERSITY_TITLES = {
    "lpips": "LPIPS (AlexNet, sector-masked)",
    "ssim": "1 − SSIM (Gaussian window 7, σ 1.5, sector-masked)",
    "rms": "root mean squared difference inside the sector",
}


def group_pairs(groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every unordered pair (i < j) of rows that share a group id: ``(first, second)`` index
    arrays (ordered by group, then row)."""
    groups = np.asarray(groups).ravel()
    order = np.argsort(groups, kind="stable")
    _, starts, counts = np.unique(groups[order], return_index=True, return_counts=True)
    firsts, seconds = [], []
    for size in np.unique(counts[counts >= 2]):  # one vectorised step per group size
        i, j = np.triu_indices(int(size), 1)
        base = starts[counts == size][:, None]
        firsts.append(order[(base + i).ravel()])
        seconds.append(order[(base + j).ravel()])
    if not firsts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(firsts), np.concatenate(seconds)


def _weighted_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-image mean of (N, 1, H, W) values over a mask (NaN where the mask is empty)."""
    weights = mask.to(values.dtype)
    total = weights.flatten(1).sum(1)
    return (values * weights).flatten(1).sum(1) / total.where(total > 0, torch.nan)


def masked_ssim_distance(
    a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor, kernel: int = 7, sigma: float = 1.5
) -> torch.Tensor:
    """``1 − SSIM`` per image pair (Wang et al. 2004), MONAI's SSIM map (Gaussian window,
    data range 1, k₁ 0.01, k₂ 0.03) averaged over the windows centred inside ``mask``.

    Args:
        a, b: (N, 1, H, W) images in [0, 1], H and W ≥ ``kernel``.
        mask: (N, 1, H, W) bool, the pixels to score.

    Returns:
        (N,) distances in [0, 2] (0 for identical images; NaN where the mask is empty).
    """
    if a.shape != b.shape or a.shape != mask.shape or a.ndim != 4:
        raise ValueError(f"a, b and mask must share an (N, 1, H, W) shape: {a.shape}, {b.shape}")
    if min(a.shape[-2:]) < kernel:
        raise ValueError(f"SSIM with a {kernel}-pixel window needs images of at least {kernel}²")
    ssim, _ = compute_ssim_and_cs(
        a.float(), b.float(), 2, [kernel, kernel], [sigma, sigma], data_range=1.0
    )
    r = kernel // 2  # the map is "valid": window (i, j) is centred on pixel (i + r, j + r)
    inner = mask[..., r : r + ssim.shape[-2], r : r + ssim.shape[-1]]
    return 1.0 - _weighted_mean(ssim, inner)


def masked_rms_distance(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Root mean squared difference per image pair over ``mask`` ((N, 1, H, W) each; (N,))."""
    if a.shape != b.shape or a.shape != mask.shape:
        raise ValueError(f"a, b and mask must share a shape: {a.shape}, {b.shape}, {mask.shape}")
    return _weighted_mean((a.float() - b.float()) ** 2, mask).sqrt()


@dataclass(frozen=True)
class DiversityEstimate:
    """Mean and std of a distance over the pairs inside the groups."""

    distance: str  # one of DIVERSITY_DISTANCES
    title: str
    mean: float
    std: float
    pairs: int
    groups: int

    def as_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


def pair_distances(
    images: torch.Tensor,
    first: np.ndarray,
    second: np.ndarray,
    masks: torch.Tensor | None = None,
    distance: str | Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] = "ssim",
    batch: int = 512,
) -> np.ndarray:
    """Distance of each image pair ``(images[first[p]], images[second[p]])``, scored on the
    union of the two masks, in batches of ``batch`` pairs: (P,) float64 (NaN for an empty mask).

    ``distance``: ``"ssim"`` (:func:`masked_ssim_distance`), ``"rms"``
    (:func:`masked_rms_distance`), or a callable ``(a, b, mask) → (B,)`` such as
    :func:`lpips_distance`.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (N, 1, H, W), got {tuple(images.shape)}")
    if isinstance(distance, str):
        functions = {"ssim": masked_ssim_distance, "rms": masked_rms_distance}
        if distance not in functions:
            raise ValueError(f"distance {distance!r} is not one of {', '.join(functions)}")
        fn = functions[distance]
    else:
        fn = distance
    if masks is None:
        masks = torch.ones_like(images, dtype=torch.bool)
    values = []
    with torch.no_grad():
        for start in range(0, len(first), batch):
            i = torch.from_numpy(np.asarray(first[start : start + batch], dtype=np.int64))
            j = torch.from_numpy(np.asarray(second[start : start + batch], dtype=np.int64))
            values.append(fn(images[i], images[j], masks[i] | masks[j]).double().cpu())
    return torch.cat(values).numpy() if values else np.zeros(0)


def distance_name(
    distance: str | Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
) -> str:
    """The name of a distance of :func:`pair_distances` (a callable's ``distance_name``)."""
    return distance if isinstance(distance, str) else getattr(distance, "distance_name", "custom")


def summarise_pairs(
    values: np.ndarray, name: str, groups: np.ndarray, first: np.ndarray
) -> DiversityEstimate | None:
    """Mean and std of finite pair distances (None when there are none); ``groups[first]``
    counts the groups the pairs came from."""
    keep = np.isfinite(values)
    if not keep.any():
        return None
    v = values[keep]
    n_groups = len(np.unique(np.asarray(groups)[np.asarray(first)[keep]]))
    title = DIVERSITY_TITLES.get(name, name)
    return DiversityEstimate(name, title, float(v.mean()), float(v.std()), len(v), n_groups)


def pairwise_diversity(
    images: torch.Tensor,
    groups: np.ndarray,
    masks: torch.Tensor | None = None,
    distance: str | Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] = "ssim",
    batch: int = 512,
) -> DiversityEstimate | None:
    """Mean pairwise distance between the images of each group (every unordered pair inside a
    group, all groups pooled): a generator that ignores its noise scores near 0 on groups of
    samples of one label map.

    Args:
        images: (N, 1, H, W) float in [0, 1].
        groups: (N,) group id of each image.
        masks: (N, 1, H, W) bool; a pair is scored on the union of its two masks (None: every
            pixel).
        distance: ``"ssim"`` (1 − SSIM), ``"rms"``, or a callable ``(a, b, mask) → (B,)``
            (:func:`lpips_distance` for LPIPS); see :func:`pair_distances`.
        batch: pairs scored at once.

    Returns:
        The estimate, or None when no group holds two images.
    """
    if images.ndim != 4 or len(images) != len(groups):
        raise ValueError(
            f"images must be (N, 1, H, W) with one group id each, got {tuple(images.shape)} "
            f"and {len(groups)} ids"
        )
    first, second = group_pairs(np.asarray(groups))
    if len(first) == 0:
        return None
    values = pair_distances(images, first, second, masks, distance, batch)
    return summarise_pairs(values, distance_name(distance), np.asarray(groups), first)


def lpips_distance(
    lpips_module: torch.nn.Module,
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """A ``(a, b, mask) → (B,)`` distance for :func:`pairwise_diversity` from the project's
    sector-masked LPIPS (:class:`edmcli.models.perceptual.MaskedLPIPS`): its per-pixel map
    averaged over the mask."""
    device = next(lpips_module.parameters()).device

    def fn(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        a, b, mask = a.to(device), b.to(device), mask.to(device)
        return _weighted_mean(lpips_module(a, b, mask.float()), mask)

    fn.distance_name = "lpips"  # type: ignore[attr-defined]
    return fn
