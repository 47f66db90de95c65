"""The memorisation check of a synthetic store: how many of its images sit closer to a training
image of their generator than real images of new patients do (``evaluate --fidelity``, one
entry per store, and ``echo-synth memorisation STORE`` on its own).

For every synthetic image, its nearest training images (:mod:`edmcli.runs.memorisation`: the
images of the generator's diffusion and Γ-VAE training patients) in the sector-masked pixel
space and, inside ``evaluate``, in the reference networks' feature spaces (segmenter bottleneck,
classifier penultimate layer, standardised by the real test features as the quality metrics
are). The statistic is the relative distance (nearest / mean of the 5 nearest); the raw nearest
distance is reported beside it. Both are calibrated by the real test images of patients the
generator never saw: a synthetic image is *flagged* at P when its statistic is below the P-th
percentile of theirs. An honest generator has about P % flagged; a copying one, many more.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edmcli.data.card import write_card
from edmcli.data.dataset import codes
from edmcli.data.labels import VIEWS
from edmcli.data.store import DatasetStore
from edmcli.errors import EchoSynthError
from edmcli.evaluation.image_sets import ImageSet, load_synthetic
from edmcli.evaluation.judges import VIEW_KEYS, view_masks
from edmcli.runs.folder import load_training_patients
from edmcli.runs.grids import save_image_grid
from edmcli.runs.memorisation import (
    PERCENTILES,
    MemorisationReference,
    calibrate,
    generator_runs,
    generator_training_images,
    nearest,
    pixel_codes,
    reference_split,
    relative_distance,
    store_source_distances,
)

CLOSEST_PAIRS = 8
MEMORISATION_SPACES = ("pixel", "segmenter", "classifier")


def flagged_fractions(
    values: np.ndarray, views: np.ndarray, thresholds: dict[str, float]
) -> dict[str, dict[str, float | None]]:
    """Percentile → view key → fraction of ``values`` strictly below its threshold (None for a
    view without images)."""
    masks = view_masks(np.asarray(views))
    return {
        p: {key: float((values[m] < t).mean()) if m.any() else None for key, m in masks.items()}
        for p, t in thresholds.items()
    }


def space_check(
    synthetic: np.ndarray,
    reference: np.ndarray,
    views: np.ndarray,
    percentiles=PERCENTILES,
) -> dict[str, Any]:
    """The verdict of one space from the (N, k) and (n, k) nearest distances of the synthetic
    and the real reference images: thresholds and flagged fractions per percentile and view,
    for the relative distance (the verdict) and the raw nearest distance."""
    rel_s, rel_r = relative_distance(synthetic), relative_distance(reference)
    rel_t, raw_t = calibrate(rel_r, percentiles), calibrate(reference[:, 0], percentiles)
    return {
        "thresholds": rel_t,
        "flagged": flagged_fractions(rel_s, views, rel_t),
        "median": {"synthetic": float(np.median(rel_s)), "reference": float(np.median(rel_r))},
        "nearest_distance": {
            "thresholds": raw_t,
            "flagged": flagged_fractions(synthetic[:, 0], views, raw_t),
            "median": {
                "synthetic": float(np.median(synthetic[:, 0])),
                "reference": float(np.median(reference[:, 0])),
            },  # fmt: skip
        },
    }


def memorisation_check(
    data: ImageSet,
    against: MemorisationReference,
    features: dict[str, np.ndarray] | None = None,
    grid: Path | None = None,
    percentiles=PERCENTILES,
) -> dict[str, Any]:
    """The memorisation entry of the synthetic images ``data`` against their generator's
    training images, calibrated by the real images of patients it never saw (``against``).
    ``features``: space → the synthetic images' features (standardised as ``against``'s);
    ``grid``: where to draw the closest synthetic/training pairs (pixel space)."""
    t0 = time.perf_counter()
    training, reference, k = against.training, against.reference, against.k
    syn_codes, syn_mask = pixel_codes(data.images, data.labels)
    syn_d, syn_i = nearest(syn_codes, against.train_codes, syn_mask, k)
    ref_distances = against.reference_distances
    spaces = {"pixel": space_check(syn_d, ref_distances["pixel"], data.views, percentiles)}
    own = training.patients[syn_i[:, 0]] == np.asarray(data.patients)
    spaces["pixel"]["nearest_is_own_source_patient"] = float(own.mean()) if len(own) else None
    for space, syn_f in (features or {}).items():
        train_f = torch.from_numpy(against.train_features[space])
        s_d, s_i = nearest(torch.from_numpy(syn_f), train_f, None, k)
        spaces[space] = space_check(s_d, ref_distances[space], data.views, percentiles)
        own_f = training.patients[s_i[:, 0]] == np.asarray(data.patients)
        spaces[space]["nearest_is_own_source_patient"] = float(own_f.mean())
    rel = relative_distance(syn_d)
    order = np.argsort(rel, kind="stable")[:CLOSEST_PAIRS]
    closest = [
        {"synthetic_row": int(i), "training_patient": str(training.patients[syn_i[i, 0]]),
         "relative_distance": float(rel[i]), "nearest_distance": float(syn_d[i, 0])}
        for i in order
    ]  # fmt: skip
    if grid is not None and len(order):
        rows = torch.from_numpy(order)
        nearest_rows = torch.from_numpy(syn_i[order, 0])
        save_image_grid([data.images[rows], training.images[nearest_rows]], grid)
    return {
        "what": "nearest training images of each synthetic image (the generator's diffusion and "
        "Γ-VAE training patients); flagged at P: closer than the P-th percentile of real test "
        "images of new patients. Statistic: nearest distance / mean of the "
        f"{k} nearest (relative); raw nearest distance beside it",
        "k": k,
        "images": len(data.images),
        "training": {
            "images": len(training),
            "patients": len(np.unique(training.patients)),
            "sources": training.sources,
        },  # fmt: skip
        "reference": {
            "images": len(reference.images),
            "patients": len(np.unique(reference.patients)),
        },  # fmt: skip
        "spaces": spaces,
        "closest": closest,
        "grid": str(grid) if grid is not None and len(order) else None,
        "seconds": time.perf_counter() - t0,
    }


def source_image_check(
    stores: list[str | Path], probe: str | Path, percentiles=PERCENTILES
) -> dict[str, Any]:
    """The map-matched check: each image's distance to the real image whose label map
    conditioned it (:func:`~edmcli.runs.memorisation.store_source_distances`), calibrated by the
    same distance of the ``probe`` store (the same generator on the maps of patients it never
    saw). A generator that follows its maps is as close to a training patient's image as to a
    new patient's; one that reproduces its training images is closer. An entry of the same form
    as a space of :func:`memorisation_check` (``nearest_distance`` absent)."""
    mine, views = zip(*(store_source_distances(Path(s)) for s in stores), strict=True)
    theirs, _ = store_source_distances(Path(probe))
    values, views = np.concatenate(mine), codes(np.concatenate(views), VIEWS)
    thresholds = calibrate(theirs, percentiles)
    return {
        "what": "distance of each image to the real image of its source label map, against the "
        "same distance of the probe store (the generator's images of new patients' maps)",
        "probe": str(probe),
        "reference_images": len(theirs),
        "thresholds": thresholds,
        "flagged": flagged_fractions(values, views, thresholds),
        "median": {"synthetic": float(np.median(values)), "reference": float(np.median(theirs))},
        "nearest_is_own_source_patient": None,
    }


def flagged_row(entry: dict[str, Any], space: str = "pixel") -> dict[str, float | None]:
    """``{"P1 all": .., "P1 A2C": .., ...}`` of one space's relative-distance verdict."""
    flagged = ((entry.get("spaces") or {}).get(space) or {}).get("flagged") or {}
    return {
        f"P{float(p):g} {view}": fractions.get(view)
        for p, fractions in flagged.items()
        for view in VIEW_KEYS
    }


def real_subset(store: str | Path, rows: np.ndarray) -> ImageSet:
    """The images of ``rows`` of a real store as an :class:`ImageSet`."""
    reader = DatasetStore(store)
    images, labels = reader.read_rows(rows)
    return ImageSet(
        images=torch.from_numpy(images.astype(np.float32) / 255),
        labels=torch.from_numpy(labels),
        views=codes(reader.column("view")[rows], VIEWS),
        patients=reader.column("patient")[rows],
        groups=None,
        total=len(rows),
    )


def check_store(
    store: Path,
    reference: Path | None = None,
    split: str = "test",
    max_images: int | None = None,
    seed: int = 0,
    probe: Path | None = None,
) -> dict[str, Any]:
    """``echo-synth memorisation STORE``: the pixel-space check of one synthetic store, calibrated
    by the ``split`` images of ``reference`` (default: the store its diffusion run trained on)
    whose patients the generator never saw; with ``probe`` (the same generator's store of new
    patients' maps) also the map-matched :func:`source_image_check`. Writes
    ``STEM-memorisation.json`` and the grid of the closest pairs ``STEM-memorisation.png`` next
    to the store, and the store's card."""
    store = Path(store)
    provenance = DatasetStore(store).info.get("provenance") or {}
    if provenance.get("source") != "synthetic":
        raise EchoSynthError(
            f"{store} is not a synthetic store (its provenance names no generator)"
        )
    runs = generator_runs(provenance)
    training = generator_training_images(runs)
    if reference is None:
        reference = Path(load_training_patients(runs[0])["store"])
    reader = DatasetStore(reference)
    rows = reference_split(reader, training.patients, split)
    data = load_synthetic([str(store)], max_images, seed)
    sizes = {tuple(data.images.shape[-2:]), tuple(training.images.shape[-2:]), reader.image_size}
    if len(sizes) > 1:
        raise EchoSynthError(
            f"{store}, its generator's training images and --reference {reference} differ in "
            f"image size ({', '.join(f'{h}×{w}' for h, w in sorted(sizes))}); name a reference "
            "store of the generator's size"
        )
    against = MemorisationReference.build(training, real_subset(reference, rows))
    entry = memorisation_check(
        data, against, grid=store.with_name(f"{store.stem}-memorisation.png")
    )
    if probe is not None:
        entry["spaces"]["source_image"] = source_image_check([store], probe)
    entry["store"] = str(store)
    entry["by"] = "echo-synth memorisation"
    entry["reference"].update(store=str(reference), split=split)
    out = store.with_name(f"{store.stem}-memorisation.json")
    out.write_text(json.dumps(entry, indent=2))
    write_card(store, memorisation=entry)
    entry["json"] = str(out)
    return entry
