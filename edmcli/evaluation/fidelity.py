"""The quality section of ``evaluate --fidelity``: every synthetic store judged in seconds by the
real-trained networks (:mod:`edmcli.evaluation.judges`), against the real test split.

The downstream verdict of :mod:`edmcli.evaluation.evaluate` trains a segmenter and a classifier
per synthetic store. This module scores a store without training anything, with the networks of
the *real-trained reference runs* (the best checkpoint of the first ``--train`` run on real
stores), one entry per store (:func:`score_images`):

* **Label fidelity** and the classifier's accuracy on the synthetic images
  (:func:`~edmcli.evaluation.judges.judgements`), overall and per view.
* **Domain feature distances**, synthetic vs the real test split, overall and per view: Fréchet
  distance, KID and precision / recall / density / coverage
  (:mod:`edmcli.evaluation.metrics.distribution`) on the segmenter's bottleneck and the
  classifier's penultimate layer. Inception-v3 pool features are added only when the weights
  file is in torch hub's cache; otherwise the report names the file to place there. Real
  reference numbers come with them: the real-trained networks on the real test images (label
  fidelity = the reference run's own test Dice) and the distances between two halves of the real
  test patients (the floor a perfect generator would reach with that many images).
* **Diversity**: the mean pairwise distance between samples of the same source label map (column
  ``source_index``; the K label transforms and the noise seeds): LPIPS (AlexNet) when its
  backbone is cached, else 1 − SSIM; next to it, 1 − Dice between the pairs' conditioning maps
  (how much of the spread the label transforms explain), and the image distance over pairs whose
  conditioning maps are identical (noise alone), where a store has such pairs.
* **Decoder ceiling** of a latent model: the real test images encoded and decoded by its Γ-VAE,
  judged like synthetic images: what a perfect generator of that latent space would reach.
* **Memorisation** (:mod:`edmcli.evaluation.memorisation`): the share of the store's images
  closer to a training image of their generator than the 1st / 5th percentile of the real test
  images of new patients, in pixel space and in the segmenter's and classifier's feature spaces.

Speed: a store is scored on at most :data:`FIDELITY_IMAGES` images, whole source groups drawn
at random (seeded, :func:`~edmcli.evaluation.image_sets.select_groups`), in large batches;
everything that follows the two forward passes works on arrays. Each entry reports its seconds,
and its flat numbers (:func:`summary_metrics`, keyed as :data:`METRICS`), which
:mod:`edmcli.evaluation.correlation` ranks against the downstream ones.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edmcli.console import console
from edmcli.data.labels import OUTSIDE, sector_mask
from edmcli.data.store import DatasetStore
from edmcli.errors import EchoSynthError
from edmcli.evaluation.image_sets import ImageSet, load_synthetic, real_image_set
from edmcli.evaluation.judges import (
    VIEW_KEYS,
    NetworkOutputs,
    ReferenceNetworks,
    judgements,
    load_reference_networks,
    run_networks,
    view_masks,
)
from edmcli.evaluation.memorisation import memorisation_check, source_image_check
from edmcli.evaluation.metrics.distribution import frechet_distance_from_features, kid, prdc
from edmcli.evaluation.metrics.diversity import (
    distance_name,
    group_pairs,
    lpips_distance,
    pair_distances,
    summarise_pairs,
)
from edmcli.evaluation.metrics.radiomics import radiomics_features
from edmcli.evaluation.metrics.segmentation import structure_dice
from edmcli.models.perceptual import MIN_IMAGE_SIZE, MissingWeightsError, build_perceptual
from edmcli.runs.memorisation import (
    MIN_REFERENCE,
    MemorisationReference,
    generator_runs,
    generator_training_images,
)

Halves = tuple[np.ndarray, np.ndarray]  # boolean masks of two halves of the real patients
FLOOR_DRAWS = 5
"""Splits of the real test patients into halves: the floor is the mean distance between the
halves (± its spread over the draws), and a synthetic store is scored at the same sizes, a
subsample as large as one half against the other, averaged over the same draws."""
MATCHED_METRICS = ("fd", "kid", "precision", "recall", "density", "coverage")
WINSOR = 5.0  # standardised features are clipped to ± this many real standard deviations
FIDELITY_IMAGES = 2000
"""Images scored per synthetic store (whole source groups, seeded); None in the calls: all."""
PRDC_K = 5  # Naeem et al.'s k
KID_SUBSETS = 50
KID_SUBSET_SIZE = 500
FEATURE_SPACES = ("segmenter", "classifier", "inception", "radiomics")
SPACE_TITLES = {
    "segmenter": "segmenter bottleneck",
    "classifier": "classifier penultimate layer",
    "inception": "Inception-v3 pool",
    "radiomics": "radiomics (first order + GLCM)",
}

# metric key → (title, higher is better); the flat summary of a store (see summary_metrics)
METRICS: dict[str, tuple[str, bool]] = {
    "label_dice": ("label fidelity: mean Dice", True),
    "label_hd95_lv": ("label fidelity: HD95 LV (px)", False),
    "synthetic_accuracy": ("classifier accuracy on synthetic", True),
    **{
        f"{space}.{name}": (f"{name.upper() if name in ('fd', 'kid') else name} "
                            f"({SPACE_TITLES[space]})", better)
        for space in FEATURE_SPACES
        for name, better in (("fd", False), ("kid", False), ("precision", True),
                             ("recall", True), ("density", True), ("coverage", True))
    },
    "diversity": ("diversity (same source map)", True),
}  # fmt: skip


# --------------------------------------------------------------------------- distances
def _balanced(a: np.ndarray, b: np.ndarray, rng: np.random.Generator):
    """Both sets subsampled (without replacement) to the smaller one's size."""
    m = min(len(a), len(b))
    pick = lambda x: x if len(x) == m else x[np.sort(rng.choice(len(x), m, replace=False))]  # noqa: E731
    return pick(a), pick(b)


def distances(
    synthetic: np.ndarray, real: np.ndarray, seed: int = 0, k: int = PRDC_K
) -> dict[str, Any]:
    """FD, KID (mean ± std over subsets) and PRDC of two (N, D) feature sets; PRDC on equal
    numbers of vectors (the larger set subsampled, seeded), as Naeem et al. recommend. Sets
    with ≤ k vectors get ``{"skipped": reason}``."""
    n_s, n_r = len(synthetic), len(real)
    if min(n_s, n_r) <= k:
        return {"n_synthetic": n_s, "n_real": n_r,
                "skipped": f"needs more than {k} images on each side"}  # fmt: skip
    rng = np.random.default_rng(np.random.SeedSequence([seed, n_s, n_r, 0xD157]))
    kid_estimate = kid(synthetic, real, KID_SUBSETS, KID_SUBSET_SIZE, seed)
    balanced_real, balanced_syn = _balanced(real, synthetic, rng)
    return {
        "n_synthetic": n_s,
        "n_real": n_r,
        "dim": int(synthetic.shape[1]),
        "fd": frechet_distance_from_features(synthetic, real),
        "kid": kid_estimate.mean,
        "kid_std": kid_estimate.std,
        "kid_subsets": kid_estimate.subsets,
        "kid_subset_size": kid_estimate.subset_size,
        **prdc(balanced_real, balanced_syn, k),
        "prdc_n": len(balanced_real),
    }


def feature_distances(
    synthetic: dict[str, np.ndarray],
    synthetic_views: np.ndarray,
    real: dict[str, np.ndarray],
    real_views: np.ndarray,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """:func:`distances` per feature space (present in both) and view key (all, A2C, A4C)."""
    out: dict[str, dict[str, Any]] = {}
    s_view, r_view = view_masks(np.asarray(synthetic_views)), view_masks(np.asarray(real_views))
    for space in FEATURE_SPACES:
        if space in synthetic and space in real:
            out[space] = {
                key: distances(synthetic[space][s_view[key]], real[space][r_view[key]], seed)
                for key in VIEW_KEYS
            }
    return out


def split_patients(
    patients: np.ndarray, seed: int, draw: int = 0
) -> tuple[np.ndarray, np.ndarray] | None:
    """Two halves of the images by patient (seeded; ``draw`` picks another split), as boolean
    masks; None for < 2 patients."""
    unique = np.unique(np.asarray(patients))
    if len(unique) < 2:
        return None
    rng = np.random.default_rng(np.random.SeedSequence([seed, len(unique), 0x4A1F, draw]))
    first = np.isin(patients, rng.permutation(unique)[: len(unique) // 2])
    return first, ~first


def real_halves(patients: np.ndarray, seed: int, draws: int = FLOOR_DRAWS) -> list[Halves]:
    """``draws`` seeded splits of the real images into two halves by patient
    (:func:`split_patients`); empty for < 2 patients."""
    halves = [split_patients(patients, seed, draw) for draw in range(draws)]
    return [h for h in halves if h is not None]


def feature_scale(real: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per feature space, the mean and standard deviation of each feature over the real images
    (a constant feature gets scale 1): distances are taken on features standardised by them
    (:func:`standardise`), so that no few dimensions or images with extreme activations outweigh
    the others (the classifier's penultimate layer has some ~100× larger than the rest)."""
    out = {}
    for space, feats in real.items():
        feats = np.asarray(feats, dtype=np.float64)
        std = feats.std(0)
        out[space] = (feats.mean(0), np.where(std > 1e-12, std, 1.0))
    return out


def standardise(
    features: dict[str, np.ndarray], scale: dict[str, tuple[np.ndarray, np.ndarray]]
) -> dict[str, np.ndarray]:
    """``features`` with each space's real mean removed, divided by its real spread and
    winsorised at ±:data:`WINSOR` (a robust standardisation): without the clip, a few synthetic
    images with extreme activations decided the classifier-feature FD of the demo's store alone
    (9.6e5 ± 1.9e6 over the floor's draws, against a floor of 714 ± 26; clipped: 659 ± 217
    against 483 ± 22)."""
    return {
        space: np.clip(
            (np.asarray(f, dtype=np.float64) - scale[space][0]) / scale[space][1], -WINSOR, WINSOR
        )
        for space, f in features.items()
        if space in scale
    }


def _average(draws: list[dict[str, Any]]) -> dict[str, Any]:
    """The per-draw :func:`distances` of one space and view, averaged: each metric's mean over
    the draws, its standard deviation in ``spread``."""
    if any("skipped" in d for d in draws):
        return next(d for d in draws if "skipped" in d)
    out = dict(draws[0])
    out["spread"] = {}
    for name in MATCHED_METRICS:
        values = np.array([d[name] for d in draws], dtype=np.float64)
        out[name] = float(values.mean())
        out["spread"][name] = float(values.std())
    for name in ("n_synthetic", "n_real", "prdc_n"):
        out[name] = float(np.mean([d[name] for d in draws]))
    out["draws"] = len(draws)
    return out


def matched_distances(
    pairs: list[tuple[dict[str, np.ndarray], np.ndarray, dict[str, np.ndarray], np.ndarray]],
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """:func:`feature_distances` of each (set, its views, real half, its views) pair — one per
    draw of the real halves — averaged over the draws (:func:`_average`)."""
    per_draw = [
        feature_distances(a, a_views, b, b_views, seed + draw)
        for draw, (a, a_views, b, b_views) in enumerate(pairs)
    ]
    return {
        space: {key: _average([d[space][key] for d in per_draw]) for key in VIEW_KEYS}
        for space in per_draw[0]
    } if per_draw else {}  # fmt: skip


def synthetic_pairs(
    features: dict[str, np.ndarray],
    views: np.ndarray,
    real: dict[str, np.ndarray],
    real_views: np.ndarray,
    halves: list[Halves],
    seed: int,
) -> list[tuple[dict[str, np.ndarray], np.ndarray, dict[str, np.ndarray], np.ndarray]]:
    """For each draw of the real halves: as many synthetic images as the first half holds,
    drawn at random (seeded), against the second half: the floor's sizes
    (:func:`real_reference_entry`), so that both rows carry the same small-sample bias."""
    pairs = []
    n = len(views)
    for draw, (first, second) in enumerate(halves):
        rng = np.random.default_rng(np.random.SeedSequence([seed, n, 0x5A3E, draw]))
        rows = np.sort(rng.choice(n, min(int(first.sum()), n), replace=False))
        pairs.append((
            {s: f[rows] for s, f in features.items()}, np.asarray(views)[rows],
            {s: f[second] for s, f in real.items()}, np.asarray(real_views)[second],
        ))  # fmt: skip
    return pairs


# --------------------------------------------------------------------------- diversity
def diversity(
    images: torch.Tensor,
    labels: torch.Tensor,
    groups: np.ndarray | None,
    distance: Any = "ssim",
) -> dict[str, Any]:
    """Pairwise diversity inside the source groups: the image distance over every pair
    (``images``), 1 − mean structure Dice of the pairs' conditioning maps (``label_maps``),
    and the image distance over the pairs whose conditioning maps are identical
    (``same_map``, noise alone). Entries are None where there is nothing to measure, with the
    reason in ``note``."""
    if groups is None:
        return {"images": None, "label_maps": None, "same_map": None,
                "note": "the store has no source_index column (not written by sample)"}  # fmt: skip
    first, second = group_pairs(groups)
    if len(first) == 0:
        return {"images": None, "label_maps": None, "same_map": None,
                "note": "every source label map has a single sample (sample -k 1)"}  # fmt: skip
    masks = (labels != OUTSIDE)[:, None]
    values = pair_distances(images, first, second, masks, distance)
    name = distance_name(distance)
    map_distance, same = [], []
    for start in range(0, len(first), 512):  # pairs of conditioning maps, in batches
        a = labels[torch.from_numpy(first[start : start + 512])]
        b = labels[torch.from_numpy(second[start : start + 512])]
        map_distance.append(1.0 - structure_dice(a, b).mean(1))
        same.append((a == b).flatten(1).all(1).numpy())
    map_distance, same = np.concatenate(map_distance), np.concatenate(same)
    summary = summarise_pairs(values, name, groups, first)
    maps = summarise_pairs(map_distance, "label_dice", groups, first)
    same_map = summarise_pairs(values[same], name, groups, first[same]) if same.any() else None
    return {
        "images": None if summary is None else summary.as_dict(),
        "label_maps": None if maps is None else {**maps.as_dict(),
                                                 "title": "1 − Dice of the conditioning maps"},
        "same_map": None if same_map is None else same_map.as_dict(),
        "note": None,
    }  # fmt: skip


def diversity_distance(image_size: int) -> tuple[Any, str | None]:
    """LPIPS (AlexNet) when its backbone is cached and the images are large enough, else
    ``"ssim"`` with a note saying why."""
    if image_size < MIN_IMAGE_SIZE["alex"]:
        return "ssim", f"diversity: 1 − SSIM (LPIPS needs images of {MIN_IMAGE_SIZE['alex']}²)"
    try:
        return lpips_distance(build_perceptual("alex")), None
    except MissingWeightsError as err:
        return "ssim", f"diversity: 1 − SSIM instead of LPIPS. {err}"


# --------------------------------------------------------------------------- one image set
def score_images(
    nets: ReferenceNetworks,
    data: ImageSet,
    real: NetworkOutputs,
    real_set: ImageSet,
    seed: int = 0,
    outputs: NetworkOutputs | None = None,
    distance: Any = "ssim",
    judged: np.ndarray | None = None,
) -> dict[str, Any]:
    """The quality entry of one image set against the real reference (``real``: the networks'
    outputs on the real images ``real_set``): label fidelity, classifier accuracy, feature
    distances per space and view, diversity, seconds.

    Distances are taken on features standardised by the real ones (:func:`feature_scale`), at
    the floor's sizes (:func:`synthetic_pairs`, averaged over :data:`FLOOR_DRAWS` draws) when
    the real set has ≥ 2 patients, else on the whole sets. ``judged``: boolean mask of the
    images that label fidelity and classifier accuracy are measured on (default all): those
    conditioned on maps of patients the judges never saw."""
    out = with_radiomics(outputs if outputs is not None else run_networks(nets, data.images), data)
    real = with_radiomics(real, real_set)
    t1 = time.perf_counter()
    keep = np.ones(len(data.images), bool) if judged is None else np.asarray(judged, bool)
    scale = feature_scale(real.features)
    mine, reference = standardise(out.features, scale), standardise(real.features, scale)
    halves = real_halves(real_set.patients, seed)
    if halves:
        pairs = synthetic_pairs(mine, data.views, reference, real_set.views, halves, seed)
        measured = matched_distances(pairs, seed)
    else:
        measured = feature_distances(mine, data.views, reference, real_set.views, seed)
    entry: dict[str, Any] = {
        "images_total": data.total,
        "images_scored": len(data.images),
        "images_judged": int(keep.sum()),
        **(judge_subset(out, data, keep)),
        "distances": measured,
    }
    t2 = time.perf_counter()
    entry["diversity"] = diversity(data.images, data.labels, data.groups, distance)
    t3 = time.perf_counter()
    entry["seconds"] = {"networks": out.seconds, "metrics": t2 - t1, "diversity": t3 - t2,
                        "total": out.seconds + (t3 - t1)}  # fmt: skip
    entry["summary"] = summary_metrics(entry)
    return entry


def with_radiomics(out: NetworkOutputs, data: ImageSet) -> NetworkOutputs:
    """``out`` with the radiomics features of ``data``'s images inside their sector
    (:func:`~edmcli.evaluation.metrics.radiomics.radiomics_features`), computed once."""
    if "radiomics" in out.features:
        return out
    t0 = time.perf_counter()
    feats = radiomics_features(data.images, data.labels != OUTSIDE)
    return dataclasses.replace(out, features={**out.features, "radiomics": feats},
                               seconds=out.seconds + time.perf_counter() - t0)  # fmt: skip


def judge_subset(out: NetworkOutputs, data: ImageSet, keep: np.ndarray) -> dict[str, Any]:
    """:func:`~edmcli.evaluation.judges.judgements` on the images of ``keep`` only (both
    verdicts None when it is empty)."""
    if not keep.any():
        return {"label_fidelity": None, "classifier_accuracy": None}
    rows = torch.from_numpy(np.flatnonzero(keep))
    subset = NetworkOutputs(
        seg_pred=None if out.seg_pred is None else out.seg_pred[rows],
        cls_pred=None if out.cls_pred is None else np.asarray(out.cls_pred)[keep],
        features={},
        seconds=0.0,
    )
    return judgements(subset, data.labels[rows], np.asarray(data.views)[keep])


def reference_patients(references: dict[str, tuple[Any, Path]]) -> set[str]:
    """Patients whose images the reference networks learnt from (the train split of their
    training stores) or were chosen on (the split that chose their checkpoint): their label maps
    cannot judge label fidelity, which would then reward a generator for reproducing images the
    judge memorised."""
    seen: set[str] = set()
    for settings, _run in references.values():
        for store in settings.train_stores:
            seen |= set(DatasetStore(store).patients("train"))
        if settings.val_store is not None:
            seen |= set(DatasetStore(settings.val_store).patients(settings.val_split))
    return seen


def unjudged_note(label: str, stores: list[str]) -> str:
    """One line: why a store has no label fidelity, and how to get a probe store."""
    prov = DatasetStore(stores[0]).info.get("provenance") or {}
    run = prov.get("run") or "RUN"
    nfe = prov.get("nfe")
    return (
        f"{label}: label fidelity and classifier accuracy not measured: every scored image was "
        "conditioned on a label map of a patient the reference networks trained or were chosen "
        "on; sample a probe store from the test maps with the same settings (echo-synth sample "
        f"--run {run}{f' --nfe {nfe}' if nfe else ''} --labels TEST_STORE --splits test --k 1 "
        "--out PROBE.zarr) and pass it with --probe PROBE.zarr"
    )


def summary_metrics(entry: dict[str, Any]) -> dict[str, float]:
    """The flat numbers of an entry (all views) that the correlation table ranks, keyed as
    :data:`METRICS`."""
    out: dict[str, float] = {}
    fidelity = (entry.get("label_fidelity") or {}).get("all")
    if fidelity:
        out["label_dice"] = fidelity["dice_mean"]
        out["label_hd95_lv"] = fidelity["hd95_px"]["lv_endocardium"]
    accuracy = (entry.get("classifier_accuracy") or {}).get("all")
    if accuracy:
        out["synthetic_accuracy"] = accuracy["accuracy"]
    for space, per_view in (entry.get("distances") or {}).items():
        d = per_view.get("all") or {}
        for name in ("fd", "kid", "precision", "recall", "density", "coverage"):
            if name in d:
                out[f"{space}.{name}"] = d[name]
    images = (entry.get("diversity") or {}).get("images")
    if images:
        out["diversity"] = images["mean"]
    return {k: float(v) for k, v in out.items()}


def real_reference_entry(
    real: ImageSet,
    outputs: NetworkOutputs,
    seed: int = 0,
    store: str | None = None,
    split: str | None = None,
) -> dict[str, Any]:
    """The *real* row of the quality section: the real-trained networks on the real images
    (label fidelity against the ground truth, classifier accuracy) and, as ``halves``, the
    feature distances between two halves of the real patients, averaged over
    :data:`FLOOR_DRAWS` seeded splits with their spread: the floor of each distance at these
    sizes, at which every synthetic store is scored too. ``summary`` takes its distances from
    the halves."""
    outputs = with_radiomics(outputs, real)
    entry: dict[str, Any] = {
        "store": store,
        "split": split,
        "images": len(real.images),
        "patients": len(np.unique(real.patients)),
        **judgements(outputs, real.labels, real.views),
        "seconds": outputs.seconds,
    }
    halves = real_halves(real.patients, seed)
    distances_of_halves: dict[str, Any] = {}
    if halves:
        feats = standardise(outputs.features, feature_scale(outputs.features))
        pairs = [
            ({s: f[a] for s, f in feats.items()}, real.views[a],
             {s: f[b] for s, f in feats.items()}, real.views[b])
            for a, b in halves
        ]  # fmt: skip
        distances_of_halves = matched_distances(pairs, seed)
        entry["halves"] = {
            "what": f"one half of the real patients against the other, averaged over {len(halves)} "
            "seeded splits (spread: their standard deviation): the floor of each distance at "
            "these sizes",
            "draws": len(halves),
            "distances": distances_of_halves,
        }
    entry["summary"] = summary_metrics({**entry, "distances": distances_of_halves})
    return entry


# --------------------------------------------------------------------------- decoder ceiling
def reconstruct(vae: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 64
                ) -> torch.Tensor:  # fmt: skip
    """(N, 1, H, W) images in [0, 1] encoded and decoded by a Γ-VAE (posterior mean, the
    latent a perfect diffusion model would have to generate), within the maps' sector."""
    device = next(vae.parameters()).device
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch):
            x = images[start : start + batch].to(device)
            maps = labels[start : start + batch].long().to(device)
            sector = sector_mask(maps)
            out.append(vae.decode(vae.encode(x, sector), sector, maps).clamp(0, 1).cpu())
    return torch.cat(out)


def decoder_ceiling(nets: ReferenceNetworks, vae: nn.Module, real: ImageSet) -> dict[str, Any]:
    """The real test images through a latent model's Γ-VAE, judged like synthetic images: the
    label fidelity and classifier accuracy that a perfect generator of that latent space would
    reach (its decoder's ceiling). Inception features are not computed here."""
    t0 = time.perf_counter()
    recon = reconstruct(vae, real.images, real.labels, nets.batch)
    out = run_networks(dataclasses.replace(nets, inception=None), recon)
    mse = ((recon - real.images) ** 2).mean().item()
    return {
        "images": len(real.images),
        "psnr_db": float(10 * np.log10(1.0 / max(mse, 1e-12))),
        **judgements(out, real.labels, real.views),
        "seconds": time.perf_counter() - t0,
    }


def _ceiling_of(
    nets: ReferenceNetworks, vae_run: str, real: ImageSet, device: torch.device, notes: list[str]
) -> dict[str, Any] | None:
    """:func:`decoder_ceiling` of the Γ-VAE run ``vae_run``, or None and a note when it cannot
    be loaded (moved or deleted since sampling)."""
    # imported here, not at the top: the loader is looked up when called, so that a replaced
    # edmcli.runs.vae_run.load_vae_run (the tests' stand-in Γ-VAE) is the one used
    from edmcli.runs.vae_run import load_vae_run

    try:
        loaded = load_vae_run(Path(vae_run), device)
    except (EchoSynthError, OSError) as err:
        notes.append(
            f"decoder ceiling not measured: the Γ-VAE run {vae_run} cannot be loaded ({err})"
        )
        return None
    vae, side = loaded.model, int(real.images.shape[-1])
    if vae.config.image_size != side:
        notes.append(
            f"decoder ceiling not measured: the Γ-VAE run {vae_run} codes "
            f"{vae.config.image_size}² images, the real test images are {side}²"
        )
        return None
    ceiling = decoder_ceiling(nets, vae, real)
    return {"vae_run": str(vae_run), "checkpoint_sha256": loaded.sha256, **ceiling}


# --------------------------------------------------------------------------- memorisation
MEMORISATION_FEATURES = ("segmenter", "classifier")


def memorisation_entry(
    provenance: dict[str, Any],
    data: ImageSet,
    outputs: NetworkOutputs,
    nets: ReferenceNetworks,
    real: ImageSet,
    real_out: NetworkOutputs,
    generators: dict[tuple[str, ...], Any],
    notes: list[str],
    grid: Path | None = None,
) -> dict[str, Any] | None:
    """The memorisation check of one store (:func:`~edmcli.evaluation.memorisation.
    memorisation_check`) against its generator's training images, calibrated by the real test
    images of patients the generator never saw, in pixel space and the networks' feature spaces
    (standardised by the real test features). What a generator's stores share is built once
    (:class:`~edmcli.runs.memorisation.MemorisationReference`, kept in ``generators``).
    None, with a note, when the generator's runs cannot be read or the images do not match."""
    t0 = time.perf_counter()
    runs = tuple(str(r) for r in generator_runs(provenance))
    if runs not in generators:
        generators[runs] = memorisation_reference(runs, nets, real, real_out)
    against = generators[runs]
    if isinstance(against, str):
        notes.append(f"memorisation not checked for a store of {runs[0] if runs else '?'}: "
                     f"{against}")  # fmt: skip
        return None
    sizes = {tuple(x.shape[-2:]) for x in (data.images, against.training.images)}
    if len(sizes) > 1:
        notes.append(
            "memorisation not checked: the synthetic and the training images differ in size "
            f"({', '.join(f'{h}×{w}' for h, w in sorted(sizes))}); compare them at one size"
        )
        return None
    scale = feature_scale({s: real_out.features[s] for s in against.train_features})
    mine = standardise(outputs.features, scale)
    features = {space: mine[space].astype(np.float32) for space in against.train_features}
    entry = memorisation_check(data, against, features, grid)
    entry["by"] = "evaluate --fidelity"
    entry["seconds"] = time.perf_counter() - t0
    return entry


def memorisation_reference(
    runs: tuple[str, ...], nets: ReferenceNetworks, real: ImageSet, real_out: NetworkOutputs
) -> MemorisationReference | str:
    """A generator's :class:`~edmcli.runs.memorisation.MemorisationReference`: its
    training images through the networks, and the real test images of the patients it never
    saw; or why there is none (one line)."""
    try:
        training = generator_training_images([Path(r) for r in runs])
    except (EchoSynthError, OSError) as err:
        return str(err)
    sizes = {tuple(x.shape[-2:]) for x in (training.images, real.images)}
    if len(sizes) > 1:
        return (f"its training images and the real test images differ in size "
                f"({', '.join(f'{h}×{w}' for h, w in sorted(sizes))})")  # fmt: skip
    new = ~np.isin(real.patients, training.patients)
    if new.sum() < MIN_REFERENCE:
        return (f"{int(new.sum())} real test images of patients the generator never saw "
                f"(needs {MIN_REFERENCE})")  # fmt: skip
    rows = torch.from_numpy(np.flatnonzero(new))
    reference = ImageSet(real.images[rows], real.labels[rows], real.views[new], real.patients[new],
                         None, int(new.sum()))  # fmt: skip
    train_out = run_networks(dataclasses.replace(nets, inception=None), training.images)
    scale = feature_scale({s: f for s, f in real_out.features.items()
                           if s in MEMORISATION_FEATURES})  # fmt: skip
    theirs = standardise(train_out.features, scale)
    ref = standardise(real_out.features, scale)
    features = {space: (theirs[space].astype(np.float32), ref[space][new].astype(np.float32))
                for space in scale if space in theirs}  # fmt: skip
    return MemorisationReference.build(training, reference, features)


# --------------------------------------------------------------------------- evaluate's section
def quality_section(
    plans: list[dict[str, Any]],
    test_data: dict[str, Any],
    device: torch.device,
    seed: int = 0,
    max_images: int | None = FIDELITY_IMAGES,
    probes: dict[str, str] | None = None,
    grid_dir: Path | None = None,
) -> dict[str, Any]:
    """Score every synthetic ``--train`` spec of an ``evaluate`` call with the networks of its
    real-trained reference runs (the first real run per task), against the real test split.

    ``plans`` are evaluate's (``task``, ``spec``, ``settings``, ``run_dir``); ``test_data`` its
    test splits (``seg`` and/or ``cls`` :class:`~edmcli.evaluation.downstream.SplitData`);
    ``probes`` (spec slug → store, :func:`~edmcli.evaluation.train_specs.match_probes`): the
    stores that judge label fidelity and accuracy of a spec's generator. Without a probe they
    are judged on the spec's own images of patients the judges never saw
    (:func:`reference_patients`), or not at all, with a note saying how to get a probe.
    ``grid_dir``: where the memorisation check draws each store's closest pairs.
    """
    probes = probes or {}
    started = time.perf_counter()
    references: dict[str, tuple[Any, Path]] = {}
    for plan in plans:
        if plan["spec"].kind == "real" and plan["task"] not in references:
            references[plan["task"]] = (plan["settings"], Path(plan["run_dir"]))
    if not references:
        raise ValueError("quality_section needs a real-trained reference run")
    nets, notes = load_reference_networks(references, device)
    known = np.array(sorted(reference_patients(references)), dtype=str)  # the judges saw them
    real_split = test_data["seg"] if "seg" in test_data else test_data["cls"]
    real = real_image_set(real_split)  # images of unknown view count in "all" only
    size = int(real.images.shape[-1])
    distance, note = diversity_distance(size)
    if note:
        notes.append(note)
    real_out = with_radiomics(run_networks(nets, real.images), real)
    real_entry = real_reference_entry(real, real_out, seed, real_split.store, real_split.split)
    stores = []
    ceilings: dict[str, dict[str, Any] | None] = {}  # Γ-VAE run → its ceiling
    generators: dict[tuple[str, ...], Any] = {}  # generator runs → training images, features
    seen: set[str] = set()
    for plan in plans:
        spec = plan["spec"]
        if spec.kind != "synthetic" or spec.slug in seen:
            continue
        seen.add(spec.slug)
        t0 = time.perf_counter()
        data = load_synthetic(spec.stores, max_images, seed)
        load_s = time.perf_counter() - t0
        probe = probes.get(spec.slug)
        judged = np.zeros(len(data.images), bool) if probe else ~np.isin(data.patients, known)
        outputs = run_networks(nets, data.images)
        entry = score_images(nets, data, real_out, real, seed, outputs=outputs, distance=distance,
                             judged=judged)  # fmt: skip
        entry["judged_on"] = {
            "store": None,
            "images": entry["images_judged"],
            "what": "its own images of patients the judges never saw",
        }
        if probe:
            t1 = time.perf_counter()
            probed = load_synthetic([probe], None, seed)
            unseen = ~np.isin(probed.patients, known)
            entry.update(judge_subset(run_networks(nets, probed.images), probed, unseen))
            entry["images_judged"] = int(unseen.sum())
            entry["judged_on"] = {"store": probe, "images": int(unseen.sum()),
                                  "what": "its probe store (same generator and settings, maps "
                                  "of patients the judges never saw)"}  # fmt: skip
            entry["summary"] = summary_metrics(entry)
            entry["seconds"]["probe"] = time.perf_counter() - t1
            entry["seconds"]["total"] += entry["seconds"]["probe"]
        if entry["images_judged"] == 0:
            entry["judged_on"]["note"] = unjudged_note(spec.label, spec.stores)
            notes.append(entry["judged_on"]["note"])
        entry["seconds"]["load"] = load_s
        vae_run = spec.provenance[0].get("vae_run")  # latent models: their Γ-VAE run
        if vae_run is not None and vae_run not in ceilings:  # measured once per Γ-VAE run
            ceilings[vae_run] = _ceiling_of(nets, vae_run, real, device, notes)
            if ceilings[vae_run] is not None:
                entry["seconds"]["decoder_ceiling"] = ceilings[vae_run]["seconds"]
                entry["seconds"]["total"] += ceilings[vae_run]["seconds"]
        entry["decoder_ceiling"] = ceilings.get(vae_run) if vae_run is not None else None
        grid = None if grid_dir is None else Path(grid_dir) / f"memorisation-{spec.slug}.png"
        entry["memorisation"] = memorisation_entry(
            spec.provenance[0], data, outputs, nets, real, real_out, generators, notes, grid
        )
        if entry["memorisation"] is not None and probe:
            entry["memorisation"]["spaces"]["source_image"] = source_image_check(spec.stores, probe)
        if entry["memorisation"] is not None:
            entry["seconds"]["memorisation"] = entry["memorisation"]["seconds"]
            entry["seconds"]["total"] += entry["memorisation"]["seconds"]
        entry["seconds"]["total"] += load_s
        stores.append({"label": spec.label, "slug": spec.slug, "model": spec.model,
                       "nfe": spec.nfe, "solver": spec.solver, "stores": spec.stores,
                       **entry})  # fmt: skip
        console.print(
            f"quality of {spec.label}: {entry['images_scored']} of {entry['images_total']} "
            f"images in {entry['seconds']['total']:.1f} s",
            highlight=False,
        )
    return {
        "what": "synthetic images judged by the real-trained networks, against the real test "
        "split: label fidelity, classifier accuracy, feature distances, diversity",
        "reference_runs": nets.runs,
        "max_images": max_images,
        "selection": "whole source groups in a seeded random order until the cap"
        if max_images is not None
        else "every image",
        "prdc_k": PRDC_K,
        "kid": {
            "subsets": KID_SUBSETS,
            "subset_size": KID_SUBSET_SIZE,
            "kernel": "(x·y/d + 1)³, unbiased MMD²",
        },
        "feature_spaces": {s: SPACE_TITLES[s] for s in FEATURE_SPACES if s in real_out.features},
        "diversity_distance": distance_name(distance),
        "notes": notes,
        "real": real_entry,
        "stores": stores,
        "seconds": time.perf_counter() - started,
        "correlation": None,
    }
