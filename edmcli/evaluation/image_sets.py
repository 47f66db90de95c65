"""The images that the reference networks judge (:class:`ImageSet`): a synthetic store's images
with the label maps that conditioned them, or the real test split's with their ground truth.
A synthetic store is scored on at most a cap of images, whole source groups (the samples of one
label map) drawn at random, seeded (:func:`select_groups`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from edmcli.data.dataset import codes
from edmcli.data.labels import VIEWS
from edmcli.data.store import DatasetStore


@dataclass
class ImageSet:
    """Images to judge, with what conditioned them."""

    images: torch.Tensor  # (N, 1, H, W) float in [0, 1]
    labels: torch.Tensor  # (N, H, W) integer store label ids (synthetic: the conditioning map)
    views: np.ndarray  # (N,) 0 A2C, 1 A4C, -1 unknown
    patients: np.ndarray  # (N,) str
    groups: np.ndarray | None  # (N,) source label map of each image (None: not recorded)
    total: int  # images in the store(s) before the selection


def select_groups(
    groups: np.ndarray | None, n: int, max_images: int | None, seed: int
) -> np.ndarray:
    """Sorted rows to score: all when ``max_images`` is None or ≥ n; else whole groups in a
    seeded random order until at least ``max_images`` rows (rows at random without groups)."""
    if max_images is None or n <= max_images:
        return np.arange(n)
    rng = np.random.default_rng(np.random.SeedSequence([seed, n, 0xF1DE]))
    if groups is None:
        return np.sort(rng.choice(n, max_images, replace=False))
    unique, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    order = rng.permutation(len(unique))
    taken = order[: int(np.searchsorted(np.cumsum(counts[order]), max_images)) + 1]
    return np.flatnonzero(np.isin(inverse, taken))


def load_synthetic(stores: list[str], max_images: int | None, seed: int) -> ImageSet:
    """Every image of the synthetic store(s) (all splits), or a selection of whole source
    groups (:func:`select_groups`). A source group is (the store's label store, its
    ``source_index``): stores sampled from one label store share their groups."""
    keys, owners, rows_of = [], [], []
    has_groups = True
    for k, path in enumerate(stores):
        reader = DatasetStore(path)
        n = len(reader)
        owners.append(np.full(n, k))
        rows_of.append(np.arange(n))
        if "source_index" in reader.fields:
            origin = (reader.info.get("provenance") or {}).get("label_store") or path
            keys.append(np.char.add(f"{origin}#", reader.column("source_index").astype(str)))
        else:
            has_groups = False
    owner, row = np.concatenate(owners), np.concatenate(rows_of)
    groups = np.concatenate(keys) if has_groups else None
    chosen = select_groups(groups, len(owner), max_images, seed)
    images, labels, views, patients = [], [], [], []
    for k, path in enumerate(stores):
        rows = row[chosen][owner[chosen] == k]
        if len(rows) == 0:
            continue
        reader = DatasetStore(path)
        pixels, maps = reader.read_rows(rows)
        images.append(pixels)
        labels.append(maps)
        views.append(codes(reader.column("view")[rows], VIEWS))
        patients.append(reader.column("patient")[rows])
    return ImageSet(
        images=torch.from_numpy(np.concatenate(images).astype(np.float32) / 255.0),
        labels=torch.from_numpy(np.concatenate(labels).astype(np.uint8)),
        views=np.concatenate(views),
        patients=np.concatenate(patients),
        groups=None if groups is None else groups[chosen],  # chosen is sorted: store order
        total=len(owner),
    )


def real_image_set(data: Any) -> ImageSet:
    """An :class:`ImageSet` of a :class:`~edmcli.evaluation.downstream.SplitData`."""
    return ImageSet(data.images, data.labels, np.asarray(data.views), np.asarray(data.patients),
                    None, len(data))  # fmt: skip
