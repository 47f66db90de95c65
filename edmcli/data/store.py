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

Integrity: writers store every chunk, even one that holds only the fill value, so that a missing
chunk file always means damage. :func:`mark_complete` records a SHA-256 per array (over its
chunk files' bytes) and the chunk files that were absent at completion (normally none) in
``attrs["echo_synth"]["checksums"]``. Opening a store checks cheaply that every chunk file is
there, that each shard file's index is intact and points inside the file, and that the per-sample
columns are as long as ``images``; :meth:`DatasetStore.verify` reads everything and compares the
checksums. ``--overwrite`` replaces only an echo-synth store or an empty folder
(:func:`check_replaceable`).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
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
CHECKSUMS_KEY = "checksums"  # attrs["echo_synth"]["checksums"]: None until mark_complete
CHECKSUM_ALGORITHM = "sha256 over the shape, then each chunk file in grid order: key, size, bytes"
BOOKKEEPING_ARRAYS = ("shard_done",)  # writer state (sample's done flags), not per-sample
_SHARDING = "sharding_indexed"
_EMPTY = 2**64 - 1  # a shard index entry (offset, nbytes) of an inner chunk never written
_SLAB_BYTES = 4 << 20  # rows decoded at once by verify of a store without checksums
_READ_BYTES = 1 << 20  # block size of checksum reads
_CHUNK_FOLDER = "c"  # Zarr v3 default chunk key encoding: ARRAY/c/0/0/...


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
        fill = {"fill_value": ""} if dtype is str else {}
        group.create_array(name, shape=(n,), dtype=dtype, chunks=(shard,), **fill)
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
        CHECKSUMS_KEY: None,  # filled in by mark_complete
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
    # Store every chunk, fill values included: a chunk file missing later then means damage.
    with zarr.config.set({"array.write_empty_chunks": True}):
        group["images"][start:stop] = images
        group["labels"][start:stop] = np.asarray(labels, dtype=np.uint8)
        for name, values in columns.items():
            group[name][start:stop] = values


def mark_complete(group: zarr.Group, **extra: Any) -> None:
    """Flag a fully written store as complete (the last write of every writer), recording a
    checksum per array (:func:`array_checksum`: it reads the chunk files back, not decoding
    them) and the chunk files absent at this moment (normally none)."""
    info = dict(group.attrs[ATTRS_KEY])
    info.update(jsonable(extra))
    root = _group_path(group)
    checksums: dict[str, Any] = {"algorithm": CHECKSUM_ALGORITHM, "arrays": {}}
    absent: dict[str, list[str]] = {}
    for name in sorted(group.array_keys()) if root is not None else []:
        layout = read_layout(root, name)
        checksums["arrays"][name] = array_checksum(root, name, layout)
        missing = [key for key in layout.keys() if not (root / name / key).is_file()]
        if missing:
            absent[name] = missing
    if absent:
        checksums["absent_chunks"] = absent
    info[CHECKSUMS_KEY] = checksums
    info["complete"] = True
    group.attrs[ATTRS_KEY] = info


@contextlib.contextmanager
def atomic_store_path(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``out``; on success it replaces ``out`` by a rename.

    On any error the temporary store is deleted, so a crash never leaves a store at ``out`` that
    looks complete. An existing ``out`` is refused unless ``overwrite``, and even then unless it
    is an echo-synth store or an empty folder (:func:`check_replaceable`).
    """
    out = Path(out)
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise DataError(f"{out} already exists; pass --overwrite to replace it")
        check_replaceable(out)
    if not out.parent.exists():
        out.parent.mkdir(parents=True)
    tmp, old = out.with_name(f".{out.name}.partial"), out.with_name(f".{out.name}.old")
    _remove_leftover(tmp)
    _remove_leftover(old)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def check_replaceable(path: str | Path) -> None:
    """Raise one DataError unless ``--overwrite`` may delete ``path``: only an echo-synth store
    (a Zarr v3 group whose attrs hold the echo-synth marker and nothing but its arrays) or an
    empty folder; never a file, a link, another folder, the current directory or one above it,
    the home directory or one above it. A path that does not exist is fine (nothing to delete)."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    refuse = f"--overwrite refuses to delete {path}:"
    if path.is_symlink():
        raise DataError(f"{refuse} it is a symbolic link, not a dataset store")
    target = path.resolve()
    for place, what in ((Path.cwd(), "the current directory"), (_home(), "your home directory")):
        if place is not None and (target == place.resolve() or target in place.resolve().parents):
            raise DataError(f"{refuse} it is {what} or a folder above it")
    if not path.is_dir():
        raise DataError(f"{refuse} it is a file, not a dataset store")
    entries = sorted(path.iterdir())
    if not entries:
        return
    if not is_echo_synth_store(path):
        raise DataError(
            f"{refuse} it is not an echo-synth dataset store; move or delete it yourself, "
            "or choose another --out"
        )
    for entry in entries:
        inside = sorted(p.name for p in entry.iterdir()) if entry.is_dir() else []
        ours = entry.name == "zarr.json" or (
            entry.is_dir() and "zarr.json" in inside and set(inside) <= {"zarr.json", _CHUNK_FOLDER}
        )
        if not ours:
            raise DataError(
                f"{refuse} it holds {entry.name}, which is not part of the store; move that "
                "out first"
            )


def replace_store(path: str | Path) -> None:
    """Delete ``path`` for ``--overwrite`` after :func:`check_replaceable` allowed it."""
    path = Path(path)
    check_replaceable(path)
    if path.is_dir():
        shutil.rmtree(path)


def is_echo_synth_store(path: str | Path) -> bool:
    """Whether ``path`` holds a Zarr v3 group whose attrs carry the echo-synth marker (complete
    or not); reads only its ``zarr.json``."""
    try:
        meta = json.loads((Path(path) / "zarr.json").read_bytes())
        info = meta.get("attributes", {}).get(ATTRS_KEY)
    except (OSError, ValueError, AttributeError):
        return False
    return (
        meta.get("zarr_format") == 3
        and meta.get("node_type") == "group"
        and isinstance(info, dict)
        and info.get("format") == FORMAT_NAME
    )


def _home() -> Path | None:
    try:
        return Path.home()
    except (KeyError, RuntimeError):  # no home directory known
        return None


def _remove_leftover(path: Path) -> None:
    """Delete a ``.NAME.partial``/``.NAME.old`` folder a crashed writer left, if it is ours."""
    if not (path.exists() or path.is_symlink()):
        return
    if path.is_dir() and not path.is_symlink():
        if not any(path.iterdir()) or (path / "zarr.json").is_file():
            shutil.rmtree(path)
            return
    raise DataError(f"{path} is in the way and is not a store that echo-synth left; move it away")


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
        chunk file and compare each array with the checksum :func:`mark_complete` recorded (a
        store written before checksums existed is decoded completely instead, and passes with a
        note). Raises one DataError naming the first damaged array or file."""
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


@dataclass
class VerifyResult:
    """What :meth:`DatasetStore.verify` checked."""

    path: Path
    samples: int
    full: bool
    arrays: list[str]
    matched: int = 0  # arrays whose checksum was compared and matches
    bytes_read: int = 0  # bytes read by the full check (file bytes, or decoded ones)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        what = f"{self.path}: {len(self.arrays)} arrays, {self.samples} samples"
        if not self.full:
            text = f"{what}: every chunk file present, shard indexes intact"
        elif self.matched:
            text = (
                f"{what}: read {self.bytes_read / 2**20:.1f} MiB in {self.seconds:.2f} s, "
                f"all {self.matched} checksums match"
            )
        else:
            text = f"{what}: read {self.bytes_read / 2**20:.1f} MiB in {self.seconds:.2f} s"
        return "; ".join([text, *self.notes])


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


def read_error(store: Path, name: str, exc: BaseException, where: str = "") -> DataError:
    """The one sentence for a failed read of array ``name`` of ``store``."""
    reason = " ".join(str(exc).split())[:120] or type(exc).__name__
    return DataError(
        f"{store} is damaged: reading {name}{where} failed ({reason}); copy it again from its "
        "source or re-run the command that wrote it"
    )


@dataclass(frozen=True)
class ArrayLayout:
    """Where an array's chunk files are, from its ``zarr.json`` (regular grid, v3 metadata)."""

    name: str
    shape: tuple[int, ...]
    grid_chunk: tuple[int, ...]  # the shard shape of a sharded array, else the chunk shape
    separator: str
    v2_keys: bool  # chunk key encoding "v2" (0.0) instead of the default (c/0/0)
    inner: tuple[int, ...] | None = None  # inner chunk shape of a sharded array
    index_bytes: int | None = None  # size of a shard's index (None: codecs not understood)
    index_at_end: bool = True
    index_crc: bool = False

    def keys(self) -> Iterator[str]:
        """Every chunk (shard) key of the array, in grid order."""
        grid = [math.ceil(s / c) for s, c in zip(self.shape, self.grid_chunk, strict=True)]
        for coords in np.ndindex(*grid):
            yield self.key_of(coords)

    def key_of(self, coords: Sequence[int]) -> str:
        parts = [str(c) for c in coords]
        if self.v2_keys:
            return self.separator.join(parts) or "0"
        return self.separator.join([_CHUNK_FOLDER, *parts])


def read_layout(store: Path, name: str) -> ArrayLayout:
    """The chunk layout of array ``name`` from its ``zarr.json`` (DataError when unreadable or
    not a regular grid)."""
    try:
        meta = json.loads((Path(store) / name / "zarr.json").read_bytes())
        shape = tuple(int(s) for s in meta["shape"])
        grid = meta["chunk_grid"]
        if grid.get("name") != "regular":
            raise ValueError(f"chunk grid {grid.get('name')!r}")
        chunk = tuple(int(c) for c in grid["configuration"]["chunk_shape"])
        encoding = meta.get("chunk_key_encoding", {"name": "default"})
        v2_keys = encoding.get("name") == "v2"
        separator = encoding.get("configuration", {}).get("separator", "." if v2_keys else "/")
        codecs = meta.get("codecs", [])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DataError(
            f"{store} is damaged: the metadata of array {name} is unreadable ({exc}); copy it "
            "again from its source or re-run the command that wrote it"
        ) from None
    layout = ArrayLayout(name, shape, chunk, separator, v2_keys)
    if not codecs or codecs[0].get("name") != _SHARDING:
        return layout
    config = codecs[0].get("configuration", {})
    inner = tuple(int(c) for c in config.get("chunk_shape", chunk))
    index_codecs = [c.get("name") for c in config.get("index_codecs", [])]
    endian = (config.get("index_codecs") or [{}])[0].get("configuration", {}).get("endian")
    n_inner = math.prod(c // i for c, i in zip(chunk, inner, strict=True))
    known = index_codecs in (["bytes"], ["bytes", "crc32c"]) and endian in (None, "little")
    return ArrayLayout(
        name, shape, chunk, separator, v2_keys, inner=inner,
        index_bytes=16 * n_inner + 4 * (len(index_codecs) == 2) if known else None,
        index_at_end=config.get("index_location", "end") == "end",
        index_crc=index_codecs == ["bytes", "crc32c"],
    )  # fmt: skip


def check_store_files(
    path: Path, arrays: Sequence[str], n: int, info: dict[str, Any] | None = None
) -> None:
    """The cheap check of opening a store: per-sample columns as long as ``images`` (``n``), every
    chunk file of every array present (of ``images`` and ``labels`` only for stores written
    before checksums existed, whose writers skipped chunks that held only fill values) and every
    shard file's index intact (its crc32c) with each inner chunk inside the file."""
    checksums = (info or {}).get(CHECKSUMS_KEY)
    absent = checksums.get("absent_chunks", {}) if isinstance(checksums, dict) else {}
    for name in arrays:
        layout = read_layout(path, name)
        if name not in ("images", "labels", *BOOKKEEPING_ARRAYS):
            rows = layout.shape[0] if layout.shape else 0
            if rows != n:
                raise DataError(
                    f"{path} is damaged: per-sample column {name} has {rows} rows but the store "
                    f"holds {n} images; re-run the command that wrote it"
                )
        if checksums is None and name not in ("images", "labels"):
            continue
        skip = set(absent.get(name, []))
        sharded = layout.inner is not None and layout.index_bytes is not None
        listed: dict[str, set[str]] = {}  # chunk folder → its file names (one listing each)
        for key in layout.keys():
            if key in skip:
                continue
            problem = None
            if sharded:
                try:
                    problem = _shard_problem(path / name / key, layout)
                except FileNotFoundError:
                    problem = "missing"
            else:
                folder, _, leaf = key.rpartition("/")
                if folder not in listed:
                    with contextlib.suppress(OSError):
                        listed[folder] = set(os.listdir(path / name / folder))
                if leaf not in listed.get(folder, ()):
                    problem = "missing"
            if problem == "missing":
                raise DataError(
                    f"{path} is damaged: chunk file {name}/{key} is missing (an interrupted "
                    "copy?); copy the store again from its source or re-run the command that "
                    "wrote it"
                )
            if problem:
                raise DataError(
                    f"{path} is damaged: shard file {name}/{key} {problem}; copy the store "
                    "again from its source or re-run the command that wrote it"
                )


def _shard_problem(file: Path, layout: ArrayLayout) -> str | None:
    """Why a shard file is broken (truncated, index corrupt, a chunk outside it), or None;
    FileNotFoundError when it is missing."""
    need = int(layout.index_bytes or 0)
    with open(file, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size < need:
            return f"is truncated ({size} bytes, its index alone needs {need})"
        if layout.index_at_end:
            fh.seek(size - need)
        raw = fh.read(need)
    body = raw[:-4] if layout.index_crc else raw
    if layout.index_crc and _crc32c is not None:
        if _crc32c(body) != int.from_bytes(raw[-4:], "little"):
            return "is truncated or corrupt (the checksum of its index does not match)"
    index = np.frombuffer(body, dtype="<u8").reshape(-1, 2)
    offset, nbytes = index[:, 0], index[:, 1]
    used = ~((offset == _EMPTY) & (nbytes == _EMPTY))
    lo, hi = (0, size - need) if layout.index_at_end else (need, size)
    start, length = offset[used], nbytes[used]
    if np.any(start < lo) or np.any(start > hi) or np.any(length > hi - start):
        return "is truncated or corrupt (its index points past the end of the file)"
    return None


def _load_crc32c() -> Callable[[bytes], int] | None:
    try:
        import google_crc32c  # zarr's own crc32c dependency
    except ImportError:
        return None
    return google_crc32c.value


_crc32c = _load_crc32c()


def array_checksum(
    store: Path, name: str, layout: ArrayLayout | None = None, result: VerifyResult | None = None
) -> str:
    """SHA-256 of an array as stored: its shape, then each chunk (shard) file in grid order as
    key, size and bytes (an absent file as key and ``absent``). Cheap (no decoding) and stable:
    only a change of a chunk file changes it; a byte-exact copy keeps it."""
    layout = layout or read_layout(store, name)
    digest = hashlib.sha256(f"{list(layout.shape)};".encode())
    for key in layout.keys():
        try:
            with open(Path(store) / name / key, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                digest.update(f"{key}:{size};".encode())
                while block := fh.read(_READ_BYTES):
                    digest.update(block)
        except FileNotFoundError:
            digest.update(f"{key}:absent;".encode())
            continue
        if result is not None:
            result.bytes_read += size
    return digest.hexdigest()


def decode_all(array: zarr.Array, store: Path, name: str, result: VerifyResult) -> None:
    """Read and decode every value of an array in slabs of whole rows (the full check of a store
    without checksums); a failed read raises one DataError naming the rows and, where one file
    holds them, the file."""
    if not array.shape or array.shape[0] == 0:
        blocks: list[tuple[int, int]] = [(0, 0)] if not array.shape else []
    else:
        outer = tuple(array.shards or array.chunks)
        row_bytes = max(1, math.prod(outer[1:]) * max(array.dtype.itemsize, 8))
        rows = outer[0] * max(1, _SLAB_BYTES // (outer[0] * row_bytes))
        blocks = [(a, min(a + rows, array.shape[0])) for a in range(0, array.shape[0], rows)]
    for lo, hi in blocks:
        try:
            values = np.asarray(array[...] if not array.shape else array[lo:hi])
        except Exception as exc:
            step = tuple(array.shards or array.chunks)[0] if array.shape else 1
            for part in range(lo, hi, step):  # find the failing chunk (shard) to name its file
                try:
                    array[part : min(part + step, hi)]
                except Exception as part_exc:
                    where = _rows_where(array, part, min(part + step, hi))
                    raise read_error(store, name, part_exc, where) from None
            raise read_error(store, name, exc, _rows_where(array, lo, hi)) from None
        result.bytes_read += values.nbytes


def _rows_where(array: zarr.Array, lo: int, hi: int) -> str:
    """`` (rows lo–hi, file c/...)`` for a failed read of rows ``lo:hi``."""
    outer = tuple(array.shards or array.chunks)
    where = f" (rows {lo}–{hi - 1}"
    one_file = hi - lo <= outer[0] and all(
        o >= s for o, s in zip(outer[1:], array.shape[1:], strict=True)
    )
    if one_file:
        with contextlib.suppress(Exception):
            coords = (lo // outer[0], *[0] * (len(outer) - 1))
            where += f", file {array.metadata.encode_chunk_key(coords)}"
    return where + ")"


def _group_path(group: zarr.Group) -> Path | None:
    """The folder of a group in a local store (None for other stores)."""
    root = getattr(group.store, "root", None)
    if root is None:
        return None
    return Path(str(root)) / group.path if group.path else Path(str(root))


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
