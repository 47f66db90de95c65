"""Judging a synthetic dataset in seconds, with the real-trained networks (``evaluate --fidelity``).

The downstream verdict of :mod:`edmcli.evaluation.evaluate` trains a segmenter and a classifier
per synthetic store. This module scores a store without training anything, with the networks of
the *real-trained reference runs* (the best checkpoint of the first ``--train`` run on real
stores, :func:`edmcli.evaluation.downstream.load_best`):

* **Label fidelity** (the check of semantic image synthesis, as SPADE and SDM report it): the
  real-trained segmenter segments every scored synthetic image; Dice per structure and HD95 per
  structure (pixels of the store; an empty mask scores the image diagonal, as in
  :mod:`edmcli.evaluation.metrics`) against the label map that *conditioned* the image (the
  store's ``labels``), overall and per view. The real-trained classifier's accuracy on the
  synthetic images against their view.
* **Domain feature distances**, synthetic vs the real test split, overall and per view: Fréchet
  distance, KID and precision / recall / density / coverage (:mod:`edmcli.evaluation.quality`)
  on the segmenter's bottleneck (DynUNet ``bottleneck``, global average pooled; captured with a
  forward hook during the segmentation above) and the classifier's penultimate layer
  (EfficientNetV2-S ``avgpool``, 1280-D). Inception-v3 pool features (2048-D; torchvision's
  ImageNet weights, images resized to 299², grey repeated to RGB) are added only when the weights
  file is in torch hub's cache; otherwise the report names the file to place there. Real
  reference numbers come with them: the real-trained networks on the real test images (label
  fidelity = the reference run's own test Dice) and the distances between two halves of the real
  test patients (the floor a perfect generator would reach with that many images).
* **Diversity**: the mean pairwise distance between samples of the same source label map (column
  ``source_index``; the K label transforms and the noise seeds): LPIPS (AlexNet) when its
  backbone is cached, else 1 − SSIM; next to it, 1 − Dice between the pairs' conditioning maps
  (how much of the spread the label transforms explain), and the image distance over pairs whose
  conditioning maps are identical (noise alone), where a store has such pairs.

Speed: a store is scored on at most :data:`FIDELITY_IMAGES` images, whole source groups drawn
at random (seeded), in large batches; everything that follows the two forward passes works on
arrays. Each entry reports its seconds. :func:`correlation_table` then ranks, over ≥ 3 scored
stores, how well each metric predicts the downstream mean Dice and accuracy (Spearman's ρ with a
bootstrap interval over the stores).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edmcli.console import console
from edmcli.data.labels import OUTSIDE, SECTOR, VIEWS
from edmcli.data.store import DatasetStore
from edmcli.evaluation import quality as q
from edmcli.evaluation.metrics import (
    SCORING_CLASSES,
    STRUCTURES,
    image_diagonal,
)

FIDELITY_IMAGES = 2000
"""Images scored per synthetic store (whole source groups, seeded); None in the calls: all."""
PRDC_K = 5  # Naeem et al.'s k
KID_SUBSETS = 50
KID_SUBSET_SIZE = 500
FEATURE_SPACES = ("segmenter", "classifier", "inception")
SPACE_TITLES = {
    "segmenter": "segmenter bottleneck",
    "classifier": "classifier penultimate layer",
    "inception": "Inception-v3 pool",
}
VIEW_KEYS = ("all", *VIEWS)
INCEPTION_SIZE = 299
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

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
TARGETS = {"dice_mean": ("seg", "downstream mean Dice"), "accuracy": ("cls", "downstream accuracy")}


# --------------------------------------------------------------------------- Inception
def inception_weights_path() -> Path:
    """Where torch hub's cache keeps torchvision's Inception-v3 ImageNet weights
    (``torch.hub.get_dir()/checkpoints/inception_v3_google-0cc3c7bd.pth``)."""
    from torchvision.models import Inception_V3_Weights

    return (
        Path(torch.hub.get_dir())
        / "checkpoints"
        / Path(Inception_V3_Weights.IMAGENET1K_V1.url).name
    )


def inception_missing_message() -> str:
    """The one line that says which file to place for the Inception FID."""
    from torchvision.models import Inception_V3_Weights

    path = inception_weights_path()
    return (
        f"Inception FID skipped: it needs torchvision's ImageNet weights file {path.name} in "
        f"{path.parent} (torch hub's cache, set by $TORCH_HOME): copy "
        f"{Inception_V3_Weights.IMAGENET1K_V1.url} there from a machine with internet; the "
        "domain-feature metrics do not need it"
    )


def build_inception(device: torch.device | str = "cpu") -> nn.Module:
    """torchvision Inception-v3 with its ImageNet weights read from torch hub's cache (never
    downloaded) and the classifier removed: ``forward`` gives (N, 2048) pool features.

    Raises:
        MissingWeightsError: when the weights file is not in the cache (the message names it).
        ValueError: when the file is not an Inception-v3 state dict.
    """
    from torchvision.models import inception_v3

    from edmcli.models.perceptual import MissingWeightsError

    path = inception_weights_path()
    if not path.is_file():
        raise MissingWeightsError(inception_missing_message())
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model = inception_v3(weights=None, aux_logits=True, transform_input=True,
                             init_weights=False)  # fmt: skip
        model.load_state_dict(state)
    except Exception as err:  # a damaged or foreign file
        raise ValueError(f"{path} is not a torchvision Inception-v3 state dict ({err})") from err
    model.fc = nn.Identity()
    return model.to(device).eval()


@torch.no_grad()
def inception_features(model: nn.Module, images: torch.Tensor, batch: int = 64) -> np.ndarray:
    """(N, 2048) Inception pool features of (N, 1, H, W) images in [0, 1]: resized to 299²
    (bilinear), grey repeated to three channels, ImageNet-normalised (torchvision's
    ``transform_input`` maps that to the scaling the Google weights expect)."""
    device = next(model.parameters()).device
    mean = torch.tensor(_IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(_IMAGENET_STD, device=device).view(1, 3, 1, 1)
    out = []
    for start in range(0, len(images), batch):
        x = images[start : start + batch].to(device).float()
        x = F.interpolate(x, (INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", antialias=True)
        out.append(model((x.expand(-1, 3, -1, -1) - mean) / std).float().cpu())
    return torch.cat(out).numpy()


# --------------------------------------------------------------------------- network outputs
@contextmanager
def captured_features(layer: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect the (globally average-pooled) output of ``layer`` at every forward pass while
    the context is open: a list of (B, C) float32 CPU tensors, one per call."""
    store: list[torch.Tensor] = []

    def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        out = output.float()
        store.append((out.flatten(2).mean(2) if out.ndim > 2 else out).cpu())

    handle = layer.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def segmenter_outputs(
    model: nn.Module,
    images: torch.Tensor,
    size: int,
    batch: int = 128,
    layer: nn.Module | None = None,
) -> tuple[torch.Tensor, np.ndarray]:
    """(label maps (N, H, W) uint8 in 0–3, features (N, C)) from one pass of the segmenter
    (:func:`~edmcli.evaluation.downstream.segment`): the features are ``layer``'s output
    (default the DynUNet ``bottleneck``) averaged over space."""
    from edmcli.evaluation.downstream import segment

    with captured_features(layer if layer is not None else model.bottleneck) as feats:
        pred = segment(model, images, size, batch)
    return pred.to(torch.uint8), torch.cat(feats).numpy()


def classifier_outputs(
    model: nn.Module,
    images: torch.Tensor,
    size: int,
    batch: int = 128,
    layer: nn.Module | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(predicted view (N,), penultimate features (N, C)) from one pass of the view classifier
    (:func:`~edmcli.evaluation.downstream.classify`); default layer: EfficientNet's ``avgpool``."""
    from edmcli.evaluation.downstream import classify

    with captured_features(layer if layer is not None else model.avgpool) as feats:
        views, _ = classify(model, images, size, batch)
    return np.asarray(views), torch.cat(feats).numpy()


@dataclass
class ReferenceNetworks:
    """The real-trained networks that judge synthetic images (None where not trained)."""

    segmenter: nn.Module | None = None
    seg_size: int = 64
    classifier: nn.Module | None = None
    cls_size: int = 64
    inception: nn.Module | None = None
    runs: dict[str, str] | None = None  # task → run folder
    batch: int = 128
    segmenter_layer: nn.Module | None = None  # default: segmenter.bottleneck
    classifier_layer: nn.Module | None = None  # default: classifier.avgpool


def inference_batch(eval_batch: int, size: int) -> int:
    """Images per forward pass: the preset's ``eval_batch``, raised so that a batch holds about
    128 images of 64² (fewer, larger images at larger sizes)."""
    return max(int(eval_batch), (128 * 64 * 64) // (size * size))


def _channels_last(model: nn.Module) -> nn.Module:
    """The same network with channels-last weights: its convolutions then run channels-last
    (measured on a 2-core CPU at 64²: EfficientNetV2-S 6.6 → 5.0 ms per image, DynUNet 7.5 →
    6.5), with the same outputs up to rounding."""
    return model.to(memory_format=torch.channels_last)


def load_reference_networks(
    references: dict[str, tuple[Any, Path]], device: torch.device, inception: bool = True
) -> tuple[ReferenceNetworks, list[str]]:
    """The best checkpoints of the reference runs (task → (DownstreamSettings, run folder)),
    and Inception-v3 when its weights are cached. Returns the networks and notes (the missing
    Inception weights' file)."""
    from edmcli.evaluation.downstream import load_best
    from edmcli.models.perceptual import MissingWeightsError

    nets = ReferenceNetworks(runs={task: str(run) for task, (_, run) in references.items()})
    batches = []
    if "seg" in references:
        settings, run = references["seg"]
        nets.segmenter = _channels_last(load_best(settings, run, device)[0])
        nets.seg_size = settings.size
        batches.append(inference_batch(settings.eval_batch, settings.size))
    if "cls" in references:
        settings, run = references["cls"]
        nets.classifier = _channels_last(load_best(settings, run, device)[0])
        nets.cls_size = settings.size
        batches.append(inference_batch(settings.eval_batch, settings.size))
    nets.batch = min(batches) if batches else 128
    notes = []
    if inception:
        try:
            nets.inception = build_inception(device)
        except MissingWeightsError as err:
            notes.append(str(err))
    return nets, notes


@dataclass
class NetworkOutputs:
    """What the reference networks make of one set of images."""

    seg_pred: torch.Tensor | None  # (N, H, W) classes 0–3
    cls_pred: np.ndarray | None  # (N,) 0 A2C, 1 A4C
    features: dict[str, np.ndarray]  # feature space → (N, D)
    seconds: float


def run_networks(nets: ReferenceNetworks, images: torch.Tensor) -> NetworkOutputs:
    """One batched pass of each reference network over (N, 1, H, W) images in [0, 1]."""
    t0 = time.perf_counter()
    features: dict[str, np.ndarray] = {}
    seg_pred = cls_pred = None
    if nets.segmenter is not None:
        seg_pred, features["segmenter"] = segmenter_outputs(
            nets.segmenter, images, nets.seg_size, nets.batch, nets.segmenter_layer
        )
    if nets.classifier is not None:
        cls_pred, features["classifier"] = classifier_outputs(
            nets.classifier, images, nets.cls_size, nets.batch, nets.classifier_layer
        )
    if nets.inception is not None:
        features["inception"] = inception_features(nets.inception, images)
    return NetworkOutputs(seg_pred, cls_pred, features, time.perf_counter() - t0)


# --------------------------------------------------------------------------- image sets
@dataclass
class ImageSet:
    """Images to judge, with what conditioned them."""

    images: torch.Tensor  # (N, 1, H, W) float in [0, 1]
    labels: torch.Tensor  # (N, H, W) integer store label ids (synthetic: the conditioning map)
    views: np.ndarray  # (N,) 0 A2C, 1 A4C, -1 unknown
    patients: np.ndarray  # (N,) str
    groups: np.ndarray | None  # (N,) source label map of each image (None: not recorded)
    total: int  # images in the store(s) before the selection


def _view_ids(values: np.ndarray) -> np.ndarray:
    lookup = {name: k for k, name in enumerate(VIEWS)}
    return np.array([lookup.get(str(v), -1) for v in values], dtype=np.int64)


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
        images.append(np.asarray(reader.images.get_orthogonal_selection((rows,))))
        labels.append(np.asarray(reader.labels.get_orthogonal_selection((rows,))))
        views.append(_view_ids(reader.column("view")[rows]))
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


# --------------------------------------------------------------------------- metrics
def _by_view(views: np.ndarray) -> dict[str, np.ndarray]:
    return {"all": np.ones(len(views), bool), **{v: views == k for k, v in enumerate(VIEWS)}}


def _scoring_uint8(labels: torch.Tensor) -> torch.Tensor:
    """Store label ids (0–4) or scoring classes (0–3) → scoring classes as uint8 (*sector*
    joins background), checked like :func:`~edmcli.evaluation.metrics.to_scoring_labels`."""
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
    :func:`edmcli.evaluation.metrics.dice_per_structure` (both empty 1, one empty 0)."""
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


def structure_hd95(
    pred: torch.Tensor, target: torch.Tensor
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """HD95 (pixels) per structure and image, every image at once
    (:func:`~edmcli.evaluation.quality.hausdorff_percentile`), with the policy of
    :mod:`edmcli.evaluation.metrics`: both masks empty 0; exactly one empty the image diagonal,
    flagged as failed. Returns (structure → (N,) distances, structure → (N,) failed)."""
    pred, target = _scoring_uint8(pred), _scoring_uint8(target)
    penalty = image_diagonal(tuple(pred.shape[-2:]))
    values, failed = {}, {}
    for name, structure in STRUCTURES.items():
        p, t = pred == structure, target == structure
        has_p, has_t = p.flatten(1).any(1).numpy(), t.flatten(1).any(1).numpy()
        d = q.hausdorff_percentile(p, t, 95)
        failed[name] = has_p != has_t
        values[name] = np.where(failed[name], penalty, np.where(has_p & has_t, d, 0.0))
    return values, failed


def label_fidelity(
    pred: torch.Tensor, conditioning: torch.Tensor, views: np.ndarray
) -> dict[str, Any]:
    """Dice per structure and HD95 per structure (pixels) of the segmentation of each image
    against the label map that conditioned it, summarised overall and per view.

    Returns:
        view key → ``{"n", "dice": {structure: mean}, "dice_mean", "dice_mean_std",
        "hd95_px": {structure: mean}, "hd95_failures": {structure: count}}`` (a view without
        images is left out).
    """
    dice = structure_dice(pred, conditioning)  # (N, 3)
    hd95, failed = structure_hd95(pred, conditioning)
    out: dict[str, Any] = {}
    for key, keep in _by_view(np.asarray(views)).items():
        if not keep.any():
            continue
        mean = dice[keep].mean(1)
        out[key] = {
            "n": int(keep.sum()),
            "dice": {name: float(dice[keep, k].mean()) for k, name in enumerate(STRUCTURES)},
            "dice_mean": float(mean.mean()),
            "dice_mean_std": float(mean.std()),
            "hd95_px": {name: float(hd95[name][keep].mean()) for name in STRUCTURES},
            "hd95_failures": {name: int(failed[name][keep].sum()) for name in STRUCTURES},
        }
    return out


def view_accuracy(pred: np.ndarray, views: np.ndarray) -> dict[str, Any] | None:
    """Accuracy of predicted views against the true ones, overall and per view (the recall of
    that view), on the images whose view is known; None when none is."""
    pred, views = np.asarray(pred), np.asarray(views)
    known = views >= 0
    if not known.any():
        return None
    out = {}
    for key, keep in _by_view(views).items():
        keep = keep & known
        if keep.any():
            out[key] = {"n": int(keep.sum()), "accuracy": float((pred[keep] == views[keep]).mean())}
    return out


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
    kid = q.kid(synthetic, real, KID_SUBSETS, KID_SUBSET_SIZE, seed)
    balanced_real, balanced_syn = _balanced(real, synthetic, rng)
    return {
        "n_synthetic": n_s,
        "n_real": n_r,
        "dim": int(synthetic.shape[1]),
        "fd": q.frechet_distance_from_features(synthetic, real),
        "kid": kid.mean,
        "kid_std": kid.std,
        "kid_subsets": kid.subsets,
        "kid_subset_size": kid.subset_size,
        **q.prdc(balanced_real, balanced_syn, k),
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
    s_view, r_view = _by_view(np.asarray(synthetic_views)), _by_view(np.asarray(real_views))
    for space in FEATURE_SPACES:
        if space in synthetic and space in real:
            out[space] = {
                key: distances(synthetic[space][s_view[key]], real[space][r_view[key]], seed)
                for key in VIEW_KEYS
            }
    return out


def split_patients(patients: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Two halves of the images by patient (seeded), as boolean masks; None for < 2 patients."""
    unique = np.unique(np.asarray(patients))
    if len(unique) < 2:
        return None
    rng = np.random.default_rng(np.random.SeedSequence([seed, len(unique), 0x4A1F]))
    first = np.isin(patients, rng.permutation(unique)[: len(unique) // 2])
    return first, ~first


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
    first, second = q.group_pairs(groups)
    if len(first) == 0:
        return {"images": None, "label_maps": None, "same_map": None,
                "note": "every source label map has a single sample (sample -k 1)"}  # fmt: skip
    masks = (labels != OUTSIDE)[:, None]
    values = q.pair_distances(images, first, second, masks, distance)
    name = q.distance_name(distance)
    map_distance, same = [], []
    for start in range(0, len(first), 512):  # pairs of conditioning maps, in batches
        a = labels[torch.from_numpy(first[start : start + 512])]
        b = labels[torch.from_numpy(second[start : start + 512])]
        map_distance.append(1.0 - structure_dice(a, b).mean(1))
        same.append((a == b).flatten(1).all(1).numpy())
    map_distance, same = np.concatenate(map_distance), np.concatenate(same)
    summary = q.summarise_pairs(values, name, groups, first)
    maps = q.summarise_pairs(map_distance, "label_dice", groups, first)
    same_map = q.summarise_pairs(values[same], name, groups, first[same]) if same.any() else None
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
    from edmcli.models.perceptual import MIN_IMAGE_SIZE, MissingWeightsError, build_perceptual

    if image_size < MIN_IMAGE_SIZE["alex"]:
        return "ssim", f"diversity: 1 − SSIM (LPIPS needs images of {MIN_IMAGE_SIZE['alex']}²)"
    try:
        return q.lpips_distance(build_perceptual("alex")), None
    except MissingWeightsError as err:
        return "ssim", f"diversity: 1 − SSIM instead of LPIPS. {err}"


# --------------------------------------------------------------------------- one image set
def judgements(out: NetworkOutputs, labels: torch.Tensor, views: np.ndarray) -> dict[str, Any]:
    """``label_fidelity`` and ``classifier_accuracy`` of the reference networks' outputs on
    images conditioned on (or labelled with) ``labels`` (None where a network is absent)."""
    return {
        "label_fidelity": None
        if out.seg_pred is None
        else label_fidelity(out.seg_pred, labels, views),
        "classifier_accuracy": None if out.cls_pred is None else view_accuracy(out.cls_pred, views),
    }


def score_images(
    nets: ReferenceNetworks,
    data: ImageSet,
    real: NetworkOutputs,
    real_views: np.ndarray,
    seed: int = 0,
    outputs: NetworkOutputs | None = None,
    distance: Any = "ssim",
) -> dict[str, Any]:
    """The quality entry of one image set against the real reference outputs: label fidelity,
    classifier accuracy, feature distances per space and view, diversity, seconds."""
    out = outputs if outputs is not None else run_networks(nets, data.images)
    t1 = time.perf_counter()
    entry: dict[str, Any] = {
        "images_total": data.total,
        "images_scored": len(data.images),
        **judgements(out, data.labels, data.views),
        "distances": feature_distances(out.features, data.views, real.features, real_views, seed),
    }
    t2 = time.perf_counter()
    entry["diversity"] = diversity(data.images, data.labels, data.groups, distance)
    t3 = time.perf_counter()
    entry["seconds"] = {"networks": out.seconds, "metrics": t2 - t1, "diversity": t3 - t2,
                        "total": out.seconds + (t3 - t1)}  # fmt: skip
    entry["summary"] = summary_metrics(entry)
    return entry


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
    feature distances between two halves of the real patients (seeded): the floor of each
    distance at this number of images. ``summary`` takes its distances from the halves."""
    entry: dict[str, Any] = {
        "store": store,
        "split": split,
        "images": len(real.images),
        "patients": len(np.unique(real.patients)),
        **judgements(outputs, real.labels, real.views),
        "seconds": outputs.seconds,
    }
    halves = split_patients(real.patients, seed)
    distances_of_halves: dict[str, Any] = {}
    if halves is not None:
        a, b = halves
        distances_of_halves = feature_distances(
            {s: f[a] for s, f in outputs.features.items()}, real.views[a],
            {s: f[b] for s, f in outputs.features.items()}, real.views[b], seed,
        )  # fmt: skip
        entry["halves"] = {
            "what": "one half of the real patients against the other (seeded): the floor of "
            "each distance at this number of images",
            "distances": distances_of_halves,
        }
    entry["summary"] = summary_metrics({**entry, "distances": distances_of_halves})
    return entry


# --------------------------------------------------------------------------- decoder ceiling
def reconstruct(vae: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 64
                ) -> torch.Tensor:  # fmt: skip
    """(N, 1, H, W) images in [0, 1] encoded and decoded by a Γ-VAE (posterior mean, the
    latent a perfect diffusion model would have to generate), within the maps' sector."""
    from edmcli.data.labels import sector_mask

    device = next(vae.parameters()).device
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch):
            x = images[start : start + batch].to(device)
            sector = sector_mask(labels[start : start + batch].long()).to(device)
            out.append(vae.decode(vae.encode(x, sector), sector).clamp(0, 1).cpu())
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
    from edmcli.errors import EchoSynthError
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


# --------------------------------------------------------------------------- evaluate's section
def quality_section(
    plans: list[dict[str, Any]],
    test_data: dict[str, Any],
    device: torch.device,
    seed: int = 0,
    max_images: int | None = FIDELITY_IMAGES,
) -> dict[str, Any]:
    """Score every synthetic ``--train`` spec of an ``evaluate`` call with the networks of its
    real-trained reference runs (the first real run per task), against the real test split.

    ``plans`` are evaluate's (``task``, ``spec``, ``settings``, ``run_dir``); ``test_data`` its
    test splits (``seg`` and/or ``cls`` :class:`~edmcli.evaluation.downstream.SplitData`).
    """
    started = time.perf_counter()
    references: dict[str, tuple[Any, Path]] = {}
    for plan in plans:
        if plan["spec"].kind == "real" and plan["task"] not in references:
            references[plan["task"]] = (plan["settings"], Path(plan["run_dir"]))
    if not references:
        raise ValueError("quality_section needs a real-trained reference run")
    nets, notes = load_reference_networks(references, device)
    real_split = test_data["seg"] if "seg" in test_data else test_data["cls"]
    real = real_image_set(real_split)  # images of unknown view count in "all" only
    size = int(real.images.shape[-1])
    distance, note = diversity_distance(size)
    if note:
        notes.append(note)
    real_out = run_networks(nets, real.images)
    real_entry = real_reference_entry(real, real_out, seed, real_split.store, real_split.split)
    stores = []
    ceilings: dict[str, dict[str, Any] | None] = {}  # Γ-VAE run → its ceiling
    seen: set[str] = set()
    for plan in plans:
        spec = plan["spec"]
        if spec.kind != "synthetic" or spec.slug in seen:
            continue
        seen.add(spec.slug)
        t0 = time.perf_counter()
        data = load_synthetic(spec.stores, max_images, seed)
        load_s = time.perf_counter() - t0
        entry = score_images(nets, data, real_out, real.views, seed, distance=distance)
        entry["seconds"]["load"] = load_s
        vae_run = spec.provenance[0].get("vae_run")  # latent models: their Γ-VAE run
        if vae_run is not None and vae_run not in ceilings:  # measured once per Γ-VAE run
            ceilings[vae_run] = _ceiling_of(nets, vae_run, real, device, notes)
            if ceilings[vae_run] is not None:
                entry["seconds"]["decoder_ceiling"] = ceilings[vae_run]["seconds"]
                entry["seconds"]["total"] += ceilings[vae_run]["seconds"]
        entry["decoder_ceiling"] = ceilings.get(vae_run) if vae_run is not None else None
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
        "diversity_distance": q.distance_name(distance),
        "notes": notes,
        "real": real_entry,
        "stores": stores,
        "seconds": time.perf_counter() - started,
        "correlation": None,
    }


# --------------------------------------------------------------------------- which metric
def downstream_targets(report: dict[str, Any]) -> dict[str, dict[str, float]]:
    """slug → {"dice_mean": value, "accuracy": value} of the report's runs (whole test set)."""
    out: dict[str, dict[str, float]] = {}
    for run in report["runs"]:
        for target, (task, _) in TARGETS.items():
            est = run["metrics"].get(target)
            if run["task"] == task and est:
                out.setdefault(run["slug"], {})[target] = float(est["value"])
    return out


def correlation_table(
    quality: dict[str, Any],
    report: dict[str, Any],
    iterations: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    min_stores: int = 3,
) -> dict[str, Any] | None:
    """Spearman's ρ of each quality metric with the downstream mean Dice and accuracy over
    the scored synthetic stores (bootstrap interval over the stores); None with fewer than
    ``min_stores`` stores. ``best`` lists, per target, the metrics with the largest ρ in their
    expected direction (ρ for a higher-is-better metric, −ρ for FD, KID and HD95; ties all
    listed; empty when no metric has a positive ρ in its expected direction)."""
    targets = downstream_targets(report)
    stores = [s for s in quality["stores"] if s["slug"] in targets]
    if len(stores) < min_stores:
        return None
    rows = []
    for key, (title, higher) in METRICS.items():
        row: dict[str, Any] = {"metric": key, "title": title, "higher_is_better": higher}
        for target in TARGETS:
            pairs = [(s["summary"][key], targets[s["slug"]][target]) for s in stores
                     if key in s["summary"] and target in targets[s["slug"]]]  # fmt: skip
            pairs = [(x, y) for x, y in pairs if np.isfinite(x) and np.isfinite(y)]
            if len(pairs) < min_stores:
                row[target] = None
                continue
            x, y = (np.array(v) for v in zip(*pairs, strict=True))
            est = q.spearman_with_interval(x, y, iterations, confidence, seed).as_dict()
            # undefined ρ (a constant metric or target) as null: report.json stays strict JSON
            row[target] = {k: None if isinstance(v, float) and not np.isfinite(v) else v
                           for k, v in est.items()}  # fmt: skip
        if any(row[t] is not None for t in TARGETS):
            rows.append(row)
    best: dict[str, list[str]] = {}
    for target in TARGETS:
        oriented = {
            r["metric"]: r[target]["rho"] * (1 if r["higher_is_better"] else -1)
            for r in rows
            if r[target] is not None and r[target]["rho"] is not None
        }
        top = max(oriented.values(), default=0.0)
        best[target] = [k for k, v in oriented.items() if top > 0 and v >= top - 1e-9]
    return {
        "what": f"Spearman's ρ over {len(stores)} synthetic stores with a {confidence * 100:g} % "
        f"bootstrap interval (stores resampled with replacement, {iterations} times)",
        "stores": [s["slug"] for s in stores],
        "targets": {t: title for t, (_, title) in TARGETS.items()},
        "rows": rows,
        "best": best,
    }
