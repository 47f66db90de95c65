"""The real-trained networks as judges of synthetic images, without training anything
(``evaluate --fidelity``): the best checkpoints of the real-trained reference runs
(:func:`edmcli.evaluation.downstream.load_best`) and, when its weights are cached, Inception-v3
(:mod:`edmcli.evaluation.inception`), each run in one batched pass over a set of images
(:func:`run_networks`). What they see, as features captured with a forward hook: the
segmenter's bottleneck (DynUNet ``bottleneck``, global average pooled), the classifier's
penultimate layer (EfficientNetV2-S ``avgpool``, 1280-D) and the Inception pool (2048-D).

Their verdicts, overall and per view (:func:`judgements`):

* **Label fidelity** (the check of semantic image synthesis, as SPADE and SDM report it): the
  real-trained segmenter segments every image; Dice per structure and HD95 per structure
  (pixels of the store; an empty mask scores the image diagonal, as in
  :mod:`edmcli.evaluation.metrics.segmentation`) against the label map that *conditioned* the
  image (the store's ``labels``).
* **View accuracy**: the real-trained classifier's accuracy on the images against their view.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edmcli.data.labels import VIEWS
from edmcli.evaluation.downstream import classify, load_best, segment
from edmcli.evaluation.inception import build_inception, inception_features
from edmcli.evaluation.metrics.segmentation import STRUCTURES, structure_dice, structure_hd95
from edmcli.models.perceptual import MissingWeightsError

VIEW_KEYS = ("all", *VIEWS)


def view_masks(views: np.ndarray) -> dict[str, np.ndarray]:
    """View key (:data:`VIEW_KEYS`) → boolean mask of the images of that view (all of them
    for ``all``)."""
    return {"all": np.ones(len(views), bool), **{v: views == k for k, v in enumerate(VIEWS)}}


# --------------------------------------------------------------------------- networks
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


# --------------------------------------------------------------------------- verdicts
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
    for key, keep in view_masks(np.asarray(views)).items():
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
    for key, keep in view_masks(views).items():
        keep = keep & known
        if keep.any():
            out[key] = {"n": int(keep.sum()), "accuracy": float((pred[keep] == views[keep]).mean())}
    return out


def judgements(out: NetworkOutputs, labels: torch.Tensor, views: np.ndarray) -> dict[str, Any]:
    """``label_fidelity`` and ``classifier_accuracy`` of the reference networks' outputs on
    images conditioned on (or labelled with) ``labels`` (None where a network is absent)."""
    return {
        "label_fidelity": None
        if out.seg_pred is None
        else label_fidelity(out.seg_pred, labels, views),
        "classifier_accuracy": None if out.cls_pred is None else view_accuracy(out.cls_pred, views),
    }
