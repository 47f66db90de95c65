"""The plan of the ``prepare`` stage: every refusal and every resolved choice (source, patients,
their split, sample count, provenance) before a single file is written.

:func:`plan_prepare` takes the arguments of :func:`edmcli.data.prepare.prepare` and returns a
:class:`PreparePlan`; :func:`edmcli.data.prepare.run_prepare` writes it. Planning reads (a source
folder's file names and metadata files, whether ``out`` may be replaced), never writes. The
phantom path imports no torch; a CAMUS or folder source does (its reader module shares the label
rules of :mod:`edmcli.data.labels`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edmcli.data.store_replace import check_name_length, check_replaceable
from edmcli.errors import DataError

if TYPE_CHECKING:
    from edmcli.data.sources import Source

MAX_SIZE = 2048  # image side: CAMUS is 256² in the paper; 2048² is already 4 MiB per image
MAX_PHANTOM_PATIENTS = 100_000  # 400 000 images; CAMUS has 500 patients
SOURCES = ("phantom", "camus", "folder")
_SPLITS = ("train", "val", "test")  # edmcli.data.labels.SPLITS (that module imports torch)


@dataclass(frozen=True)
class PreparePlan:
    """What ``prepare`` will write: ``samples`` images of ``patients`` at ``size``² into ``out``.

    ``source`` holds the discovered items of a CAMUS or folder source (None for the phantom,
    whose samples are generated from ``seed``)."""

    out: Path
    layout: str  # phantom, camus-nifti, camus-mhd or folder
    size: int
    seed: int
    samples: int
    patients: tuple[str, ...]
    split: dict[str, str]  # patient → train / val / test
    split_kind: str  # seeded or official
    split_counts: dict[str, int]  # images per split
    provenance: dict[str, Any]
    overwrite: bool = False
    keep_aspect: bool = False
    replaces: bool = False  # ``out`` exists and will be replaced
    skipped: list[str] = field(default_factory=list)
    source: Source | None = None

    def describe(self) -> list[str]:
        """Short lines for people: what will be written, where, from what."""
        origin = self.provenance.get("path") or f"seed {self.seed}"
        counts = ", ".join(f"{k} {v}" for k, v in self.split_counts.items())
        ratio = self.provenance.get("split_ratio")
        how = (
            "official split"
            if self.split_kind == "official"
            else f"seeded split {':'.join(f'{r:.3g}' for r in ratio or ())} (seed {self.seed})"
        )
        lines = [
            f"prepare {self.layout} ({origin}) → {self.out}"
            + (" (replaces the existing store)" if self.replaces else ""),
            f"{self.samples} images of {len(self.patients)} patients at {self.size}×{self.size}"
            + (", padded to square first" if self.keep_aspect else ""),
            f"patients split by {how}: images {counts}",
        ]
        if self.skipped:
            lines.append(f"{len(self.skipped)} source files skipped")
        return lines


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


SIZE_MULTIPLE = 8  # the downstream networks' rule too (evaluate --size); the presets use 64–256


def _check_size(size: int) -> None:
    if size < 16:
        raise DataError(f"--size must be at least 16, got {size}")
    if size > MAX_SIZE:
        raise DataError(f"--size {size} is larger than {MAX_SIZE} (the images are square)")
    if size % SIZE_MULTIPLE:
        raise DataError(
            f"--size {size} is not a multiple of {SIZE_MULTIPLE}: the networks halve the image "
            f"several times (the Γ-VAE to a quarter, the U-Nets further), so no model could "
            f"train on it; use e.g. {max(16, size // SIZE_MULTIPLE * SIZE_MULTIPLE)} or "
            f"{(size // SIZE_MULTIPLE + 1) * SIZE_MULTIPLE} (the presets use 64, 128, 256)"
        )


def _counts(splits: Sequence[str]) -> dict[str, int]:
    counts = dict.fromkeys(_SPLITS, 0)
    for name in splits:
        counts[name] += 1
    return counts


def plan_phantom(
    out: Path,
    n_patients: int,
    size: int,
    seed: int,
    split_ratio: tuple[float, float, float],
    overwrite: bool = False,
) -> PreparePlan:
    """A phantom store: ``n_patients`` × (A2C, A4C) × (ED, ES)."""
    if n_patients < 1:
        raise DataError("--n-patients must be at least 1")
    if n_patients > MAX_PHANTOM_PATIENTS:
        raise DataError(
            f"--n-patients {n_patients} is more than {MAX_PHANTOM_PATIENTS} phantom patients"
        )
    _check_size(size)
    # The seed is part of the id: the same id is the same synthetic patient in any store.
    patients = tuple(f"phantom-s{seed}-{p:05d}" for p in range(n_patients))
    split = assign_splits(patients, split_ratio, seed)
    provenance = {
        "source": "phantom",
        "seed": seed,
        "n_patients": n_patients,
        "split": "seeded",
        "split_ratio": list(split_ratio),
    }
    return PreparePlan(
        out=Path(out), layout="phantom", size=size, seed=seed, samples=4 * n_patients,
        patients=patients, split=split, split_kind="seeded",
        split_counts=_counts([split[p] for p in patients for _ in range(4)]),
        provenance=provenance, overwrite=overwrite, replaces=_exists(out),
    )  # fmt: skip


def plan_source(
    source: Source,
    out: Path,
    size: int,
    seed: int,
    split_ratio: tuple[float, float, float],
    keep_aspect: bool = False,
    source_path: Path | None = None,
    overwrite: bool = False,
) -> PreparePlan:
    """A store from the real pairs of ``source`` (CAMUS or folder), resized to ``size``²."""
    if not source.items:
        raise DataError(f"{source_path} contains no image/label pairs")
    _check_size(size)
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
    provenance = {
        "source": source.layout,
        "path": str(Path(source_path).resolve()) if source_path else None,
        "split": split_kind,
        "split_ratio": list(split_ratio) if split_kind == "seeded" else None,
        "seed": seed,
        "keep_aspect": keep_aspect,
        "skipped": source.skipped,
    }
    return PreparePlan(
        out=Path(out), layout=source.layout, size=size, seed=seed, samples=len(source.items),
        patients=tuple(patients), split=split, split_kind=split_kind,
        split_counts=_counts([split[item.patient] for item in source.items]),
        provenance=provenance, overwrite=overwrite, keep_aspect=keep_aspect,
        replaces=_exists(out), skipped=source.skipped, source=source,
    )  # fmt: skip


def _exists(out: Path) -> bool:
    return Path(out).exists() or Path(out).is_symlink()


def plan_prepare(
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
) -> PreparePlan:
    """The plan of :func:`edmcli.data.prepare.prepare` (same arguments): every refusal, in the
    stage's order, and the source's items and patient split; writes nothing."""
    if source not in SOURCES:
        raise DataError(f"source {source!r} is unknown; choose from {', '.join(SOURCES)}")
    ratio = parse_split_ratio(split_ratio) if isinstance(split_ratio, str) else split_ratio
    check_name_length(out)
    if _exists(out):
        if not overwrite:
            raise DataError(f"{out} already exists; pass --overwrite to replace it")
        check_replaceable(out)  # before reading any source: only a store or an empty folder
    if source == "phantom":
        return plan_phantom(out, n_patients, size, seed, ratio, overwrite=overwrite)
    from edmcli.data.sources import DEFAULT_META_PATTERN, camus_source, folder_source

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
    return plan_source(src, out, size, seed, ratio, keep_aspect, root, overwrite)
