"""Distribution distances between two sets of feature vectors (rows = images): how far the
features of synthetic images lie from those of real ones.

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
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

__all__ = [
    "KIDEstimate",
    "feature_statistics",
    "frechet_distance",
    "frechet_distance_from_features",
    "kid",
    "knn_radii",
    "polynomial_mmd2_unbiased",
    "prdc",
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
