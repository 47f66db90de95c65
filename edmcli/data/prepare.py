"""The ``prepare`` stage: a source (phantom, CAMUS, folder) → a complete dataset store.

Planned first (:func:`edmcli.data.prepare_plan.plan_prepare`: every refusal, the source's items,
the patient split), then written (:func:`run_prepare`); :func:`prepare` is the two in a row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from edmcli.data.labels import OUTSIDE, SPLITS
from edmcli.data.phantom import generate_patient
from edmcli.data.prepare_plan import (
    PreparePlan,
    plan_phantom,
    plan_prepare,
    plan_source,
)
from edmcli.data.sources import Source, load_item
from edmcli.data.store_format import SampleMeta, meta_columns, samples_per_shard
from edmcli.data.store_replace import atomic_store_path
from edmcli.data.store_writer import create_store, mark_complete, write_block
from edmcli.errors import DataError
from edmcli.faults import maybe_kill

__all__ = [
    "PrepareResult",
    "prepare",
    "prepare_from_source",
    "prepare_phantom",
    "resize_pair",
    "run_prepare",
    "to_uint8",
]

Progress = Callable[[int], None]


@dataclass(frozen=True)
class PrepareResult:
    path: Path
    samples: int
    patients: int
    split_counts: dict[str, int]
    skipped: list[str]
    layout: str = "phantom"  # the source's layout (phantom, CAMUS release, folder)


def resize_pair(
    image: np.ndarray, labels: np.ndarray, size: int, keep_aspect: bool
) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """Resize to ``size``² (image antialiased, labels nearest); ``keep_aspect`` pads to a square
    first (label 0: outside the sector). Returns the scale factors (row, col) of the pixel size."""
    h, w = image.shape
    if keep_aspect and h != w:
        side = max(h, w)
        top, left = (side - h) // 2, (side - w) // 2
        padded_image = np.zeros((side, side), dtype=image.dtype)
        padded_labels = np.full((side, side), OUTSIDE, dtype=labels.dtype)
        padded_image[top : top + h, left : left + w] = image
        padded_labels[top : top + h, left : left + w] = labels
        image, labels, h, w = padded_image, padded_labels, side, side
    if (h, w) != (size, size):
        resample = Image.Resampling.BILINEAR if size < max(h, w) else Image.Resampling.BICUBIC
        image = np.asarray(
            Image.fromarray(image.astype(np.float32), mode="F").resize((size, size), resample)
        )
        labels = np.asarray(Image.fromarray(labels).resize((size, size), Image.Resampling.NEAREST))
    return image, labels, (h / size, w / size)


def to_uint8(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Round to uint8 (values are 0-255 in CAMUS), zero outside the sector."""
    out = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    out[labels == OUTSIDE] = 0
    return out


def prepare_phantom(
    out: Path,
    n_patients: int,
    size: int,
    seed: int,
    split_ratio: tuple[float, float, float],
    overwrite: bool = False,
    progress: Progress | None = None,
) -> PrepareResult:
    """Write a phantom store: ``n_patients`` × (A2C, A4C) × (ED, ES)."""
    plan = plan_phantom(out, n_patients, size, seed, split_ratio, overwrite)
    return write_plan(plan, progress)


def prepare_from_source(
    source: Source,
    out: Path,
    size: int,
    seed: int,
    split_ratio: tuple[float, float, float],
    keep_aspect: bool = False,
    source_path: Path | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> PrepareResult:
    """Write a store from real pairs (CAMUS or folder), resized to ``size``²."""
    plan = plan_source(source, out, size, seed, split_ratio, keep_aspect, source_path, overwrite)
    return write_plan(plan, progress)


def _phantom_samples(plan: PreparePlan):
    for p, patient in enumerate(plan.patients):
        for record in generate_patient(plan.seed, p, plan.size):
            meta = SampleMeta(
                patient=patient,
                view=record["view"],
                phase=record["phase"],
                split=plan.split[patient],
                quality="good",
                spacing=record["spacing"],
            )
            yield record["image"], record["labels"], meta


def _source_samples(plan: PreparePlan):
    assert plan.source is not None
    grey_levels = plan.source.grey_levels  # one scale for the source's images
    for item in plan.source.items:
        image, labels, spacing = load_item(item, grey_levels)
        image, labels, scale = resize_pair(image, labels, plan.size, plan.keep_aspect)
        meta = SampleMeta(
            patient=item.patient,
            view=item.view,
            phase=item.phase,
            split=plan.split[item.patient],
            quality=item.quality,
            ef=item.ef,
            spacing=(spacing[0] * scale[0], spacing[1] * scale[1]),
        )
        yield to_uint8(image, labels), labels, meta


def write_plan(plan: PreparePlan, progress: Progress | None = None) -> PrepareResult:
    """Write the store of ``plan`` (``progress(1)`` after each sample)."""
    samples = _phantom_samples(plan) if plan.source is None else _source_samples(plan)
    return _write(plan.out, plan.samples, plan.size, samples, plan.provenance, plan.overwrite,
                  progress, plan.skipped, plan.layout)  # fmt: skip


def run_prepare(plan: PreparePlan) -> PrepareResult:
    """Write the store of ``plan`` with a progress bar (the work of ``echo-synth prepare``)."""
    from edmcli.console import console, progress

    with progress(plan.samples, f"prepare ({plan.layout})") as advance:
        result = write_plan(plan, advance)
    for note in plan.source.grey_levels.notes if plan.source is not None else ():
        console.print(f"note: {note}", highlight=False)  # a rescaling of the images' grey levels
    return result


def _write(
    out: Path,
    n: int,
    size: int,
    samples,
    provenance: dict[str, Any],
    overwrite: bool,
    progress: Progress | None,
    skipped: list[str],
    layout: str = "phantom",
) -> PrepareResult:
    block = samples_per_shard(size, size)
    counts = dict.fromkeys(SPLITS, 0)
    patients: set[str] = set()
    with atomic_store_path(out, overwrite) as tmp:
        group = create_store(tmp, n, size, size, {"provenance": provenance}, shard=block)
        written = 0
        buffer: list = []
        for image, labels, meta in samples:
            buffer.append((image, labels, meta))
            counts[meta.split] += 1
            patients.add(meta.patient)
            if len(buffer) == block:
                _flush(group, written, buffer)
                written += len(buffer)
                buffer = []
            if progress:
                progress(1)
            maybe_kill("prepare-sample", sum(counts.values()))
        if buffer:
            _flush(group, written, buffer)
            written += len(buffer)
        if written != n:
            raise DataError(f"expected {n} samples but the source produced {written}")
        mark_complete(group)
    return PrepareResult(Path(out), n, len(patients), counts, skipped, layout)


def _flush(group, start: int, buffer: list) -> None:
    images = np.stack([b[0] for b in buffer])
    labels = np.stack([b[1] for b in buffer])
    write_block(group, start, images, labels, meta_columns([b[2] for b in buffer]))


def prepare(
    out: Path,
    *,
    source: str = "phantom",
    size: int = 256,
    n_patients: int = 50,
    seed: int = 0,
    split_ratio: str | tuple[float, float, float] = "8:1:1",
    camus_dir: Path | None = None,
    folder: Path | None = None,
    image_glob: str = "images/*.png",
    label_template: str = "labels/{stem}.png",
    meta_pattern: str | None = None,
    keep_aspect: bool = False,
    overwrite: bool = False,
) -> PrepareResult:
    """Build the dataset store ``out`` from the phantom generator, a CAMUS copy
    (``camus_dir``) or a folder of image/label pairs (``folder``) — the body of ``echo-synth
    prepare``, with a progress bar."""
    return run_prepare(
        plan_prepare(
            out, source=source, size=size, n_patients=n_patients, seed=seed,
            split_ratio=split_ratio, camus_dir=camus_dir, folder=folder, image_glob=image_glob,
            label_template=label_template, meta_pattern=meta_pattern, keep_aspect=keep_aspect,
            overwrite=overwrite,
        )
    )  # fmt: skip
