"""Quality metrics of a synthetic dataset: small pure functions on feature arrays and images.

Distribution distances between two sets of feature vectors (rows = images):

* :func:`frechet_distance` — the Fréchet (2-Wasserstein) distance between two Gaussians,
  ``‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2 (Σ₁ Σ₂)^{1/2})`` (Dowson & Landau 1982; as FID: Heusel et al.
  2017, "GANs trained by a two time-scale update rule converge to a local Nash equilibrium").
  The trace of the matrix square root is computed the symmetric way,
  ``tr (Σ₁Σ₂)^{1/2} = Σᵢ √λᵢ(Σ₁^{1/2} Σ₂ Σ₁^{1/2})`` (the two matrices are similar), with
  ``eigh`` and eigenvalues clipped at 0: no complex parts to discard and no NaN for the
  rank-deficient covariances that few images in many dimensions give.
  :func:`frechet_distance_from_features` fits the Gaussians (mean, unbiased covariance).
* :func:`kid` — the kernel inception distance (Bińkowski et al. 2018, "Demystifying MMD GANs"):
  the unbiased estimator of MMD² with the cubic polynomial kernel
  ``k(x, y) = (xᵀy / d + 1)³`` (:func:`polynomial_mmd2_unbiased`), averaged over random
  subsets drawn without replacement from each set (mean ± std over the subsets), as in
  ``torchmetrics`` and ``clean-fid``. Unbiased: it can be slightly negative for equal
  distributions.
* :func:`prdc` — precision, recall, density and coverage with k nearest neighbours
  (Kynkäänniemi et al. 2019, "Improved precision and recall metric for assessing generative
  models"; Naeem et al. 2020, "Reliable fidelity and diversity metrics for generative models",
  whose reference code ``clovaai/generative-evaluation-prdc`` these follow): a point's
  neighbourhood is the ball reaching its k-th nearest neighbour within its own set (the point
  itself excluded); precision = fraction of synthetic points inside some real ball, recall =
  fraction of real points inside some synthetic ball, density = mean number of real balls a
  synthetic point lies in, divided by k, coverage = fraction of real balls that hold at least
  one synthetic point.

Diversity and correlation:

* :func:`pairwise_diversity` — the mean distance between the images of a group (here: samples of
  the same source label map), over every pair inside each group. Distances: LPIPS (Zhang et al.
  2018; the project's offline loader, :mod:`edmcli.models.perceptual`), ``1 − SSIM`` (Wang et
  al. 2004; MONAI's SSIM map, Gaussian window) or the root mean squared difference, each averaged
  over the union of the two images' sectors. MS-SSIM is not offered: with its five scales and
  an 11-pixel window it needs images of at least 161² pixels.
* :func:`spearman_with_interval` — Spearman's ρ (``scipy.stats.spearmanr``) with a percentile
  bootstrap interval: the items (here: synthetic stores) resampled with replacement.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch

__all__ = [
    "DIVERSITY_DISTANCES",
    "DIVERSITY_TITLES",
    "DiversityEstimate",
    "KIDEstimate",
    "SpearmanEstimate",
    "distance_name",
    "feature_statistics",
    "frechet_distance",
    "frechet_distance_from_features",
    "group_pairs",
    "hausdorff_percentile",
    "kid",
    "knn_radii",
    "lpips_distance",
    "mask_edges",
    "masked_rms_distance",
    "masked_ssim_distance",
    "pair_distances",
    "pairwise_diversity",
    "polynomial_mmd2_unbiased",
    "prdc",
    "spearman_with_interval",
    "summarise_pairs",
]


# --------------------------------------------------------------------------- helpers
def _features(x: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    """(N, D) float64 array of finite values."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must be an (N, D) array of feature vectors, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} holds non-finite values")
    return x


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix (eigenvalues < 0
    from rounding clipped to 0)."""
    w, v = np.linalg.eigh((matrix + matrix.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


# --------------------------------------------------------------------------- Fréchet distance
def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """Fréchet distance between N(μ₁, Σ₁) and N(μ₂, Σ₂) (Dowson & Landau 1982; FID, Heusel et
    al. 2017): ``‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁Σ₂)^{1/2}``.

    Args:
        mu1, mu2: (D,) means.
        sigma1, sigma2: (D, D) symmetric positive semi-definite covariances (singular allowed).

    Returns:
        The distance (≥ 0; tiny negative rounding is clipped to 0).

    Raises:
        ValueError: on mismatched shapes or non-finite values.
    """
    mu1, mu2 = np.asarray(mu1, np.float64).ravel(), np.asarray(mu2, np.float64).ravel()
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    d = mu1.size
    if mu2.size != d or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(
            f"means {mu1.shape}, {mu2.shape} and covariances {s1.shape}, {s2.shape} do not match"
        )
    if not all(np.all(np.isfinite(a)) for a in (mu1, mu2, s1, s2)):
        raise ValueError("means and covariances must be finite")
    root1 = _psd_sqrt(s1)
    middle = root1 @ s2 @ root1
    eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_sqrt = float(np.sqrt(np.clip(eigenvalues, 0.0, None)).sum())
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt)
    return max(value, 0.0)


def feature_statistics(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), unbiased covariance (D, D)) of (N, D) features, N ≥ 2, in float64."""
    x = _features(features, "features")
    if len(x) < 2:
        raise ValueError(f"a covariance needs at least 2 feature vectors, got {len(x)}")
    return x.mean(0), np.atleast_2d(np.cov(x, rowvar=False))


def frechet_distance_from_features(
    a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor
) -> float:
    """:func:`frechet_distance` of the Gaussians fitted to two (N, D) feature sets (as FID:
    mean and unbiased covariance of each set).

    When a set has fewer vectors than dimensions (a few hundred real test images, 1280-D
    features) its covariance has rank < D, and the D × D route is both wasteful and
    ill-conditioned. With ``Σ_a = AᵀA`` and ``Σ_b = BᵀB`` (A, B: centred features / √(N − 1)),
    ``tr (Σ_a Σ_b)^{1/2}`` is the nuclear norm of ``A Bᵀ`` (the eigenvalues of ``Σ_a Σ_b`` are the
    squared singular values of ``A Bᵀ``) and ``tr Σ = ‖A‖²_F``: one SVD of an N_a × N_b matrix
    instead of two D × D eigendecompositions. The route
    with fewer operations is taken; both are exact.
    """
    x, y = _features(a, "a"), _features(b, "b")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature sizes differ: {x.shape[1]} and {y.shape[1]}")
    if min(len(x), len(y)) < 2:
        raise ValueError(f"a covariance needs at least 2 feature vectors, got {len(x)}, {len(y)}")
    d = x.shape[1]
    small, large = sorted((len(x), len(y)))
    if small * small * large >= d**3:
        return frechet_distance(*feature_statistics(x), *feature_statistics(y))
    fa = (x - x.mean(0)) / math.sqrt(len(x) - 1)
    fb = (y - y.mean(0)) / math.sqrt(len(y) - 1)
    # the singular values of A Bᵀ directly: through its Gram matrix's eigenvalues, rounding of
    # the zero ones (~1e-17) would come back as ~3e-9 each after the square root
    trace_sqrt = float(np.linalg.svd(fa @ fb.T, compute_uv=False).sum())
    diff = x.mean(0) - y.mean(0)
    value = float(diff @ diff + (fa * fa).sum() + (fb * fb).sum() - 2.0 * trace_sqrt)
    return max(value, 0.0)


# --------------------------------------------------------------------------- KID
def polynomial_mmd2_unbiased(
    x: np.ndarray, y: np.ndarray, degree: int = 3, coef0: float = 1.0
) -> float:
    """Unbiased MMD² (Gretton et al. 2012, eq. 3) between two sets with the polynomial kernel
    ``k(u, v) = (uᵀv / D + coef0)^degree`` (KID's kernel with the defaults; Bińkowski et al.
    2018): ``mean_{i≠j} k(xᵢ, xⱼ) + mean_{i≠j} k(yᵢ, yⱼ) − 2 mean_{i,j} k(xᵢ, yⱼ)``.

    Args:
        x: (m, D) features, m ≥ 2.
        y: (n, D) features, n ≥ 2.
    """
    x, y = _features(x, "x"), _features(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature sizes differ: {x.shape[1]} and {y.shape[1]}")
    m, n = len(x), len(y)
    if m < 2 or n < 2:
        raise ValueError(f"the unbiased MMD needs at least 2 vectors per set, got {m} and {n}")
    d = x.shape[1]
    kxx = (x @ x.T / d + coef0) ** degree
    kyy = (y @ y.T / d + coef0) ** degree
    kxy = (x @ y.T / d + coef0) ** degree
    within_x = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    within_y = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(within_x + within_y - 2.0 * kxy.mean())


@dataclass(frozen=True)
class KIDEstimate:
    """KID: mean and std of the unbiased MMD² over ``subsets`` random subsets of
    ``subset_size`` vectors of each set."""

    mean: float
    std: float
    subsets: int
    subset_size: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def kid(
    a: np.ndarray | torch.Tensor,
    b: np.ndarray | torch.Tensor,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> KIDEstimate:
    """Kernel inception distance (Bińkowski et al. 2018) of two (N, D) feature sets: the mean ±
    std over ``subsets`` draws of :func:`polynomial_mmd2_unbiased` (cubic kernel), each on
    ``min(subset_size, len(a), len(b))`` vectors drawn without replacement from each set
    (the defaults of torchmetrics and clean-fid: 100 subsets of 1000)."""
    a, b = _features(a, "a"), _features(b, "b")
    if subsets < 1:
        raise ValueError(f"subsets must be at least 1, got {subsets}")
    size = min(subset_size, len(a), len(b))
    if size < 2:
        raise ValueError(f"KID needs at least 2 vectors per set, got {len(a)} and {len(b)}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, len(a), len(b), 0x41D]))
    values = np.array([
        polynomial_mmd2_unbiased(
            a[rng.choice(len(a), size, replace=False)], b[rng.choice(len(b), size, replace=False)]
        )
        for _ in range(subsets)
    ])  # fmt: skip
    return KIDEstimate(float(values.mean()), float(values.std()), subsets, size)


# --------------------------------------------------------------------------- PRDC
def _distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


def knn_radii(features: np.ndarray | torch.Tensor, k: int, chunk: int = 2048) -> np.ndarray:
    """Distance of each row to its k-th nearest neighbour among the *other* rows (Euclidean),
    computed in chunks of ``chunk`` rows (memory ``chunk × N``)."""
    x = torch.from_numpy(_features(features, "features"))
    if not 1 <= k < len(x):
        raise ValueError(f"k = {k} nearest neighbours need more than k points, got {len(x)}")
    out = []
    for start in range(0, len(x), chunk):
        d = _distances(x[start : start + chunk], x)
        # the row itself is at distance 0 and comes first: the (k + 1)-th smallest is the k-th
        out.append(torch.topk(d, k + 1, dim=1, largest=False).values[:, k])
    return torch.cat(out).numpy()


def prdc(
    real: np.ndarray | torch.Tensor, fake: np.ndarray | torch.Tensor, k: int = 5
) -> dict[str, float]:
    """Precision, recall (Kynkäänniemi et al. 2019), density and coverage (Naeem et al. 2020)
    of ``fake`` against ``real`` with ``k``-nearest-neighbour balls (Euclidean).

    Naeem et al. recommend as many fake as real vectors and k = 5; the caller subsamples.

    Returns:
        ``{"precision", "recall", "density", "coverage"}``: precision, recall and coverage in
        [0, 1]; density ≥ 0 (1 on average for two samples of one distribution).
    """
    real_np, fake_np = _features(real, "real"), _features(fake, "fake")
    if real_np.shape[1] != fake_np.shape[1]:
        raise ValueError(f"feature sizes differ: {real_np.shape[1]} and {fake_np.shape[1]}")
    real_r = torch.from_numpy(knn_radii(real_np, k))
    fake_r = torch.from_numpy(knn_radii(fake_np, k))
    d = _distances(torch.from_numpy(real_np), torch.from_numpy(fake_np))  # (R, F)
    inside_real = d <= real_r[:, None]  # fake j inside real ball i
    precision = inside_real.any(0).double().mean()
    recall = (d <= fake_r[None, :]).any(1).double().mean()
    density = inside_real.sum(0).double().mean() / k
    coverage = (d.min(1).values <= real_r).double().mean()
    return {
        "precision": float(precision),
        "recall": float(recall),
        "density": float(density),
        "coverage": float(coverage),
    }


# --------------------------------------------------------------------------- Hausdorff, batched
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
    from scipy.spatial import KDTree

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


# --------------------------------------------------------------------------- diversity
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
    from monai.metrics.regression import compute_ssim_and_cs

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


# --------------------------------------------------------------------------- rank correlation
@dataclass(frozen=True)
class SpearmanEstimate:
    """Spearman's ρ of n items with its bootstrap percentile interval (items resampled with
    replacement; resamples where either variable is constant have no ρ and are left out)."""

    rho: float
    p_value: float
    ci_low: float
    ci_high: float
    confidence: float
    n: int
    iterations: int
    valid_resamples: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def _rank_rows(x: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(x, axis=-1)


def _pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(-1, keepdims=True)
    b = b - b.mean(-1, keepdims=True)
    den = np.sqrt((a * a).sum(-1) * (b * b).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (a * b).sum(-1) / np.where(den > 0, den, 1.0), np.nan)


def spearman_with_interval(
    x: np.ndarray,
    y: np.ndarray,
    iterations: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> SpearmanEstimate:
    """Spearman's rank correlation of paired values (``scipy.stats.spearmanr``: Pearson's r of
    the ranks, ties given their mean rank) and a percentile bootstrap interval over the items.

    Args:
        x, y: (n,) paired values, n ≥ 3, finite.
        iterations: bootstrap resamples of the n items with replacement.
        confidence: of the interval.
        seed: of the resampling.

    Returns:
        ρ (NaN when x or y is constant), its two-sided p-value, and the interval (NaN when no
        resample has a defined ρ). With few items the interval is wide and rough.
    """
    from scipy.stats import spearmanr

    x, y = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"x and y differ in length: {x.size} and {y.size}")
    if x.size < 3:
        raise ValueError(f"a rank correlation needs at least 3 items, got {x.size}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("x and y must be finite")
    if iterations < 1 or not 0.0 < confidence < 1.0:
        raise ValueError(f"iterations {iterations} must be ≥ 1 and confidence in (0, 1)")
    constant = np.ptp(x) == 0 or np.ptp(y) == 0
    if constant:
        rho, p = float("nan"), float("nan")
    else:
        result = spearmanr(x, y)
        rho, p = float(result.statistic), float(result.pvalue)
    rng = np.random.default_rng(np.random.SeedSequence([seed, x.size, 0x5EA]))
    rows = rng.integers(0, x.size, size=(iterations, x.size))
    boot = _pearson_rows(_rank_rows(x[rows]), _rank_rows(y[rows]))
    boot = boot[np.isfinite(boot)]
    alpha = (1.0 - confidence) / 2
    if len(boot):
        lo, hi = (float(v) for v in np.quantile(boot, [alpha, 1.0 - alpha]))
    else:
        lo = hi = float("nan")
    return SpearmanEstimate(rho, p, lo, hi, confidence, int(x.size), iterations, int(len(boot)))
