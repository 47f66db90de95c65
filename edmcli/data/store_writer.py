"""Writing a dataset store: create it empty and incomplete, fill it block by block, and mark it
complete with its checksums (:mod:`edmcli.data.store_integrity`)."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from edmcli.data.labels import LABEL_NAMES
from edmcli.data.store_format import (
    ATTRS_KEY,
    CHECKSUMS_KEY,
    FORMAT_NAME,
    FORMAT_VERSION,
    STRING_FIELDS,
    code_version,
    jsonable,
    samples_per_shard,
)
from edmcli.data.store_integrity import CHECKSUM_ALGORITHM, array_checksum, read_layout
from edmcli.errors import DataError


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


def _group_path(group: zarr.Group) -> Path | None:
    """The folder of a group in a local store (None for other stores)."""
    root = getattr(group.store, "root", None)
    if root is None:
        return None
    return Path(str(root)) / group.path if group.path else Path(str(root))
