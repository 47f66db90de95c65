"""Sources of real image/label pairs: the user's CAMUS copy (both releases) or a folder of pairs.

A source is a list of :class:`SourceItem` (one image with its label file and metadata) plus the
official split when the source has one. Files are only opened by :func:`load_item` (and, for
images wider than 8 bits, by the one pass of :class:`GreyLevels` that fixes the source's scale).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
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

    @cached_property
    def grey_levels(self) -> GreyLevels:
        """The one grey-level scale of this source's images (see :class:`GreyLevels`)."""
        return GreyLevels([item.image for item in self.items])


class GreyLevels:
    """How a source's image values become the store's 8-bit grey levels: one rule per source.

    - 8-bit images are taken as they are (as before this rule existed, bit for bit).
    - Integer images wider than 8 bits (16-bit PNG, int16/uint16 NIfTI or MetaImage): when every
      value of the source fits in 0..255 they are taken as they are; otherwise every image is
      multiplied by 255 / (2**bits - 1), where ``bits`` is the bit depth that holds the largest
      value of the whole source (``max.bit_length()``: 12 for a maximum of 4095 or 3000, 16 for
      65535). Why this scale: B-mode exported as 16-bit PNG usually carries the scanner's 10-,
      12- or 14-bit grey levels; scaling by the dtype's 65535 would leave a 12-bit echo in the
      darkest sixteenth of the range, and scaling each image by its own min/max would change the
      brightness of a frame with its content (a dark frame brightened, tissue no longer
      comparable between frames and patients). One factor for the source keeps the ordering of
      grey levels and the relative brightness of every frame; rounding the maximum up to a whole
      bit depth anchors the factor on the scanner's white level rather than on the brightest
      pixel of the files at hand, so a few more or fewer images rarely change it. Negative
      values are refused (they are not B-mode grey levels: signed or CT-like data).
    - Float images (NIfTI, MetaImage): NaN or infinite values are refused naming the file. When
      every value of the source lies in 0..1 they are multiplied by 255; in 0..255 they are taken
      as they are (as before); any other range is refused naming the file and its range, since a
      float image declares no white level to scale by.

    Label files never come here: their values are class ids, read as stored.

    The rule is fixed the first time an image wider than 8 bits is met, by one pass over all the
    source's images (a source of 8-bit images is never read twice). Each rescaling adds one line
    to :attr:`notes` (``prepare`` prints them), so it is never silent.
    """

    def __init__(self, images: Sequence[Path]) -> None:
        self.images = tuple(images)
        self.notes: list[str] = []
        self._factors: tuple[float, float] | None = None  # (integer images, float images)

    def __call__(self, image: np.ndarray, path: Path) -> np.ndarray:
        """``image`` (read from ``path``, one of the source's images) as float32 grey levels."""
        if image.dtype == np.uint8 or image.dtype.kind not in "uif":
            return image.astype(np.float32)
        if self._factors is None:
            self._factors = self._decide(image, path)
        factor = self._factors[1 if image.dtype.kind == "f" else 0]
        if factor == 1:
            return image.astype(np.float32)
        return (image.astype(np.float64) * factor).astype(np.float32)

    def _decide(self, current: np.ndarray, current_path: Path) -> tuple[float, float]:
        """One pass over the source's images wider than 8 bits: the factor of each kind."""
        paths = self.images if current_path in self.images else (*self.images, current_path)
        int_max, n_int, float_max, n_float = 0, 0, 0.0, 0
        for path in paths:
            array = current if path == current_path else read_2d(path)[0]
            if array.dtype == np.uint8 or array.dtype.kind not in "uif" or array.size == 0:
                continue
            if array.dtype.kind == "f":
                if not np.all(np.isfinite(array)):
                    raise DataError(f"{path} contains NaN or infinite values")
                low, high = float(array.min()), float(array.max())
                if low < 0 or high > 255:
                    raise DataError(
                        f"{path} has float values in [{low:.6g}, {high:.6g}]: expected grey "
                        "levels in 0..1 or 0..255 (rescale the images to one of these, or save "
                        "them as 8- or 16-bit integers)"
                    )
                float_max, n_float = max(float_max, high), n_float + 1
            else:
                low, high = int(array.min()), int(array.max())
                if low < 0:
                    raise DataError(
                        f"{path} has negative grey levels (values {low}..{high}): expected "
                        "unsigned images (0..255, or up to 65535 for 16-bit)"
                    )
                int_max, n_int = max(int_max, high), n_int + 1
        int_factor = float_factor = 1.0
        if int_max > 255:
            bits = int_max.bit_length()
            white = 2**bits - 1
            int_factor = 255 / white
            self.notes.append(
                f"{n_int} of {len(paths)} images hold integer values up to {int_max}: their grey "
                f"levels are scaled by 255/{white} (the {bits}-bit range), the same for every "
                "image"
            )
        if n_float and float_max <= 1:
            float_factor = 255.0
            self.notes.append(
                f"{n_float} of {len(paths)} images hold float values in 0..1: their grey levels "
                "are multiplied by 255"
            )
        return int_factor, float_factor


def load_item(
    item: SourceItem, grey_levels: GreyLevels | None = None
) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """Read and validate one pair: (image float32 (H, W) grey levels 0..255, labels uint8
    5-class (H, W), spacing).

    The image's values become grey levels by ``grey_levels``, the rule of the item's source
    (:attr:`Source.grey_levels`); without it, by the same rule applied to this image alone.
    CAMUS-style labels {0, 1, 2, 3} get the sector label 4 from the image; labels that already
    contain 4 are kept as they are. Labels are never rescaled.
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
    if grey_levels is None:
        grey_levels = GreyLevels([item.image])
    image = grey_levels(image, item.image)
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
    return image, labels, spacing


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
