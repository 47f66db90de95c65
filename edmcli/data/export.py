"""``echo-synth export STORE --format nnunet|nifti|png --out DIR``: a store, real or synthetic, as
files the tools users train with read.

* ``nnunet``: nnU-Net v2's raw dataset layout. ``imagesTr/CASE_0000.nii.gz`` and
  ``labelsTr/CASE.nii.gz`` for every row of a split other than ``test``; the ``test`` rows (real
  stores) go to ``imagesTs/`` and ``labelsTs/``. ``dataset.json`` names the one channel, the
  labels background 0 / LV 1 / myocardium 2 / LA 3, ``numTraining`` and ``file_ending``. The
  store's label 4 (inside the sector, no structure) becomes background; with ``sector_ignore``
  the outside of the sector becomes label 4 ``ignore`` (nnU-Net's ignore label: the highest
  id, not learnt, not scored). ``cases.csv`` maps each case to the store's row and columns.
* ``nifti`` / ``png``: ``images/NAME`` and ``labels/NAME`` pairs with the store's own label ids
  (0..4) and ``samples.csv``. NAME is ``PATIENT_VIEW_PHASE_ROW``, which ``prepare --source
  folder`` reads back (patient, view, phase from the name): the round trip gives the same images
  and label maps, bit for bit.

NIfTI files hold the image transposed (the first axis is x, the columns), as CAMUS's do, with
the store's pixel spacing when it is known (1 mm otherwise). Everything is written into a hidden
folder beside ``DIR`` and renamed into place at the end: an interrupted export leaves no ``DIR``
that looks complete. The store's card ``DATASET.md`` is copied (rendered when it has none).
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edmcli.data.card import CARD_FILE, render_card, source_kinds
from edmcli.data.labels import OUTSIDE, SECTOR
from edmcli.data.store import DatasetStore
from edmcli.data.store_format import BOOKKEEPING_ARRAYS
from edmcli.errors import DataError

FORMATS = ("nnunet", "nifti", "png")
NNUNET_LABELS = {"background": 0, "LV": 1, "myocardium": 2, "LA": 3}
NNUNET_IGNORE = 4
NNUNET_CHANNEL = "echo"  # any name but "CT": nnU-Net normalises each image by its z-score
NNUNET_ENDING = ".nii.gz"
TEST_SPLIT = "test"
BLOCK = 256  # rows read at once


@dataclass(frozen=True)
class ExportResult:
    out: Path
    format: str
    training: int  # nnU-Net: imagesTr cases; pairs: every row
    test: int  # nnU-Net: imagesTs cases
    table: Path  # cases.csv / samples.csv
    card: Path


def check_export(store: Path, fmt: str, out: Path, sector_ignore: bool = False) -> DatasetStore:
    """The refusals of :func:`export_store`, before anything is written: an unknown format,
    ``sector_ignore`` with a format that has no ignore label, an ``out`` that exists and is not
    an empty folder or lies inside the store, a store that is missing or incomplete."""
    if fmt not in FORMATS:
        raise DataError(f"--format {fmt!r} is unknown; choose from {', '.join(FORMATS)}")
    if sector_ignore and fmt != "nnunet":
        raise DataError("--sector-ignore applies to --format nnunet only")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"--out {out} exists and is not an empty folder; name a new folder")
    reader = DatasetStore(store)
    if Path(store).resolve() in (out.resolve(), *out.resolve().parents):
        raise DataError(f"--out {out} is inside the store {store}")
    return reader


def nnunet_labels(labels: np.ndarray, sector_ignore: bool) -> np.ndarray:
    """Store label ids → nnU-Net's: 4 (sector, no structure) → 0; with ``sector_ignore`` the
    outside of the sector (0) → :data:`NNUNET_IGNORE`."""
    out = np.where(labels == SECTOR, 0, labels).astype(np.uint8)
    if sector_ignore:
        out[labels == OUTSIDE] = NNUNET_IGNORE
    return out


def nnunet_dataset_json(store: DatasetStore, n_training: int, sector_ignore: bool,
                        ) -> dict[str, Any]:  # fmt: skip
    """nnU-Net v2's ``dataset.json`` of an export."""
    labels = dict(NNUNET_LABELS)
    if sector_ignore:
        labels["ignore"] = NNUNET_IGNORE
    prov = store.info.get("provenance") or {}
    made = (
        f"synthetic, {prov.get('model')}"
        if prov.get("source") == "synthetic"
        else prov.get("source", "real")
    )
    return {
        "channel_names": {"0": NNUNET_CHANNEL},
        "labels": labels,
        "numTraining": n_training,
        "file_ending": NNUNET_ENDING,
        "name": store.path.stem,
        "description": f"echo-synth export of {store.path.name} ({made}); see {CARD_FILE}",
        "licence": licence_line(source_kinds(prov)),
    }


def licence_line(kinds: set[str]) -> str:
    """One line for ``dataset.json``; the card has the full note."""
    if "camus" in kinds:
        return f"CC BY-NC-SA 4.0: derived from CAMUS (Leclerc et al., TMI 2019); see {CARD_FILE}"
    if kinds == {"phantom"}:
        return "no patient data (echo-synth phantom); no third-party terms"
    return f"the terms of the source images apply; see {CARD_FILE}"


def write_nifti(array: np.ndarray, spacing: tuple[float, float], path: Path) -> None:
    """A 2-D uint8 array (rows, columns) as NIfTI, transposed (x = columns), pixel size in mm."""
    import nibabel as nib

    row, col = (s if math.isfinite(s) and s > 0 else 1.0 for s in spacing)
    image = nib.Nifti1Image(np.ascontiguousarray(array.T), np.diag([col, row, 1.0, 1.0]))
    image.set_data_dtype(np.uint8)
    image.header.set_xyzt_units("mm")
    nib.save(image, str(path))


def write_png(array: np.ndarray, path: Path) -> None:
    from PIL import Image

    Image.fromarray(np.ascontiguousarray(array), mode="L").save(path, format="PNG")


def _columns(store: DatasetStore) -> dict[str, np.ndarray]:
    """The per-sample columns written to the table (spacing as two columns)."""
    cols: dict[str, np.ndarray] = {}
    for name in store.fields:
        if name in BOOKKEEPING_ARRAYS:
            continue
        values = store.column(name)
        if name == "spacing":
            cols["spacing_row_mm"], cols["spacing_col_mm"] = values[:, 0], values[:, 1]
        else:
            cols[name] = values
    return cols


def case_name(patient: str, view: str, phase: str, row: int) -> str:
    """``PATIENT_VIEW_PHASE_ROW``, safe as a file name, readable by ``prepare --source folder``."""
    safe = "".join(c if c.isalnum() or c in "-." else "-" for c in patient) or "patient"
    return f"{safe}_{view}_{phase}_{row:06d}"


def export_store(
    store: Path,
    fmt: str,
    out: Path,
    *,
    sector_ignore: bool = False,
    progress: Callable[[int], None] | None = None,
) -> ExportResult:
    """Write ``store`` to ``out`` in format ``fmt`` (module docstring)."""
    reader = check_export(store, fmt, out, sector_ignore)
    out = Path(out)
    tmp = out.with_name(f".{out.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)  # an interrupted export's leftovers
    tmp.mkdir(parents=True)
    cols = _columns(reader)
    spacing = reader.column("spacing") if "spacing" in reader.fields else None
    n = len(reader)
    split = reader.column("split")
    meta = zip(*(reader.column(c) for c in ("patient", "view", "phase")), strict=True)
    names = [case_name(*row, i) for i, row in enumerate(meta)]
    is_test = (split == TEST_SPLIT) if fmt == "nnunet" else np.zeros(n, bool)
    rows_out: list[dict[str, Any]] = []
    for sub in (("imagesTr", "labelsTr", "imagesTs", "labelsTs") if fmt == "nnunet"
                else ("images", "labels")):  # fmt: skip
        (tmp / sub).mkdir()
    for start in range(0, n, BLOCK):
        images = np.asarray(reader.images[start : start + BLOCK])[:, 0]
        labels = np.asarray(reader.labels[start : start + BLOCK])
        for j in range(len(images)):
            i = start + j
            pixel = (math.nan, math.nan) if spacing is None else tuple(map(float, spacing[i]))
            if fmt == "nnunet":
                where = ("imagesTs", "labelsTs") if is_test[i] else ("imagesTr", "labelsTr")
                image = Path(where[0]) / f"{names[i]}_0000{NNUNET_ENDING}"
                label = Path(where[1]) / f"{names[i]}{NNUNET_ENDING}"
                write_nifti(images[j], pixel, tmp / image)
                write_nifti(nnunet_labels(labels[j], sector_ignore), pixel, tmp / label)
            else:
                name = f"{names[i]}{'.png' if fmt == 'png' else '.nii.gz'}"
                image, label = Path("images") / name, Path("labels") / name
                if fmt == "png":
                    write_png(images[j], tmp / image)
                    write_png(labels[j], tmp / label)
                else:
                    write_nifti(images[j], pixel, tmp / image)
                    write_nifti(labels[j], pixel, tmp / label)
            rows_out.append({"case": names[i], "row": i, "image": image.as_posix(),
                             "label": label.as_posix(),
                             **{k: _plain(v[i]) for k, v in cols.items()}})  # fmt: skip
        if progress is not None:
            progress(len(images))
    n_test = int(is_test.sum())
    if fmt == "nnunet":
        for sub in ("imagesTs", "labelsTs"):
            if n_test == 0:
                (tmp / sub).rmdir()
        dataset = nnunet_dataset_json(reader, n - n_test, sector_ignore)
        (tmp / "dataset.json").write_text(json.dumps(dataset, indent=2))
    table = tmp / ("cases.csv" if fmt == "nnunet" else "samples.csv")
    with table.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows_out[0]) if rows_out else ["case"])
        writer.writeheader()
        writer.writerows(rows_out)
    card = reader.path / CARD_FILE
    if card.is_file():
        shutil.copyfile(card, tmp / CARD_FILE)
    else:
        (tmp / CARD_FILE).write_text(render_card(reader))
    if out.exists():
        out.rmdir()  # checked empty
    tmp.rename(out)
    return ExportResult(out, fmt, n - n_test, n_test, out / table.name, out / CARD_FILE)


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return ""
    return value
