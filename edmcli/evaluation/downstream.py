"""The downstream networks that measure how useful a dataset is for training (paper III.C).

* Segmentation: MONAI ``DynUNet`` (nnU-Net layout: 3×3 kernels, stride 2 until the feature map
  is 8 pixels or five halvings; residual blocks; optional deep supervision), classes 0–3 (the
  store's *outside* and *sector* labels merged into background, as CAMUS), MONAI ``DiceCELoss``.
* View classification A2C vs A4C: torchvision ``efficientnet_v2_s`` (no pretrained weights) with
  a one-channel stem, cross-entropy.

Both are :class:`~edmcli.training.engine.TrainingTask` s of the one training engine (resume, AMP,
DDP, NaN guard), train on the train split of one or several stores with the paired geometric and
intensity augmentation of :mod:`edmcli.data.augment`, validate on a validation split at every
``validate_every`` steps, and the engine keeps the best validation checkpoint
(``checkpoints/best.pt``) — the one that is tested: on short budgets the classifier sits at
chance for a while and can fall back to it, so the last step is not a safe choice.

Each run trains until its validation score stops improving, within a cap
(:mod:`edmcli.evaluation.run_length`).

Images whose size differs from the networks' input ``size`` are resampled (bilinear with
antialiasing; labels nearest); test predictions are resampled back and scored at the test
store's own resolution.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import ConcatDataset, Dataset

from edmcli.data.augment import AugmentConfig, PairedAugment
from edmcli.data.dataset import EchoDataset
from edmcli.data.labels import OUTSIDE, SECTOR, VIEWS, resize_label_map
from edmcli.data.store import DatasetStore
from edmcli.errors import EchoSynthError
from edmcli.evaluation.metrics.classification import (
    accuracy,
    balanced_accuracy,
    classification_metrics,
)
from edmcli.evaluation.metrics.segmentation import (
    SCORING_CLASSES,
    STRUCTURES,
    dice_per_structure,
    segmentation_metrics,
)
from edmcli.runs.checkpoint import latest_checkpoint, load_checkpoint
from edmcli.training.engine import TrainingTask

TASKS = ("seg", "cls")
VIEW_CLASSES = len(VIEWS)
IN_MEMORY_LIMIT = 2 << 30  # bytes of uint8 images + labels loaded at once for training


@dataclass
class DownstreamSettings:
    """What defines one downstream run (written to the run's config.yaml)."""

    task: str  # "seg" or "cls"
    train_stores: list[str]  # their train splits train
    val_store: str | None  # None: no validation (checkpoint "last")
    val_split: str | None
    size: int  # network input side; other sizes are resampled
    augment: bool = True
    base_filters: int = 32
    max_filters: int = 512
    deep_supervision: bool = True
    eval_batch: int = 32
    checkpoint: str = "best"  # "best" on the validation split, or "last"

    def validate(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if not self.train_stores:
            raise ValueError("at least one training store is needed")
        if self.size < 16 or self.size % 8:
            raise EchoSynthError(f"--size {self.size} must be a multiple of 8 and at least 16")
        if self.base_filters < 1 or self.max_filters < self.base_filters:
            raise EchoSynthError(
                f"DynUNet filters: base {self.base_filters} must be ≥ 1 and ≤ the cap "
                f"{self.max_filters}"
            )
        if self.eval_batch < 1:
            raise EchoSynthError(f"eval batch {self.eval_batch} must be at least 1")
        if self.checkpoint not in ("best", "last") or (
            self.checkpoint == "best" and self.val_store is None
        ):
            raise ValueError(f"checkpoint {self.checkpoint!r} needs best+val_store or last")

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if self.task == "cls":  # DynUNet settings do not apply
            for key in ("base_filters", "max_filters", "deep_supervision"):
                out.pop(key)
        return out


# --------------------------------------------------------------------------- models
def segmenter_layout(size: int) -> tuple[list[int], list[int]]:
    """(kernel sizes, strides) of DynUNet for ``size``² inputs: nnU-Net's rule for isotropic
    2-D data — 3×3 kernels, a first stride of 1, then stride 2 while the feature map stays at
    least 8 pixels (at most five halvings): 32 → 2 halvings, 64 → 3, 256 → 5."""
    if size < 16:
        raise ValueError(f"size must be at least 16, got {size}")
    halvings, side = 0, size
    while side % 2 == 0 and side // 2 >= 8 and halvings < 5:
        side //= 2
        halvings += 1
    if halvings < 1:
        raise ValueError(f"size {size} cannot be halved to a feature map of at least 8")
    strides = [1] + [2] * halvings
    return [3] * len(strides), strides


def build_segmenter(
    size: int,
    base_filters: int = 32,
    max_filters: int = 512,
    deep_supervision: bool = True,
    out_channels: int = SCORING_CLASSES,
) -> nn.Module:
    """MONAI DynUNet (one input channel, residual blocks) for ``size``² images. With deep
    supervision it returns (B, 1 + K, C, H, W) while training (K = min(2, levels − 2) extra
    heads, upsampled by MONAI) and (B, C, H, W) in eval mode."""
    from monai.networks.nets import DynUNet

    kernels, strides = segmenter_layout(size)
    filters = [min(base_filters * 2**i, max_filters) for i in range(len(strides))]
    heads = min(2, len(strides) - 2)
    return DynUNet(
        spatial_dims=2,
        in_channels=1,
        out_channels=out_channels,
        kernel_size=kernels,
        strides=strides,
        upsample_kernel_size=strides[1:],
        filters=filters,
        res_block=True,
        deep_supervision=deep_supervision and heads >= 1,
        deep_supr_num=max(1, heads),
    )


def build_view_classifier(num_classes: int = VIEW_CLASSES) -> nn.Module:
    """torchvision EfficientNetV2-S, random weights, a one-channel stem (initialised as
    torchvision initialises its convolutions)."""
    from torchvision.models import efficientnet_v2_s

    model = efficientnet_v2_s(weights=None, num_classes=num_classes)
    old = model.features[0][0]
    stem = nn.Conv2d(1, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False)
    nn.init.kaiming_normal_(stem.weight, mode="fan_out")
    model.features[0][0] = stem
    return model


def build_model(settings: DownstreamSettings) -> nn.Module:
    if settings.task == "seg":
        return build_segmenter(
            settings.size, settings.base_filters, settings.max_filters, settings.deep_supervision
        )
    return build_view_classifier()


# --------------------------------------------------------------------------- data
def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 1, H, W) float → (N, 1, size, size), bilinear with antialiasing (identity if equal)."""
    if tuple(images.shape[-2:]) == (size, size):
        return images
    return F.interpolate(images, (size, size), mode="bilinear", antialias=True).clamp(0, 1)


def resize_labels(labels: torch.Tensor, size: int) -> torch.Tensor:
    """(N, H, W) integer label maps → (N, size, size): the majority class of each target pixel
    (the one resize rule, :func:`edmcli.data.labels.resize_label_map`)."""
    return resize_label_map(labels, size).long()


class ResizeItem:
    """Dataset transform: resample an item's image and labels to ``size``² (picklable)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, item: dict[str, Any]) -> dict[str, Any]:
        if tuple(item["image"].shape[-2:]) == (self.size, self.size):
            return item
        image = resize_images(item["image"][None], self.size)[0]
        labels = resize_labels(item["labels"][None], self.size)[0]
        return {**item, "image": image * (labels != OUTSIDE), "labels": labels}


@dataclass
class SplitData:
    """One split of a store in memory, at the store's own resolution."""

    store: str
    split: str
    indices: np.ndarray  # rows in the store
    images: torch.Tensor  # (N, 1, H, W) float in [0, 1]
    labels: torch.Tensor  # (N, H, W) int64, store label ids
    views: np.ndarray  # (N,) 0 A2C, 1 A4C, -1 unknown
    patients: np.ndarray  # (N,) str
    spacing: np.ndarray  # (N, 2) mm, NaN when unknown

    def __len__(self) -> int:
        return len(self.indices)

    def select(self, keep: np.ndarray) -> SplitData:
        rows = torch.from_numpy(np.flatnonzero(keep))
        return SplitData(
            self.store, self.split, self.indices[keep], self.images[rows], self.labels[rows],
            self.views[keep], self.patients[keep], self.spacing[keep],
        )  # fmt: skip


def load_split(store: str | Path, split: str) -> SplitData:
    """Read every sample of ``split`` of ``store`` into memory (an empty split is an error)."""
    reader = DatasetStore(store)
    rows = reader.indices(split)
    if len(rows) == 0:
        raise EchoSynthError(f"{store} has no samples in its {split!r} split")
    images = reader.images.get_orthogonal_selection((rows,))
    labels = reader.labels.get_orthogonal_selection((rows,))
    lookup = {name: k for k, name in enumerate(VIEWS)}
    views = np.array([lookup.get(str(v), -1) for v in reader.column("view")[rows]])
    if "spacing" in reader.fields:
        spacing = np.asarray(reader.column("spacing")[rows], dtype=np.float64).reshape(-1, 2)
    else:
        spacing = np.full((len(rows), 2), np.nan)
    return SplitData(
        store=str(store),
        split=split,
        indices=rows,
        images=torch.from_numpy(np.asarray(images, dtype=np.float32) / 255.0),
        labels=torch.from_numpy(np.asarray(labels, dtype=np.int64)),
        views=views,
        patients=reader.column("patient")[rows],
        spacing=spacing,
    )


def _merge_background(labels: torch.Tensor) -> torch.Tensor:
    """Store label ids → the segmenter's classes 0–3 (*sector* joins *outside*)."""
    return torch.where(labels == SECTOR, torch.zeros_like(labels), labels)


def train_datasets(settings: DownstreamSettings) -> Dataset:
    """The train splits of the settings' stores (views A2C/A4C only for classification),
    resampled to the input size, in memory when small enough."""
    parts: list[Dataset] = []
    views = VIEWS if settings.task == "cls" else None
    for store in settings.train_stores:
        reader = DatasetStore(store)
        rows = reader.indices("train", views)
        h, w = reader.image_size
        in_memory = len(rows) * h * w * 2 <= IN_MEMORY_LIMIT
        parts.append(
            EchoDataset(store, "train", views, ResizeItem(settings.size), in_memory=in_memory)
        )
    return parts[0] if len(parts) == 1 else ConcatDataset(parts)


# --------------------------------------------------------------------------- inference
@torch.no_grad()
def segment(model: nn.Module, images: torch.Tensor, size: int, batch: int = 32) -> torch.Tensor:
    """Label maps (N, H, W) int64 in 0–3 at the images' own resolution: inputs resampled to
    ``size``², logits resampled back (bilinear) before the arg-max."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(images), batch):
        x = images[start : start + batch].to(device)
        logits = model(resize_images(x, size))
        if logits.shape[-2:] != x.shape[-2:]:
            logits = F.interpolate(logits, x.shape[-2:], mode="bilinear", align_corners=False)
        out.append(logits.argmax(1).cpu())
    return torch.cat(out)


@torch.no_grad()
def classifier_logits(
    model: nn.Module, images: torch.Tensor, size: int, batch: int = 32
) -> torch.Tensor:
    """(N, 2) float32 logits of (N, 1, H, W) images resampled to ``size``²."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(images), batch):
        x = resize_images(images[start : start + batch].to(device), size)
        out.append(model(x).float().cpu())
    return torch.cat(out)


def classify(
    model: nn.Module, images: torch.Tensor, size: int, batch: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """(predicted view (N,), probability of A4C (N,)) for (N, 1, H, W) images."""
    p = classifier_logits(model, images, size, batch).softmax(1).numpy()
    return p.argmax(1), p[:, 1]


# --------------------------------------------------------------------------- tasks
class _DownstreamTask(TrainingTask):
    # --precision auto trains in bf16 on CPUs with native bf16 (tests/evaluation/
    # test_downstream_precision.py; the demo's verdict with both paths: issue 23)
    cpu_auto_bf16 = True

    def __init__(self, settings: DownstreamSettings) -> None:
        settings.validate()
        self.settings = settings
        self._augment: PairedAugment | None = None
        self._val: SplitData | None = None

    def build_model(self) -> nn.Module:
        return build_model(self.settings)

    def train_dataset(self) -> Dataset:
        s = self.settings
        if s.augment:
            self._augment = PairedAugment(AugmentConfig(), (s.size, s.size))
        return train_datasets(s)

    def augmentation(self):
        return self._augment

    def validate(self, ema_model: nn.Module, step: int) -> dict[str, float] | None:
        """The validation score that picks ``best.pt``; None when the last checkpoint is tested."""
        return None if self.settings.checkpoint == "last" else self._score(ema_model)

    @abstractmethod
    def _score(self, ema_model: nn.Module) -> dict[str, float]:
        """The task's validation metrics, with ``"score"`` (higher is better)."""

    def val_data(self) -> SplitData:
        if self._val is None:
            data = load_split(self.settings.val_store, self.settings.val_split)
            if self.settings.task == "cls":
                data = data.select(data.views >= 0)
            self._val = data
        return self._val


class SegmentationTask(_DownstreamTask):
    """DynUNet with Dice + cross-entropy (deep-supervision heads weighted 1, ½, ¼, normalised);
    validation score: mean Dice of LV endocardium, myocardium and LA."""

    def __init__(self, settings: DownstreamSettings) -> None:
        super().__init__(settings)
        from monai.losses import DiceCELoss

        self.loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)

    def loss(self, model, batch, step, epoch):
        target = _merge_background(batch["labels"])[:, None]
        out = model(batch["image"])
        if out.ndim == 5:  # (B, 1 + K, C, H, W): main output and deep-supervision heads
            weights = 0.5 ** torch.arange(out.shape[1], dtype=torch.float32)
            weights = weights / weights.sum()
            loss = sum(w * self.loss_fn(out[:, k], target) for k, w in enumerate(weights))
        else:
            loss = self.loss_fn(out, target)
        return loss, {"dice_ce": loss.detach()}

    def _score(self, ema_model: nn.Module) -> dict[str, float]:
        val = self.val_data()
        pred = segment(ema_model, val.images, self.settings.size, self.settings.eval_batch)
        dice = dice_per_structure(pred, val.labels).mean(0)
        out = {f"dice_{name}": float(d) for name, d in zip(STRUCTURES, dice, strict=True)}
        return {"score": float(dice.mean()), **out}


# Ties in validation accuracy (small validation sets) go to the checkpoint with the lower
# cross-entropy; the weight keeps the tie-break below one image of 10⁴.
_CE_TIEBREAK = 1e-4


class ViewClassificationTask(_DownstreamTask):
    """EfficientNetV2-S, cross-entropy on A2C (0) / A4C (1); validation score: accuracy (ties
    broken by a lower cross-entropy)."""

    # bf16 on the CI-class CPU (batch 16, 64²): 0.36–0.39 s per step channels-last against
    # 0.38–0.47 s in the default layout and 0.44–0.58 s in fp32
    channels_last = True

    def loss(self, model, batch, step, epoch):
        logits = model(batch["image"])
        loss = F.cross_entropy(logits.float(), batch["view"])
        acc = (logits.argmax(1) == batch["view"]).float().mean()
        return loss, {"ce": loss.detach(), "acc": acc.detach()}

    def _score(self, ema_model: nn.Module) -> dict[str, float]:
        val = self.val_data()
        s = self.settings
        logits = classifier_logits(ema_model, val.images, s.size, s.eval_batch)
        target = torch.from_numpy(val.views)
        ce = float(F.cross_entropy(logits, target))
        pred = logits.argmax(1).numpy()
        acc = accuracy(pred, val.views)
        return {
            "score": acc - _CE_TIEBREAK * min(ce, 1.0),
            "accuracy": acc,
            "balanced_accuracy": balanced_accuracy(pred, val.views),
            "ce": ce,
        }


def make_task(settings: DownstreamSettings) -> _DownstreamTask:
    return (
        SegmentationTask(settings) if settings.task == "seg" else ViewClassificationTask(settings)
    )


def load_best(
    settings: DownstreamSettings, run_dir: Path, device: torch.device
) -> tuple[nn.Module, dict[str, Any]]:
    """The run's best validation checkpoint (EMA weights) as an eval-mode model, and the
    checkpoint's step and validation metrics."""
    if settings.checkpoint == "last":
        last = latest_checkpoint(Path(run_dir))
        if last is None:
            raise EchoSynthError(f"{run_dir} has no checkpoint; rerun to finish it")
        state = load_checkpoint(last, map_location=device)
        model = build_model(settings).to(device)
        model.load_state_dict(state["ema"])
        return model.eval(), {"step": int(state["step"]), "val": {}}
    path = Path(run_dir) / "checkpoints" / "best.pt"
    if not path.is_file():
        raise EchoSynthError(
            f"{run_dir} has no best validation checkpoint ({path.name}); rerun to finish it"
        )
    state = load_checkpoint(path, map_location=device)
    model = build_model(settings).to(device)
    model.load_state_dict(state["model"])
    return model.eval(), {"step": int(state["step"]), "val": state.get("val", {})}


def views_present(store: DatasetStore, split: str) -> dict[str, int]:
    """Images per view (A2C, A4C) in a split of a store."""
    view = store.column("view")[store.indices(split)]
    return {name: int((view == name).sum()) for name in VIEWS}


def count_train(stores: Sequence[str], task: str) -> int:
    views = VIEWS if task == "cls" else None
    return sum(len(DatasetStore(s).indices("train", views)) for s in stores)


def usable_spacing(spacing: np.ndarray) -> np.ndarray | None:
    """The (N, 2) pixel spacing in mm when every image has one, else None (no mm metrics)."""
    spacing = np.asarray(spacing, dtype=np.float64)
    if spacing.size and np.all(np.isfinite(spacing) & (spacing > 0)):
        return spacing
    return None


def test_run(
    settings: DownstreamSettings, run_dir: Path, test: SplitData, device: torch.device
) -> dict[str, Any]:
    """Score a run's best checkpoint on a test split; predictions go to
    ``run_dir/test_predictions.npz``. Returns the checkpoint's step and validation metrics,
    per-image metrics and (classification) the confusion matrix."""
    model, best = load_best(settings, run_dir, device)
    out: dict[str, Any] = {"best_step": best["step"], "best_validation": best["val"]}
    if settings.task == "seg":
        pred = segment(model, test.images, settings.size, settings.eval_batch)
        spacing = usable_spacing(test.spacing)
        out["per_image"] = segmentation_metrics(pred, test.labels, spacing)
        out["spacing_mm"] = spacing is not None
        predictions = {"labels": pred.numpy().astype(np.uint8)}
    else:
        views, prob = classify(model, test.images, settings.size, settings.eval_batch)
        metrics = classification_metrics(views, test.views, VIEW_CLASSES)
        out["per_image"] = {"correct": metrics["correct"]}
        out["confusion_matrix"] = metrics["confusion_matrix"].tolist()
        out["predicted_view"], out["prob_a4c"] = views, prob
        predictions = {"views": views.astype(np.int8), "prob_a4c": prob.astype(np.float32)}
    np.savez_compressed(Path(run_dir) / "test_predictions.npz", indices=test.indices, **predictions)
    out["predictions"] = predictions
    return out
