"""The read-only view of a complete dataset store (:class:`DatasetStore`): its arrays read
lazily, its per-sample columns, selections, summary and verification.

Opening a store checks its files cheaply (:mod:`edmcli.data.store_integrity`);
:meth:`DatasetStore.verify` reads everything and compares the checksums recorded when it was
written. The format is :mod:`edmcli.data.store_format`; stores are written by
:mod:`edmcli.data.store_writer` and put in place by :mod:`edmcli.data.store_replace`.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from edmcli.data.labels import LABEL_NAMES, NUM_CLASSES, SPLITS
from edmcli.data.store_format import ATTRS_KEY, CHECKSUMS_KEY, FORMAT_NAME, STRING_FIELDS
from edmcli.data.store_integrity import (
    VerifyResult,
    array_checksum,
    check_store_files,
    decode_all,
    read_error,
)
from edmcli.errors import DataError

# The dataset card (edmcli.data.card: CARD_FILE, VERDICTS_FILE) lives in the store's folder
# beside zarr.json; zarr warns about any file there that is not part of the hierarchy.
warnings.filterwarnings(
    "ignore", message=r"Object at (DATASET\.md|card\.json) is not recognized", module="zarr"
)


class DatasetStore:
    """A validated, read-only view of a complete dataset store.

    Arrays are read lazily (``store.images[i]``); the small per-sample columns are loaded once.
    Opening checks the store's files cheaply (:func:`check_store_files`); a read that fails later
    (a damaged chunk) raises one DataError naming the array.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.group = open_store_group(self.path)
        self.info: dict[str, Any] = dict(self.group.attrs[ATTRS_KEY])
        self.images = StoreArray(self.group["images"], self.path, "images")
        self.labels = StoreArray(self.group["labels"], self.path, "labels")
        n = self.images.shape[0]
        if self.labels.shape != (n, *self.images.shape[2:]):
            raise DataError(
                f"{self.path} is corrupt: images {self.images.shape} and labels "
                f"{self.labels.shape} do not match"
            )
        self._arrays = sorted(self.group.array_keys())
        check_store_files(self.path, self._arrays, n, self.info)
        self._columns: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.images.shape[2]), int(self.images.shape[3])

    @property
    def fields(self) -> list[str]:
        """Names of the per-sample columns."""
        return sorted(k for k in self.group.array_keys() if k not in ("images", "labels"))

    def column(self, name: str) -> np.ndarray:
        """One per-sample column, cached (strings come back as ``str`` arrays)."""
        if name not in self._columns:
            if name not in self.group.array_keys():
                raise DataError(f"{self.path} has no per-sample field {name!r}")
            values = StoreArray(self.group[name], self.path, name)[:]
            if name in STRING_FIELDS or values.dtype.kind in "OUT":
                values = np.array(values.tolist(), dtype=str)
            self._columns[name] = values
        return self._columns[name]

    def indices(
        self,
        splits: str | Sequence[str] | None = None,
        views: str | Sequence[str] | None = None,
    ) -> np.ndarray:
        """Sample indices whose split and view are among those given (None: all)."""
        keep = np.ones(len(self), dtype=bool)
        for name, wanted in (("split", splits), ("view", views)):
            if wanted is not None:
                wanted = [wanted] if isinstance(wanted, str) else list(wanted)
                keep &= np.isin(self.column(name), wanted)
        return np.flatnonzero(keep)

    def read_rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(images uint8 (n, 1, H, W), label maps uint8 (n, H, W)) of the sample ``rows``."""
        rows = np.asarray(rows, dtype=np.intp)
        return (np.asarray(self.images.get_orthogonal_selection((rows,))),
                np.asarray(self.labels.get_orthogonal_selection((rows,))))  # fmt: skip

    def monitoring_split(self) -> str:
        """The split to monitor training on: ``val``, or ``train`` for stores without one."""
        return "val" if len(self.indices("val")) else "train"

    def patients(self, splits: str | Sequence[str] | None = None) -> list[str]:
        """Sorted unique patient ids of the given splits."""
        return sorted(set(self.column("patient")[self.indices(splits)].tolist()))

    def invalid_label_values(self, block: int = 512) -> list[int]:
        """Label values outside the convention 0..4 anywhere in the store (read in blocks of
        ``block`` maps; a uint8 map of 256² is 64 KiB)."""
        found: set[int] = set()
        for start in range(0, len(self), block):
            values = np.unique(self.labels[start : start + block])
            found |= {int(v) for v in values if v >= NUM_CLASSES}
        return sorted(found)

    def summary(self) -> dict[str, Any]:
        """Counts per split/view/phase, label histogram, size on disk and provenance."""
        counts: dict[str, dict[str, int]] = {}
        split, view, phase = self.column("split"), self.column("view"), self.column("phase")
        present = set(np.unique(split).tolist())
        for s in [s for s in SPLITS if s in present] + sorted(present - set(SPLITS)):
            sel = split == s
            counts[str(s)] = {
                "samples": int(sel.sum()),
                "patients": len(set(self.column("patient")[sel].tolist())),
                **{
                    f"{v}/{p}": int((sel & (view == v) & (phase == p)).sum())
                    for v in np.unique(view)
                    for p in np.unique(phase)
                },
            }
        histogram = np.zeros(NUM_CLASSES, dtype=np.int64)
        step = int(self.info.get("samples_per_shard", 64))
        for start in range(0, len(self), step):
            block = self.labels[start : start + step]
            histogram += np.bincount(block.ravel(), minlength=NUM_CLASSES)[:NUM_CLASSES]
        total = max(int(histogram.sum()), 1)
        return {
            "path": str(self.path),
            "samples": len(self),
            "image_size": list(self.image_size),
            "splits": counts,
            "label_fraction": {
                LABEL_NAMES[i]: round(float(histogram[i]) / total, 5) for i in range(NUM_CLASSES)
            },
            "bytes_on_disk": directory_size(self.path),
            "fields": self.fields,
            "provenance": self.info.get("provenance", {}),
            "created": self.info.get("created"),
            "code_version": self.info.get("code_version"),
            "checksums": bool(self.info.get(CHECKSUMS_KEY)),
        }

    def verify(self, full: bool = True) -> VerifyResult:
        """Check the store: the cheap file checks of opening again and, with ``full``, read every
        chunk file and compare each array with the checksum
        :func:`~edmcli.data.store_writer.mark_complete` recorded (a store written before
        checksums existed is decoded completely instead, and passes with a note). Raises one
        DataError naming the first damaged array or file."""
        start = time.perf_counter()
        check_store_files(self.path, self._arrays, len(self), self.info)
        result = VerifyResult(self.path, len(self), full, self._arrays)
        recorded = (self.info.get(CHECKSUMS_KEY) or {}).get("arrays")
        if not isinstance(recorded, dict):
            result.notes.append(
                "no checksums recorded (the store was written before echo-synth recorded "
                "them; re-run the command that wrote it to add them)"
            )
            recorded = {}
        gone = sorted(set(recorded) - set(self._arrays))
        if gone:
            raise DataError(
                f"{self.path} is damaged: array {gone[0]} (present when it was written) is "
                "missing; copy it again from its source or re-run the command that wrote it"
            )
        if recorded and sorted(set(self._arrays) - set(recorded)):
            extra = ", ".join(sorted(set(self._arrays) - set(recorded)))
            result.notes.append(f"arrays added after writing (decoded, no checksum): {extra}")
        if full:
            for name in self._arrays:
                if name not in recorded:  # no checksum: at least every chunk must decode
                    decode_all(self.group[name], self.path, name, result)
                    continue
                if array_checksum(self.path, name, result=result) != recorded[name]:
                    raise DataError(
                        f"{self.path} is damaged: array {name} differs from the checksum "
                        "recorded when it was written (a file was changed since); copy it again "
                        "from its source or re-run the command that wrote it"
                    )
                result.matched += 1
        result.seconds = time.perf_counter() - start
        return result

    def verify_report(self, full: bool = True) -> str:
        """:meth:`verify` as one short line for people (raises like it)."""
        return self.verify(full).summary()


class StoreArray:
    """A Zarr array of a store whose reads raise one DataError instead of Zarr's traceback
    (a checksum or decode failure of a damaged chunk). Everything else is the Zarr array's."""

    _READS = ("get_basic_selection", "get_orthogonal_selection", "get_coordinate_selection",
              "get_mask_selection", "get_block_selection")  # fmt: skip

    def __init__(self, array: zarr.Array, store: Path, name: str):
        self._array, self._path, self._name = array, Path(store), name

    def __getitem__(self, selection: Any) -> Any:
        return self._read(self._array.__getitem__, selection)

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("_"):  # also keeps unpickling from recursing
            raise AttributeError(attr)
        value = getattr(self._array, attr)
        if attr in self._READS:
            return lambda *args, **kwargs: self._read(value, *args, **kwargs)
        if attr in ("oindex", "vindex", "blocks"):
            return _CheckedIndexer(self, value)
        return value

    def __len__(self) -> int:
        return len(self._array)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        values = np.asarray(self[...])
        return values if dtype is None else values.astype(dtype)

    def __repr__(self) -> str:
        return f"StoreArray({self._path}/{self._name}, shape={self._array.shape})"

    def _read(self, read: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return read(*args, **kwargs)
        except (IndexError, TypeError, DataError):  # a bad selection, not a damaged store
            raise
        except Exception as exc:
            raise read_error(self._path, self._name, exc) from None


@dataclass(frozen=True)
class _CheckedIndexer:
    owner: StoreArray
    indexer: Any

    def __getitem__(self, selection: Any) -> Any:
        return self.owner._read(self.indexer.__getitem__, selection)


def open_store_group(path: str | Path) -> zarr.Group:
    """Open ``path`` as a complete echo-synth store, or raise one clear DataError."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} does not exist")
    if not (path / "zarr.json").is_file():
        if any((path / name).is_file() for name in (".zgroup", ".zarray", ".zattrs")):
            raise DataError(
                f"{path} is a Zarr v2 store, which echo-synth does not read (its stores are "
                "Zarr v3); re-run echo-synth prepare from its source to write a v3 store (zarr "
                f"3 still opens the old one: zarr.open_group('{path}', zarr_format=2))"
            )
        raise DataError(f"{path} is not a dataset store (no zarr.json; create one with prepare)")
    try:
        group = zarr.open_group(str(path), mode="r")
        info = group.attrs.get(ATTRS_KEY)
    except Exception as exc:  # zarr raises many types for unreadable metadata
        raise DataError(f"{path} is not a readable Zarr store ({exc})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT_NAME:
        raise DataError(f"{path} is a Zarr store but not an echo-synth dataset store")
    if not info.get("complete", False):
        raise DataError(
            f"{path} is incomplete (its writer was interrupted or is still running); "
            "rerun the command that writes it"
        )
    if CHECKSUMS_KEY in info and not isinstance(info[CHECKSUMS_KEY], dict):
        raise DataError(
            f"{path} is flagged complete but its writer never finished it (no checksums were "
            "recorded, so the flag was set by hand or by another tool); rerun the command that "
            "writes it"
        )
    name = "zarr.json"
    try:  # every array's metadata, once: a damaged zarr.json of an array is found here
        names = list(group.array_keys())
        for name in names:
            group[name]
    except Exception as exc:  # zarr raises many types (JSON, validation, unknown dtype ...)
        reason = " ".join(str(exc).split())[:120] or type(exc).__name__
        raise DataError(
            f"{path} is damaged: the metadata of {name} cannot be read ({reason}); copy it "
            "again from its source or re-run the command that wrote it"
        ) from None
    missing = [k for k in ("images", "labels", *STRING_FIELDS) if k not in names]
    if missing:
        raise DataError(f"{path} is corrupt: arrays {', '.join(missing)} are missing")
    return group


def directory_size(path: Path) -> int:
    """Bytes of all files below ``path``."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
