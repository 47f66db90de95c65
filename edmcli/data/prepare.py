"""The ``prepare`` stage: a source (phantom, CAMUS, folder) → a complete dataset store."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from edmcli.data.labels import OUTSIDE, SPLITS
from edmcli.data.phantom import generate_patient
from edmcli.data.sources import Source, load_item
from edmcli.data.store_format import SampleMeta, meta_columns, samples_per_shard
from edmcli.data.store_replace import atomic_store_path, check_replaceable
from edmcli.data.store_writer import create_store, mark_complete, write_block
from edmcli.errors import DataError

Progress = Callable[[int], None]
MAX_SIZE = 2048  # image side: CAMUS is 256² in the paper; 2048² is already 4 MiB per image


@dataclass(frozen=True)
class PrepareResult:
    path: Path
    samples: int
    patients: int
    split_counts: dict[str, int]
    skipped: list[str]
    layout: str = "phantom"  # the source's layout (phantom, CAMUS release, folder)


def parse_split_ratio(text: str) -> tuple[float, float, float]:
    """``"8:1:1"`` (train:val:test, any positive scale) → fractions summing to one."""
    parts = text.replace(",", ":").split(":")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != 3 or any(v < 0 for v in values) or sum(values) <= 0 or values[0] <= 0:
        raise DataError(
            f"--split-ratio {text!r} must be three non-negative numbers train:val:test with a "
            "positive train part (e.g. 8:1:1)"
        )
    total = sum(values)
    return values[0] / total, values[1] / total, values[2] / total


def assign_splits(
    patients: Sequence[str], ratio: tuple[float, float, float], seed: int
) -> dict[str, str]:
    """A seeded patient-level split: counts rounded from ``ratio``; val and test get at least one
    patient each when their ratio is positive and there are enough patients."""
    unique = sorted(set(patients))
    n = len(unique)
    order = np.random.default_rng(np.random.SeedSequence([seed, 0x5917])).permutation(n)
    n_val, n_test = (int(round(r * n)) for r in ratio[1:])
    if n >= 3:
        n_val = max(n_val, 1 if ratio[1] > 0 else 0)
        n_test = max(n_test, 1 if ratio[2] > 0 else 0)
    n_train = n - n_val - n_test
    if n_train < 1:
        raise DataError(f"split ratio {ratio} leaves no training patient out of {n}")
    names = ["train"] * n_train + ["val"] * n_val + ["test"] * n_test
    return {unique[i]: names[k] for k, i in enumerate(order)}


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
    if n_patients < 1:
        raise DataError("--n-patients must be at least 1")
    if size < 16:
        raise DataError(f"--size must be at least 16, got {size}")
    if size > MAX_SIZE:
        raise DataError(f"--size {size} is larger than {MAX_SIZE} (the images are square)")
    # The seed is part of the id: the same id is the same synthetic patient in any store.
    patients = [f"phantom-s{seed}-{p:05d}" for p in range(n_patients)]
    split = assign_splits(patients, split_ratio, seed)

    def samples():
        for p, patient in enumerate(patients):
            for record in generate_patient(seed, p, size):
                meta = SampleMeta(
                    patient=patient,
                    view=record["view"],
                    phase=record["phase"],
                    split=split[patient],
                    quality="good",
                    spacing=record["spacing"],
                )
                yield record["image"], record["labels"], meta

    provenance = {
        "source": "phantom",
        "seed": seed,
        "n_patients": n_patients,
        "split": "seeded",
        "split_ratio": list(split_ratio),
    }
    return _write(out, 4 * n_patients, size, samples(), provenance, overwrite, progress, [])


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
    if not source.items:
        raise DataError(f"{source_path} contains no image/label pairs")
    if size < 16:
        raise DataError(f"--size must be at least 16, got {size}")
    if size > MAX_SIZE:
        raise DataError(f"--size {size} is larger than {MAX_SIZE} (the images are square)")
    patients = sorted({item.patient for item in source.items})
    if source.official_split is not None:
        missing = [p for p in patients if p not in source.official_split]
        if missing:
            raise DataError(
                f"patient {missing[0]} is in none of the official split files of {source_path}"
            )
        split, split_kind = source.official_split, "official"
    else:
        split, split_kind = assign_splits(patients, split_ratio, seed), "seeded"

    def samples():
        for item in source.items:
            image, labels, spacing = load_item(item)
            image, labels, scale = resize_pair(image, labels, size, keep_aspect)
            meta = SampleMeta(
                patient=item.patient,
                view=item.view,
                phase=item.phase,
                split=split[item.patient],
                quality=item.quality,
                ef=item.ef,
                spacing=(spacing[0] * scale[0], spacing[1] * scale[1]),
            )
            yield to_uint8(image, labels), labels, meta

    provenance = {
        "source": source.layout,
        "path": str(Path(source_path).resolve()) if source_path else None,
        "split": split_kind,
        "split_ratio": list(split_ratio) if split_kind == "seeded" else None,
        "seed": seed,
        "keep_aspect": keep_aspect,
        "skipped": source.skipped,
    }
    n = len(source.items)
    return _write(out, n, size, samples(), provenance, overwrite, progress, source.skipped)


def _write(
    out: Path,
    n: int,
    size: int,
    samples,
    provenance: dict[str, Any],
    overwrite: bool,
    progress: Progress | None,
    skipped: list[str],
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
        if buffer:
            _flush(group, written, buffer)
            written += len(buffer)
        if written != n:
            raise DataError(f"expected {n} samples but the source produced {written}")
        mark_complete(group)
    return PrepareResult(Path(out), n, len(patients), counts, skipped)


def _flush(group, start: int, buffer: list) -> None:
    images = np.stack([b[0] for b in buffer])
    labels = np.stack([b[1] for b in buffer])
    write_block(group, start, images, labels, meta_columns([b[2] for b in buffer]))


SOURCES = ("phantom", "camus", "folder")


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
    from edmcli.console import progress
    from edmcli.data.sources import DEFAULT_META_PATTERN, camus_source, folder_source

    if source not in SOURCES:
        raise DataError(f"source {source!r} is unknown; choose from {', '.join(SOURCES)}")
    ratio = parse_split_ratio(split_ratio) if isinstance(split_ratio, str) else split_ratio
    if Path(out).exists() or Path(out).is_symlink():
        if not overwrite:
            raise DataError(f"{out} already exists; pass --overwrite to replace it")
        check_replaceable(out)  # before reading any source: only a store or an empty folder
    if source == "phantom":
        with progress(4 * n_patients, "prepare (phantom)") as advance:
            return prepare_phantom(
                out, n_patients, size, seed, ratio, overwrite=overwrite, progress=advance
            )
    if source == "camus":
        if camus_dir is None:
            raise DataError("the camus source needs its folder (--camus-dir DIR)")
        root, src = Path(camus_dir), camus_source(camus_dir)
    else:
        if folder is None:
            raise DataError("the folder source needs its root (--folder DIR)")
        root = Path(folder)
        src = folder_source(
            folder, image_glob, label_template, meta_pattern or DEFAULT_META_PATTERN
        )
    with progress(len(src.items), f"prepare ({src.layout})") as advance:
        result = prepare_from_source(
            src, out, size, seed, ratio, keep_aspect, root, overwrite, advance
        )
    return dataclasses.replace(result, layout=src.layout)
