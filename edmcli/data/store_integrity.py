"""Integrity of a dataset store's files: the cheap checks of opening it, the per-array
checksums, the full read of :meth:`~edmcli.data.store.DatasetStore.verify`, and the one sentence
of a failed read.

Writers store every chunk, even one that holds only the fill value, so that a missing chunk file
always means damage. :func:`~edmcli.data.store_writer.mark_complete` records a SHA-256 per array
(:func:`array_checksum`, over its chunk files' bytes) and the chunk files that were absent at
completion (normally none) in ``attrs["echo_synth"]["checksums"]``. Opening a store checks
cheaply (:func:`check_store_files`) that every chunk file is there, that each shard file's index
is intact and points inside the file, and that the per-sample columns are as long as
``images``; :meth:`~edmcli.data.store.DatasetStore.verify` reads everything and compares the
checksums.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from edmcli.data.store_format import BOOKKEEPING_ARRAYS, CHECKSUMS_KEY, CHUNK_FOLDER
from edmcli.errors import DataError

CHECKSUM_ALGORITHM = "sha256 over the shape, then each chunk file in grid order: key, size, bytes"
_SHARDING = "sharding_indexed"
_EMPTY = 2**64 - 1  # a shard index entry (offset, nbytes) of an inner chunk never written
_SLAB_BYTES = 4 << 20  # rows decoded at once by verify of a store without checksums
_READ_BYTES = 1 << 20  # block size of checksum reads


@dataclass
class VerifyResult:
    """What :meth:`~edmcli.data.store.DatasetStore.verify` checked."""

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


def read_error(store: Path, name: str, exc: BaseException, where: str = "") -> DataError:
    """The one sentence for a failed read of array ``name`` of ``store``."""
    reason = " ".join(str(exc).split())[:120] or type(exc).__name__
    settle_abandoned_reads()
    return DataError(
        f"{store} is damaged: reading {name}{where} failed ({reason}); copy it again from its "
        "source or re-run the command that wrote it"
    )


def settle_abandoned_reads(timeout: float = 10.0) -> None:
    """Let the reads that zarr ran beside a failed one finish, and collect their results.

    zarr decodes a selection's chunks concurrently on its own event loop; when one fails the
    others are left pending, and at exit the interpreter printed 30–110 lines of asyncio
    "Task was destroyed but it is pending" / "Task exception was never retrieved" after the
    one-line error (issue 25). Waiting for them here (bounded) leaves nothing to print."""
    import asyncio

    try:
        from zarr.core.sync import sync
    except ImportError:  # another zarr layout: nothing to settle
        return

    async def settle() -> None:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
        for task in tasks:
            if task.done() and not task.cancelled():
                task.exception()  # retrieved: no "never retrieved" message at exit

    try:
        sync(settle())
    except Exception:  # the error being reported matters more than the noise
        pass


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
        return self.separator.join([CHUNK_FOLDER, *parts])


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
