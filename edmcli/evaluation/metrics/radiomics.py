"""Hand-written radiomic features of grey-level images inside a region mask (the ultrasound
sector), for a Fréchet Radiomics Distance (FRD, as the ``frd-score`` package of Osuala, Konz et
al. computes it): the Fréchet distance between Gaussian fits of z-scored radiomic features, beside
the network-feature distances of :mod:`edmcli.evaluation.metrics.distribution`.

``frd-score`` computes its features with pyradiomics, whose PyPI release does not build on
Python ≥ 3.10 and whose source is unreachable in CI, so this module implements an IBSI-style
subset (Zwanenburg et al. 2020, "The Image Biomarker Standardization Initiative") itself, in
float64 torch, a batch of images at a time, with no Python loop over images or pixels. The
values are **not** comparable with published FRD numbers computed with pyradiomics (other
feature set, discretisation and angle aggregation); compare FRDs computed with this module only.

Features of one image, each over the pixels inside its mask (:data:`FEATURE_NAMES`, 40 columns):

* first order, on the [0, 1] intensities (IBSI 3.4, population moments as pyradiomics):
  mean, standard deviation, skewness, excess kurtosis, 10/25/50/75/90th percentiles (linear
  interpolation, as ``np.percentile``), interquartile range, mean absolute deviation, robust
  mean absolute deviation (of the pixels within [P10, P90], about their mean), and entropy
  (log₂) and uniformity (energy, Σ p²) of the :data:`GREY_LEVELS`-bin histogram over [0, 1];
* gradient: mean and standard deviation of the central-difference gradient magnitude
  ``√(∂x² + ∂y²)`` (intensity per pixel), over the pixels whose four neighbours are also in
  the mask (0 when no pixel is);
* GLCM (IBSI 3.6): intensities discretised to :data:`GREY_LEVELS` levels of fixed width over
  [0, 1] (``min(⌊x·L⌋, L − 1)``, levels 1 … L), for each distance in :data:`GLCM_DISTANCES` one
  symmetric co-occurrence matrix that merges the four angles 0°, 45°, 90°, 135° (IBSI "2D,
  merged": counts summed over the angles, then normalised to probabilities; every angle
  weighs by its number of pairs) and counts only pairs whose two pixels are in the mask:
  contrast, dissimilarity, homogeneity (inverse difference), angular second moment (energy),
  correlation, joint entropy (log₂), cluster shade and cluster prominence.

A region with no spread (constant intensity) has skewness, kurtosis and GLCM correlation
defined as 0 (pyradiomics gives correlation 1 there); every feature is finite.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = [
    "FEATURE_NAMES",
    "FIRST_ORDER_NAMES",
    "GLCM_DISTANCES",
    "GLCM_NAMES",
    "GRADIENT_NAMES",
    "GREY_LEVELS",
    "glcm_matrices",
    "quantise",
    "radiomics_features",
]

GREY_LEVELS = 32
"""Number of grey levels (fixed bin width 1 / GREY_LEVELS over [0, 1]) of the histogram and
the GLCM."""

GLCM_DISTANCES = (1, 2, 4)
"""Pixel distances (Chebyshev: also along the diagonals) of the co-occurrence matrices."""

PERCENTILES = (10, 25, 50, 75, 90)

FIRST_ORDER_NAMES: tuple[str, ...] = (
    "firstorder_mean",
    "firstorder_std",
    "firstorder_skewness",
    "firstorder_kurtosis",
    *(f"firstorder_p{q}" for q in PERCENTILES),
    "firstorder_iqr",
    "firstorder_mad",
    "firstorder_robust_mad",
    "firstorder_entropy",
    "firstorder_uniformity",
)
GRADIENT_NAMES: tuple[str, ...] = ("gradient_mean", "gradient_std")
GLCM_NAMES: tuple[str, ...] = (
    "contrast",
    "dissimilarity",
    "homogeneity",
    "asm",
    "correlation",
    "joint_entropy",
    "cluster_shade",
    "cluster_prominence",
)
FEATURE_NAMES: tuple[str, ...] = (
    *FIRST_ORDER_NAMES,
    *GRADIENT_NAMES,
    *(f"glcm_{name}_d{d}" for d in GLCM_DISTANCES for name in GLCM_NAMES),
)
"""One name per column of :func:`radiomics_features` (first order, gradient, then the GLCM
features distance by distance)."""

_TINY = 1e-20  # a variance at or below this (intensities in [0, 1]) counts as no spread
_RANGE_TOLERANCE = 1e-6


# --------------------------------------------------------------------------- helpers
def _offsets(d: int) -> tuple[tuple[int, int], ...]:
    """(row, column) steps of the four angles 0°, 45°, 90°, 135° at distance d, each pointing
    down or right (the matrices are symmetric: the opposite direction adds nothing)."""
    return ((0, d), (d, -d), (d, 0), (d, d))


def _shifted_pair(x: torch.Tensor, dy: int, dx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Views ``(a, b)`` of (B, H, W) ``x`` with ``b[..., y, x'] = x[..., y + dy, x' + dx]`` for
    every pixel of ``a`` whose partner lies inside the image (dy ≥ 0)."""
    h, w = x.shape[-2:]
    a_cols = slice(0, max(w - dx, 0)) if dx >= 0 else slice(-dx, w)
    b_cols = slice(dx, w) if dx >= 0 else slice(0, max(w + dx, 0))
    return x[..., : max(h - dy, 0), a_cols], x[..., dy:, b_cols]


def _pair_counts(masks: torch.Tensor) -> torch.Tensor:
    """(B, len(GLCM_DISTANCES)) number of unordered in-mask pixel pairs at each distance, the
    four angles together."""
    counts = []
    for d in GLCM_DISTANCES:
        total = torch.zeros(masks.shape[0], dtype=torch.int64)
        for dy, dx in _offsets(d):
            a, b = _shifted_pair(masks, dy, dx)
            total += (a & b).flatten(1).sum(1)
        counts.append(total)
    return torch.stack(counts, 1)


def quantise(images: torch.Tensor, levels: int = GREY_LEVELS) -> torch.Tensor:
    """Grey level (0 … levels − 1, int64) of intensities in [0, 1]: ``min(⌊x·levels⌋,
    levels − 1)``, fixed bin width ``1 / levels`` (values outside [0, 1] are clamped)."""
    return torch.floor(images.double() * levels).clamp(0, levels - 1).long()


def glcm_matrices(
    levels: torch.Tensor, masks: torch.Tensor, distance: int, n_levels: int = GREY_LEVELS
) -> torch.Tensor:
    """Symmetric grey-level co-occurrence counts of a batch at one distance, the four angles
    merged: ``out[b, i, j]`` = number of ordered in-mask pixel pairs (p, q) of image b, q at
    ``distance`` from p along 0°, 45°, 90° or 135° (either direction), with levels i at p and j
    at q. One ``bincount`` on ``(b · L + i) · L + j`` for the whole batch.

    Args:
        levels: (B, H, W) int64 grey levels in [0, n_levels) (see :func:`quantise`).
        masks: (B, H, W) bool regions; a pair counts only if both pixels are inside.
        distance: pixel distance ≥ 1.
        n_levels: number of grey levels L.

    Returns:
        (B, L, L) float64 counts (not normalised; the sum is twice the number of pairs).
    """
    b = levels.shape[0]
    size = b * n_levels * n_levels  # the last bin, index ``size``, takes the pairs left out
    base = torch.arange(b, dtype=torch.int64).view(b, 1, 1) * (n_levels * n_levels)
    keys = []
    for dy, dx in _offsets(distance):
        la, lb = _shifted_pair(levels, dy, dx)
        ma, mb = _shifted_pair(masks, dy, dx)
        key = base + la * n_levels + lb
        keys.append(torch.where(ma & mb, key, size).flatten())
    counts = torch.bincount(torch.cat(keys), minlength=size + 1)[:size]
    counts = counts.double().view(b, n_levels, n_levels)
    return counts + counts.transpose(1, 2)  # each pair in both orders: symmetric


def _glcm_features(counts: torch.Tensor) -> torch.Tensor:
    """(B, len(GLCM_NAMES)) features of (B, L, L) symmetric co-occurrence counts (each with a
    positive sum)."""
    n_levels = counts.shape[-1]
    p = counts / counts.sum((1, 2), keepdim=True)
    i = torch.arange(1, n_levels + 1, dtype=torch.float64).view(1, -1, 1)
    j = i.transpose(1, 2)
    diff = (i - j).abs()
    mu = (p * i).sum((1, 2))  # = μ_j: the matrix is symmetric
    var = (p * (i - mu.view(-1, 1, 1)) ** 2).sum((1, 2))
    covariance = (p * (i - mu.view(-1, 1, 1)) * (j - mu.view(-1, 1, 1))).sum((1, 2))
    spread = var > _TINY
    correlation = torch.where(spread, covariance / var.clamp_min(_TINY), torch.zeros_like(var))
    plogp = torch.where(p > 0, p * torch.log2(p.clamp_min(1e-300)), torch.zeros_like(p))
    centred_sum = i + j - 2 * mu.view(-1, 1, 1)
    return torch.stack(
        [
            (p * diff**2).sum((1, 2)),
            (p * diff).sum((1, 2)),
            (p / (1 + diff)).sum((1, 2)),
            (p * p).sum((1, 2)),
            correlation,
            -plogp.sum((1, 2)),
            (p * centred_sum**3).sum((1, 2)),
            (p * centred_sum**4).sum((1, 2)),
        ],
        1,
    )


def _first_order(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """(B, len(FIRST_ORDER_NAMES)) first-order features of (B, P) intensities over the (B, P)
    bool mask (each row with at least one pixel)."""
    b = x.shape[0]
    w = m.double()
    n = w.sum(1)
    mean = (x * w).sum(1) / n
    dev = (x - mean[:, None]) * w
    m2 = (dev**2).sum(1) / n
    m3 = (dev**3).sum(1) / n
    m4 = (dev**4).sum(1) / n
    spread = m2 > _TINY
    safe_m2 = m2.clamp_min(_TINY)
    zero = torch.zeros_like(m2)
    skewness = torch.where(spread, m3 / safe_m2**1.5, zero)
    kurtosis = torch.where(spread, m4 / safe_m2**2 - 3.0, zero)
    mad = dev.abs().sum(1) / n

    # percentiles: masked-out pixels sorted to the end, linear interpolation between ranks
    ordered = torch.sort(torch.where(m, x, torch.full_like(x, torch.inf)), dim=1).values
    last = n.long() - 1
    percentiles = []
    for q in PERCENTILES:
        position = q / 100.0 * last.double()
        lo = position.floor().long()
        hi = torch.minimum(lo + 1, last)
        frac = position - lo.double()
        v_lo = ordered.gather(1, lo[:, None])[:, 0]
        v_hi = ordered.gather(1, hi[:, None])[:, 0]
        percentiles.append(v_lo + frac * (v_hi - v_lo))
    p10, p25, _, p75, p90 = percentiles

    # robust MAD: the pixels within [P10, P90], about their own mean
    inner = m & (x >= p10[:, None]) & (x <= p90[:, None])
    wi = inner.double()
    ni = wi.sum(1).clamp_min(1.0)
    inner_mean = (x * wi).sum(1) / ni
    robust_mad = ((x - inner_mean[:, None]).abs() * wi).sum(1) / ni

    image = torch.arange(b, dtype=torch.int64)[:, None].expand_as(x)
    keys = (image * GREY_LEVELS + quantise(x))[m]
    hist = torch.bincount(keys, minlength=b * GREY_LEVELS).double().view(b, GREY_LEVELS)
    prob = hist / n[:, None]
    entropy = -torch.where(prob > 0, prob * torch.log2(prob.clamp_min(1e-300)), 0.0).sum(1)
    uniformity = (prob**2).sum(1)

    return torch.stack(
        [
            mean,
            m2.sqrt(),
            skewness,
            kurtosis,
            *percentiles,
            p75 - p25,
            mad,
            robust_mad,
            entropy,
            uniformity,
        ],
        1,
    )


def _gradient(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """(B, 2) mean and std of the central-difference gradient magnitude of (B, H, W) images
    over the pixels whose four neighbours are in the (B, H, W) mask too (0 where none is)."""
    b, h, w = x.shape
    if h < 3 or w < 3:
        return torch.zeros(b, 2, dtype=torch.float64)
    inside = m[:, 1:-1, 1:-1] & m[:, :-2, 1:-1] & m[:, 2:, 1:-1] & m[:, 1:-1, :-2] & m[:, 1:-1, 2:]
    gx = (x[:, 1:-1, 2:] - x[:, 1:-1, :-2]) / 2
    gy = (x[:, 2:, 1:-1] - x[:, :-2, 1:-1]) / 2
    magnitude = torch.sqrt(gx**2 + gy**2).flatten(1)
    wi = inside.flatten(1).double()
    n = wi.sum(1).clamp_min(1.0)
    mean = (magnitude * wi).sum(1) / n
    var = (((magnitude - mean[:, None]) ** 2) * wi).sum(1) / n
    return torch.stack([mean, var.sqrt()], 1)


def _tensor(a: torch.Tensor | np.ndarray) -> torch.Tensor:
    if isinstance(a, np.ndarray) and not a.flags.writeable:
        a = a.copy()  # torch warns on read-only arrays (np.broadcast_to views)
    return torch.as_tensor(a).detach().cpu()


def _as_batch(
    images: torch.Tensor | np.ndarray, masks: torch.Tensor | np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    x, m = _tensor(images), _tensor(masks)
    if x.ndim == 4 and x.shape[1] == 1:
        x = x[:, 0]
    if m.ndim == 4 and m.shape[1] == 1:
        m = m[:, 0]
    if x.ndim != 3:
        raise ValueError(f"images must be (N, 1, H, W) or (N, H, W), got shape {tuple(x.shape)}")
    if m.shape != x.shape:
        raise ValueError(f"masks {tuple(m.shape)} do not match images {tuple(x.shape)}")
    if m.dtype != torch.bool:
        raise ValueError(f"masks must be bool, got {m.dtype}")
    return x, m


# --------------------------------------------------------------------------- public
def radiomics_features(
    images: torch.Tensor | np.ndarray, masks: torch.Tensor | np.ndarray, batch: int = 256
) -> np.ndarray:
    """Radiomic features (see the module docstring and :data:`FEATURE_NAMES`) of each image
    over the pixels inside its mask, computed ``batch`` images at a time in float64 on the CPU.

    Args:
        images: (N, 1, H, W) or (N, H, W) grey-level images with intensities in [0, 1] inside
            the masks (outside, any value: it is never read).
        masks: (N, H, W) (or (N, 1, H, W)) bool regions, e.g. the ultrasound sector.
        batch: images per chunk (memory grows with ``batch × H × W``; the result does not
            depend on it).

    Returns:
        (N, len(FEATURE_NAMES)) float64 array of finite features, one row per image.

    Raises:
        ValueError: on bad shapes or dtypes, non-finite or out-of-[0, 1] intensities inside a
            mask, or when some mask holds fewer than 2 pixels or fewer than 2 pixel pairs at
            some distance of :data:`GLCM_DISTANCES` (an empty sector means a broken label map);
            the message says how many images are affected.
    """
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    x_all, m_all = _as_batch(images, masks)
    n_images = x_all.shape[0]

    # first the cheap checks on the whole set, so that the message counts every bad image
    pixels, pairs, bad_values = [], [], 0
    for start in range(0, n_images, batch):
        m = m_all[start : start + batch]
        x = x_all[start : start + batch].double()
        pixels.append(m.flatten(1).sum(1))
        pairs.append(_pair_counts(m))
        inside = torch.where(m, x, 0.5)
        bad = ~torch.isfinite(inside) | (inside < -_RANGE_TOLERANCE)
        bad |= inside > 1 + _RANGE_TOLERANCE
        bad_values += int(bad.flatten(1).any(1).sum())
    if n_images:
        few = (torch.cat(pixels) < 2) | (torch.cat(pairs) < 2).any(1)
        if few.any():
            raise ValueError(
                f"{int(few.sum())} of {n_images} images have a mask with fewer than 2 pixels "
                f"or fewer than 2 pixel pairs at some GLCM distance {GLCM_DISTANCES}: "
                "empty or broken regions"
            )
    if bad_values:
        raise ValueError(
            f"{bad_values} of {n_images} images have non-finite intensities or intensities "
            "outside [0, 1] inside their mask (images must be scaled to [0, 1])"
        )

    out = []
    for start in range(0, n_images, batch):
        m = m_all[start : start + batch]
        x = x_all[start : start + batch].double().clamp(0.0, 1.0)
        x = torch.where(m, x, 0.0)  # never read, but keeps NaN out of the arithmetic
        levels = quantise(x)
        parts = [_first_order(x.flatten(1), m.flatten(1)), _gradient(x, m)]
        parts += [_glcm_features(glcm_matrices(levels, m, d)) for d in GLCM_DISTANCES]
        out.append(torch.cat(parts, 1))
    if not out:
        return np.zeros((0, len(FEATURE_NAMES)), dtype=np.float64)
    features = torch.cat(out).numpy()
    if not np.all(np.isfinite(features)):  # pragma: no cover - guarded above
        raise FloatingPointError("radiomic features came out non-finite")
    return features
