"""The on-disk format of a dataset store: one Zarr v3 group per dataset, real or synthetic
(layout in README.md), its names and constants, its per-sample rows, its JSON-plain attrs.

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

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

FORMAT_NAME = "echo-synth-dataset"
FORMAT_VERSION = 1
ATTRS_KEY = "echo_synth"
STRING_FIELDS = ("patient", "view", "phase", "split", "quality")
UNKNOWN = "unknown"
CHECKSUMS_KEY = "checksums"  # attrs["echo_synth"]["checksums"]: None until mark_complete
BOOKKEEPING_ARRAYS = ("shard_done",)  # writer state (sample's done flags), not per-sample
CARD_FILE = "DATASET.md"  # the dataset card (edmcli.data.card), in the store's folder
VERDICTS_FILE = "card.json"  # the verdicts the card shows
CHUNK_FOLDER = "c"  # Zarr v3 default chunk key encoding: ARRAY/c/0/0/...


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
