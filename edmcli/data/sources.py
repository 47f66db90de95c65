"""Sources of real image/label pairs: the user's CAMUS copy (both releases) or a folder of pairs.

A source is a list of :class:`SourceItem` (one image with its label file and metadata) plus the
official split when the source has one. Files are only opened by :func:`load_item`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edmcli.data.labels import SECTOR, add_sector_label, invalid_label_values, sector_from_image
from edmcli.data.readers import read_2d, strip_suffix
from edmcli.data.store_format import UNKNOWN
from edmcli.errors import DataError

CAMUS_VIEWS = {"2CH": "A2C", "4CH": "A4C"}
CAMUS_SPLIT_FILES = {"train": "training", "val": "validation", "test": "testing"}
QUALITIES = {"good": "good", "medium": "medium", "poor": "poor"}


@dataclass(frozen=True)
class SourceItem:
    """One image and its label file, with what is known about it before reading."""

    image: Path
    label: Path
    patient: str
    view: str = UNKNOWN
    phase: str = UNKNOWN
    quality: str = UNKNOWN
    ef: float = math.nan


@dataclass
class Source:
    """A list of items and, where the source defines one, its official patient split."""

    items: list[SourceItem]
    layout: str
    official_split: dict[str, str] | None = None
    skipped: list[str] = field(default_factory=list)


def load_item(item: SourceItem) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """Read and validate one pair: (image float32 (H, W), labels uint8 5-class (H, W), spacing).

    CAMUS-style labels {0, 1, 2, 3} get the sector label 4 from the image; labels that already
    contain 4 are kept as they are.
    """
    image, spacing = read_2d(item.image)
    labels, _ = read_2d(item.label)
    if image.shape != labels.shape:
        raise DataError(
            f"{item.label} has shape {labels.shape} but its image {item.image.name} has "
            f"shape {image.shape}"
        )
    if not np.all(np.isfinite(image)):
        raise DataError(f"{item.image} contains NaN or infinite values")
    if np.issubdtype(labels.dtype, np.floating):
        if not np.all(np.isfinite(labels)) or np.any(labels != np.round(labels)):
            raise DataError(f"{item.label} contains non-integer label values")
    bad = invalid_label_values(labels.astype(np.int64), allowed=SECTOR + 1)
    if bad:
        raise DataError(
            f"{item.label} has label values {bad} outside the expected {{0, 1, 2, 3}} "
            "(LV, myocardium, LA; optionally 4 for the sector)"
        )
    labels = labels.astype(np.uint8)
    if not np.any(labels == SECTOR):
        labels = add_sector_label(labels, sector_from_image(image))
    return image.astype(np.float32), labels, spacing


# ----------------------------------------------------------------------------------------- CAMUS
_CAMUS_NAME = re.compile(r"^(patient\d{4})_(2CH|4CH)_(ED|ES)$")


def camus_source(root: Path) -> Source:
    """Discover a CAMUS copy: the NIfTI release (``database_nifti/``, ``database_split/``) or the
    older ``.mhd/.raw`` release (``training/``, ``testing/``)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"CAMUS directory {root} does not exist")
    nifti_dir = next(
        (d for d in (root / "database_nifti", root) if any(d.glob("patient*/*.nii*"))), None
    )
    if nifti_dir is not None:
        items, skipped = _camus_items([nifti_dir], (".nii.gz", ".nii"))
        split = _official_split(root)
        return Source(items, "camus-nifti", split, skipped)
    old_dirs = [d for d in (root / "training", root / "testing") if d.is_dir()]
    if old_dirs and any(d.glob("patient*/*.mhd") for d in old_dirs):
        items, skipped = _camus_items(old_dirs, (".mhd",))
        return Source(items, "camus-mhd", None, skipped)
    raise DataError(
        f"{root} does not look like a CAMUS copy: expected database_nifti/patientXXXX/*.nii.gz "
        "or training/patientXXXX/*.mhd"
    )


def _camus_items(dirs: list[Path], suffixes: tuple[str, ...]) -> tuple[list[SourceItem], list[str]]:
    items: list[SourceItem] = []
    skipped: list[str] = []
    for base in dirs:
        for patient_dir in sorted(p for p in base.glob("patient*") if p.is_dir()):
            images = []
            for path in sorted(patient_dir.iterdir()):
                stem = strip_suffix(path)
                match = _CAMUS_NAME.match(stem)
                if match and path.name.endswith(suffixes):
                    images.append((path, match))
            if not images:
                continue
            labels = {path: _sibling(path, "_gt", suffixes) for path, _ in images}
            if all(label is None for label in labels.values()) and base.name == "testing":
                skipped.append(f"{patient_dir.name} (no _gt files: labels withheld)")
                continue
            info = {v: _read_cfg(patient_dir / f"Info_{v}.cfg") for v in CAMUS_VIEWS}
            for path, match in images:
                patient, view, phase = match.groups()
                if labels[path] is None:
                    raise DataError(
                        f"{path} has no label file: expected {strip_suffix(path)}_gt"
                        f"{suffixes[0]} next to it"
                    )
                cfg = info[view]
                items.append(
                    SourceItem(
                        image=path,
                        label=labels[path],
                        patient=patient,
                        view=CAMUS_VIEWS[view],
                        phase=phase,
                        quality=QUALITIES.get(cfg.get("imagequality", "").lower(), UNKNOWN),
                        ef=_float(cfg.get("ef", cfg.get("lvef"))),
                    )
                )
    return items, skipped


def _sibling(path: Path, tag: str, suffixes: tuple[str, ...]) -> Path | None:
    stem = strip_suffix(path)
    for suffix in suffixes:
        candidate = path.with_name(f"{stem}{tag}{suffix}")
        if candidate.is_file():
            return candidate
    return None


def _read_cfg(path: Path) -> dict[str, str]:
    """CAMUS ``Info_*.cfg``: ``Key: value`` lines → lower-case keys."""
    if not path.is_file():
        return {}
    out = {}
    for line in path.read_text(errors="replace").splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key.strip().lower()] = value.strip()
    return out


def _official_split(root: Path) -> dict[str, str] | None:
    split_dir = root / "database_split"
    if not split_dir.is_dir():
        return None
    split: dict[str, str] = {}
    for ours, theirs in CAMUS_SPLIT_FILES.items():
        path = split_dir / f"subgroup_{theirs}.txt"
        if not path.is_file():
            raise DataError(f"{path} is missing: the official split needs all three files")
        for line in path.read_text().split():
            split[line.strip()] = ours
    return split


def _float(value: str | None) -> float:
    try:
        return float(value) if value is not None else math.nan
    except ValueError:
        return math.nan


# ---------------------------------------------------------------------------------------- folder
DEFAULT_META_PATTERN = (
    r"^(?P<patient>.+?)[_-](?P<view>A2C|A4C|2CH|4CH)[_-](?P<phase>ED|ES)(?:[_-].*)?$"
)


def folder_source(
    root: Path,
    image_glob: str = "images/*.png",
    label_template: str = "labels/{stem}.png",
    meta_pattern: str = DEFAULT_META_PATTERN,
) -> Source:
    """Pairs of image/label files: every file matching ``image_glob`` (relative to ``root``), its
    label at ``label_template`` with ``{stem}`` the image's name without suffix. Patient, view and
    phase come from the named groups of ``meta_pattern`` matched against the stem (case
    insensitive); what it does not match is unknown, and the patient defaults to the stem."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"folder {root} does not exist")
    try:
        pattern = re.compile(meta_pattern, re.IGNORECASE)
    except re.error as exc:
        raise DataError(f"--meta-pattern is not a valid regular expression ({exc})") from None
    candidates = sorted(p for p in root.glob(image_glob) if p.is_file())
    label_of = {p: root / label_template.format(stem=strip_suffix(p)) for p in candidates}
    # With images and labels side by side, a glob may match label files too: skip those.
    label_files = {label.resolve() for label in label_of.values() if label.is_file()}
    items = []
    for image in candidates:
        if image.resolve() in label_files:
            continue
        stem, label = strip_suffix(image), label_of[image]
        if not label.is_file():
            raise DataError(f"{image} has no label file: expected {label}")
        match = pattern.match(stem)
        groups = match.groupdict() if match else {}
        view = (groups.get("view") or UNKNOWN).upper()
        items.append(
            SourceItem(
                image=image,
                label=label,
                patient=groups.get("patient") or stem,
                view=CAMUS_VIEWS.get(view, view if view in ("A2C", "A4C") else UNKNOWN),
                phase=(groups.get("phase") or UNKNOWN).upper(),
            )
        )
    return Source(items, "folder")
