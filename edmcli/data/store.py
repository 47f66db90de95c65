"""Dataset stores: one Zarr v3 group per dataset, real or synthetic (layout in README.md).

```
STORE/                      zarr v3 group; attrs["echo_synth"] describes the store
  images   uint8 (N, 1, H, W)   shards of whole samples, one sample per inner chunk
  labels   uint8 (N, H, W)      same sharding; ids follow edmcli.data.labels
  patient, view, phase, split, quality   strings (N,)
  ef       float32 (N,)  ejection fraction in %, NaN when unknown
  spacing  float32 (N, 2)  pixel size (row, column) in mm, NaN when unknown
  ...      further per-sample fields (synthetic stores: source_index, seed, ...)
```
``attrs["echo_synth"]["complete"]`` is false while a store is written and true once every sample
is in place; readers refuse incomplete stores. Parallel writers own disjoint shards.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from edmcli.data.labels import LABEL_NAMES, NUM_CLASSES, SPLITS
from edmcli.errors import DataError

FORMAT_NAME = "echo-synth-dataset"
FORMAT_VERSION = 1
ATTRS_KEY = "echo_synth"
STRING_FIELDS = ("patient", "view", "phase", "split", "quality")
UNKNOWN = "unknown"


def code_version() -> str:
    """The installed echo-synth version (recorded in every store and run)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("echo-synth")
    except PackageNotFoundError:
        return "unknown"


def samples_per_shard(height: int, width: int) -> int:
    """Samples per shard: about 4 MiB of raw image data, a power of two in [16, 1024]."""
    n = max(16, min(1024, (4 << 20) // (height * width)))
    return 1 << (n.bit_length() - 1)


@dataclass(frozen=True)
class SampleMeta:
    """Per-sample metadata of a store (one row of its 1-D arrays)."""

    patient: str
    view: str
    phase: str
    split: str
    quality: str = UNKNOWN
    ef: float = float("nan")
    spacing: tuple[float, float] = (float("nan"), float("nan"))


def meta_columns(metas: Sequence[SampleMeta]) -> dict[str, np.ndarray]:
    """SampleMeta rows → the store's per-sample columns."""
    cols: dict[str, np.ndarray] = {
        name: np.array([getattr(m, name) for m in metas], dtype=str) for name in STRING_FIELDS
    }
    cols["ef"] = np.array([m.ef for m in metas], dtype=np.float32)
    cols["spacing"] = np.array([m.spacing for m in metas], dtype=np.float32).reshape(-1, 2)
    return cols


def create_store(
    path: str | Path,
    n: int,
    height: int,
    width: int,
    attrs: dict[str, Any],
    extra_fields: dict[str, np.dtype] | None = None,
    shard: int | None = None,
) -> zarr.Group:
    """Create an empty, *incomplete* store of ``n`` samples at ``path`` (which must not exist)."""
    if n < 1:
        raise DataError(f"cannot create store {path}: it would hold no samples")
    shard = shard or samples_per_shard(height, width)
    group = zarr.open_group(str(path), mode="w-")
    group.create_array(
        "images", shape=(n, 1, height, width), dtype="uint8",
        chunks=(1, 1, height, width), shards=(shard, 1, height, width),
    )  # fmt: skip
    group.create_array(
        "labels", shape=(n, height, width), dtype="uint8",
        chunks=(1, height, width), shards=(shard, height, width),
    )  # fmt: skip
    for name in STRING_FIELDS:
        group.create_array(name, shape=(n,), dtype=str, chunks=(shard,), fill_value="")
    group.create_array("ef", shape=(n,), dtype="float32", chunks=(shard,), fill_value=np.nan)
    group.create_array(
        "spacing", shape=(n, 2), dtype="float32", chunks=(shard, 2), fill_value=np.nan
    )
    for name, dtype in (extra_fields or {}).items():
        group.create_array(name, shape=(n,), dtype=dtype, chunks=(shard,))
    info = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "complete": False,
        "num_samples": n,
        "image_size": [height, width],
        "samples_per_shard": shard,
        "label_names": {str(k): v for k, v in LABEL_NAMES.items()},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "code_version": code_version(),
        **attrs,
    }
    group.attrs[ATTRS_KEY] = jsonable(info)
    return group


def write_block(
    group: zarr.Group,
    start: int,
    images: np.ndarray,
    labels: np.ndarray,
    columns: dict[str, np.ndarray],
) -> None:
    """Write samples ``start .. start+B``: images (B, 1, H, W) or (B, H, W), labels (B, H, W)."""
    images = np.asarray(images, dtype=np.uint8)
    if images.ndim == 3:
        images = images[:, None]
    stop = start + images.shape[0]
    group["images"][start:stop] = images
    group["labels"][start:stop] = np.asarray(labels, dtype=np.uint8)
    for name, values in columns.items():
        group[name][start:stop] = values


def mark_complete(group: zarr.Group, **extra: Any) -> None:
    """Flag a fully written store as complete (the last write of every writer)."""
    info = dict(group.attrs[ATTRS_KEY])
    info.update(jsonable(extra))
    info["complete"] = True
    group.attrs[ATTRS_KEY] = info


@contextlib.contextmanager
def atomic_store_path(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``out``; on success it replaces ``out`` by a rename.

    On any error the temporary store is deleted, so a crash never leaves a store at ``out`` that
    looks complete. An existing ``out`` is refused unless ``overwrite``.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise DataError(f"{out} already exists; pass --overwrite to replace it")
    if not out.parent.exists():
        out.parent.mkdir(parents=True)
    tmp = out.with_name(f".{out.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


class DatasetStore:
    """A validated, read-only view of a complete dataset store.

    Arrays are read lazily (``store.images[i]``); the small per-sample columns are loaded once.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.group = open_store_group(self.path)
        self.info: dict[str, Any] = dict(self.group.attrs[ATTRS_KEY])
        self.images = self.group["images"]
        self.labels = self.group["labels"]
        n = self.images.shape[0]
        if self.labels.shape != (n, *self.images.shape[2:]):
            raise DataError(
                f"{self.path} is corrupt: images {self.images.shape} and labels "
                f"{self.labels.shape} do not match"
            )
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
            values = self.group[name][:]
            if name in STRING_FIELDS:
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

    def monitoring_split(self) -> str:
        """The split to monitor training on: ``val``, or ``train`` for stores without one."""
        return "val" if len(self.indices("val")) else "train"

    def patients(self, splits: str | Sequence[str] | None = None) -> list[str]:
        """Sorted unique patient ids of the given splits."""
        return sorted(set(self.column("patient")[self.indices(splits)].tolist()))

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
        }


def open_store_group(path: str | Path) -> zarr.Group:
    """Open ``path`` as a complete echo-synth store, or raise one clear DataError."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} does not exist")
    if not (path / "zarr.json").is_file():
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
    missing = [k for k in ("images", "labels", *STRING_FIELDS) if k not in group.array_keys()]
    if missing:
        raise DataError(f"{path} is corrupt: arrays {', '.join(missing)} are missing")
    return group


def directory_size(path: Path) -> int:
    """Bytes of all files below ``path``."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def jsonable(value: Any) -> Any:
    """Round-trip through JSON so attrs and reports hold plain types (numpy → Python numbers
    and lists, paths and other objects → str)."""
    return json.loads(json.dumps(value, default=_json_default))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)
