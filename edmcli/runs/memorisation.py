"""Does a generator copy its training patients? The distance of an image to its nearest training
images, and the real reference that calibrates it (shared by ``sample --privacy-filter`` and
``evaluate --fidelity``'s memorisation check).

Training images are every image of the patients a generator learnt from: its diffusion run's
and its Γ-VAE run's (``training_patients.json``), read from the stores they name
(:func:`generator_training_images`).

Distances (:func:`nearest`): in *pixel space* each image is standardised inside its sector (mean
0, standard deviation 1; 0 outside), and the distance of a query to a training image is the RMS
difference over the query's sector; in a *feature space*, the Euclidean distance of standardised
features divided by √D. The statistic that flags a copy is the **relative distance**
(:func:`relative_distance`): the nearest distance divided by the mean distance to the
:data:`K_NEAREST` nearest. A copy has 0; an image that is merely smoother than real ones is
closer to *every* training image, and its raw nearest distance drops with its contrast, but its
relative distance does not (measured on the demo's faithful EDM-L64, 500 images: raw nearest
distance below the 1st/5th percentile of real test images for 24 %/33 % of them, although only
8 % had their own source patient as nearest neighbour; relative distance: 4 %/12 %).

Calibration (:func:`calibrate`): the same statistic of real *test* images (patients the
generator never saw) against the training images is what "a new patient" looks like; its P-th
percentile is the threshold below which an image counts as too close.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edmcli.data.store import DatasetStore
from edmcli.errors import EchoSynthError

K_NEAREST = 5
PERCENTILES = (1.0, 5.0)
MIN_REFERENCE = 20
"""Fewest real reference images a threshold is drawn from (below: refused, the percentile would
be one image's distance)."""


@dataclass
class TrainingImages:
    """The images a generator learnt from, with where they came from."""

    images: torch.Tensor  # (M, 1, H, W) float in [0, 1]
    labels: torch.Tensor  # (M, H, W) uint8 store label ids
    patients: np.ndarray  # (M,) str
    sources: list[dict[str, Any]]  # one per store: path, patients, images

    def __len__(self) -> int:
        return len(self.images)


def generator_runs(provenance: dict[str, Any]) -> list[Path]:
    """The diffusion run and (latent models) the Γ-VAE run of a synthetic store."""
    runs = [provenance.get("run"), provenance.get("vae_run")]
    return [Path(r) for r in runs if r]


def generator_training_images(runs: list[Path]) -> TrainingImages:
    """Every image of the patients the runs ``runs`` learnt from, from the stores their
    ``training_patients.json`` names (one store read once for all the runs using it)."""
    from edmcli.runs.folder import load_training_patients

    if not runs:
        raise EchoSynthError("the store records no generator run (not written by sample)")
    wanted: dict[str, set[str]] = {}
    for run in runs:
        if not Path(run).is_dir():
            raise EchoSynthError(
                f"the generator run {run} does not exist (moved or deleted since sampling): its "
                "training images cannot be found"
            )
        record = load_training_patients(run)
        if not record.get("store"):
            raise EchoSynthError(f"{run} does not record the store it trained on")
        wanted.setdefault(str(record["store"]), set()).update(record["patients"])
    images, labels, patients, sources = [], [], [], []
    for path, names in wanted.items():
        store = DatasetStore(path)
        rows = np.flatnonzero(np.isin(store.column("patient"), sorted(names)))
        pixels, maps = store.read_rows(rows)
        images.append(pixels)
        labels.append(maps)
        patients.append(store.column("patient")[rows])
        sources.append({"store": path, "patients": len(names), "images": len(rows)})
    return TrainingImages(
        images=torch.from_numpy(np.concatenate(images).astype(np.float32) / 255.0),
        labels=torch.from_numpy(np.concatenate(labels)),
        patients=np.concatenate(patients),
        sources=sources,
    )


def pixel_codes(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 1, H, W) images in [0, 1] and their (N, H, W) maps → (codes (N, P) float32: each image
    standardised inside its sector, 0 outside; masks (N, P) float32: the sector)."""
    mask = (labels > 0).flatten(1).float()
    x = images.flatten(1).float()
    n = mask.sum(1, keepdim=True).clamp_min(1)
    mean = (x * mask).sum(1, keepdim=True) / n
    std = ((((x - mean) * mask) ** 2).sum(1, keepdim=True) / n).sqrt().clamp_min(1e-6)
    return (x - mean) / std * mask, mask


def nearest(
    query: torch.Tensor,
    train: torch.Tensor,
    query_mask: torch.Tensor | None = None,
    k: int = K_NEAREST,
    block: int = 256,
) -> tuple[np.ndarray, np.ndarray]:
    """Distances (N, k), ascending, and indices (N, k) of each query's ``k`` nearest training
    vectors. With ``query_mask`` (pixel codes): the RMS difference over each query's mask;
    without: the Euclidean distance divided by √D (features)."""
    k = min(k, len(train))
    train = train.double()
    train_sq = train * train
    dists, index = [], []
    for start in range(0, len(query), block):
        q = query[start : start + block].double()
        if query_mask is None:
            d2 = (q * q).sum(1, keepdim=True) - 2 * q @ train.T + train_sq.sum(1)[None]
            d2 = d2 / q.shape[1]
        else:
            m = query_mask[start : start + block].double()
            d2 = (m * q * q).sum(1, keepdim=True) - 2 * (m * q) @ train.T + m @ train_sq.T
            d2 = d2 / m.sum(1, keepdim=True).clamp_min(1)
        values, rows = d2.clamp_min(0).sqrt().topk(k, dim=1, largest=False)
        dists.append(values.numpy())
        index.append(rows.numpy())
    if not dists:
        return np.zeros((0, k)), np.zeros((0, k), dtype=np.int64)
    return np.concatenate(dists), np.concatenate(index)


def relative_distance(distances: np.ndarray) -> np.ndarray:
    """Nearest distance / mean distance of the ``k`` nearest (0: an exact copy)."""
    mean = distances.mean(1)
    return np.where(mean > 0, distances[:, 0] / np.where(mean > 0, mean, 1), 0.0)


def calibrate(reference: np.ndarray, percentiles=PERCENTILES) -> dict[str, float]:
    """Percentile (as its string, "1.0") → the statistic's value at that percentile of the real
    reference (linear interpolation). Refused below :data:`MIN_REFERENCE` reference images."""
    reference = np.asarray(reference, dtype=np.float64)
    if len(reference) < MIN_REFERENCE:
        raise EchoSynthError(
            f"the memorisation check needs at least {MIN_REFERENCE} real test images of patients "
            f"the generator never saw, found {len(reference)}"
        )
    return {str(float(p)): float(np.percentile(reference, p)) for p in percentiles}


def percentile_key(p: float) -> str:
    return str(float(p))


@dataclass
class MemorisationReference:
    """What every memorisation check against one generator compares with, computed once: its
    training images with their pixel codes (and features), the real images of new patients that
    calibrate the check (``reference``: anything with ``images``, ``labels``, ``patients``), and
    their nearest training distances in each space. ``sample --privacy-filter`` asks
    :meth:`pixel_statistic` of every sample; ``evaluate`` and ``echo-synth memorisation`` check
    whole stores against it."""

    training: TrainingImages
    reference: Any
    k: int
    train_codes: torch.Tensor
    train_features: dict[str, np.ndarray]
    reference_distances: dict[str, np.ndarray]  # space → (n, k)

    @classmethod
    def build(
        cls,
        training: TrainingImages,
        reference: Any,
        features: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
        k: int = K_NEAREST,
    ) -> MemorisationReference:
        """``features``: space → (training, reference) features, standardised alike."""
        train_codes, _ = pixel_codes(training.images, training.labels)
        ref_codes, ref_mask = pixel_codes(reference.images, reference.labels)
        distances = {"pixel": nearest(ref_codes, train_codes, ref_mask, k)[0]}
        train_features = {}
        for space, (train_f, ref_f) in (features or {}).items():
            train_features[space] = train_f
            distances[space] = nearest(torch.from_numpy(ref_f), torch.from_numpy(train_f),
                                       None, k)[0]  # fmt: skip
        return cls(training, reference, k, train_codes, train_features, distances)

    def pixel_statistic(self, images: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
        """Relative distance of each image to the training images (pixel space)."""
        codes, mask = pixel_codes(images.cpu(), labels.cpu())
        return relative_distance(nearest(codes, self.train_codes, mask, self.k)[0])

    def threshold(self, percentile: float) -> float:
        """The pixel statistic of the reference at ``percentile``."""
        reference = relative_distance(self.reference_distances["pixel"])
        return calibrate(reference, (percentile,))[percentile_key(percentile)]


def reference_split(store: DatasetStore, exclude: np.ndarray, split: str = "test") -> np.ndarray:
    """Rows of ``store``'s ``split`` whose patients are not in ``exclude`` (new patients)."""
    rows = store.indices(split)
    return rows[~np.isin(store.column("patient")[rows], exclude)]


def source_distances(
    images: torch.Tensor, labels: torch.Tensor, sources: torch.Tensor, source_labels: torch.Tensor
) -> np.ndarray:
    """Pixel-space distance of each image to the real image whose label map conditioned it
    (``sources``, row for row): the RMS difference of the two images, each standardised inside
    its sector, over the image's sector."""
    codes, mask = pixel_codes(images, labels)
    real, _ = pixel_codes(sources, source_labels)
    d2 = (((codes.double() - real.double()) ** 2) * mask).sum(1) / mask.sum(1).clamp_min(1)
    return d2.sqrt().numpy()


def store_source_distances(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(:func:`source_distances` of every image of the synthetic store ``path``, its view
    names): each image against the image of its source row in the store its maps came from
    (``provenance.label_store``, ``source_index``)."""
    store = DatasetStore(path)
    prov = store.info.get("provenance") or {}
    if not prov.get("label_store") or "source_index" not in store.fields:
        raise EchoSynthError(f"{path} does not record the label maps it was sampled from")
    maps = DatasetStore(prov["label_store"])
    source = store.column("source_index")
    rows, inverse = np.unique(source, return_inverse=True)
    real, real_labels = (values[inverse] for values in maps.read_rows(rows))
    distances = source_distances(
        torch.from_numpy(np.asarray(store.images[:]).astype(np.float32) / 255),
        torch.from_numpy(np.asarray(store.labels[:])),
        torch.from_numpy(real.astype(np.float32) / 255), torch.from_numpy(real_labels),
    )  # fmt: skip
    return distances, store.column("view")
