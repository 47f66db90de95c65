"""A PyTorch ``Dataset`` over a dataset store, used by every training and evaluation stage."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from edmcli.data.labels import VIEWS
from edmcli.data.store import DatasetStore
from edmcli.errors import DataError

PHASES = ("ED", "ES")
"""Cardiac phases in code order (``phase`` of an item: 0 ED, 1 ES, -1 unknown)."""


class EchoDataset(Dataset):
    """Samples of a store, optionally restricted to splits and views.

    Each item is a dict: ``image`` float32 (1, H, W) in [0, 1], ``labels`` int64 (H, W) (ids of
    :mod:`edmcli.data.labels`), ``index`` (row in the store), ``view`` (0 A2C, 1 A4C, -1 unknown),
    ``phase`` (0 ED, 1 ES, -1 unknown). ``transform``, if given, maps that dict to a dict.

    The Zarr group is opened lazily in each DataLoader worker (handles are not pickled); each
    read touches one inner chunk (one sample). ``in_memory=True`` loads the selection once, for
    small stores and many epochs.
    """

    def __init__(
        self,
        store: str | Path,
        splits: str | Sequence[str] | None = None,
        views: str | Sequence[str] | None = None,
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        in_memory: bool = False,
    ):
        self.path = Path(store)
        reader = DatasetStore(self.path)
        self.indices = reader.indices(splits, views)
        if len(self.indices) == 0:
            raise DataError(
                f"{self.path} has no samples in split(s) {splits or 'any'} and view(s) "
                f"{views or 'any'}"
            )
        self.image_size = reader.image_size
        self.info = reader.info
        self.patients = reader.column("patient")[self.indices]
        self.views = codes(reader.column("view")[self.indices], VIEWS)
        self.phases = codes(reader.column("phase")[self.indices], PHASES)
        self.transform = transform
        self._reader: DatasetStore | None = None
        self._images: np.ndarray | None = None
        self._labels: np.ndarray | None = None
        if in_memory:
            order = np.argsort(self.indices)
            images = reader.images.get_orthogonal_selection((self.indices[order],))
            labels = reader.labels.get_orthogonal_selection((self.indices[order],))
            self._images = np.empty_like(images)
            self._labels = np.empty_like(labels)
            self._images[order], self._labels[order] = images, labels

    def __len__(self) -> int:
        return len(self.indices)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_reader"] = None
        return state

    def _read(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if self._images is not None:
            return self._images[i], self._labels[i]
        if self._reader is None:
            self._reader = DatasetStore(self.path)
        row = int(self.indices[i])
        return self._reader.images[row], self._reader.labels[row]

    def __getitem__(self, i: int) -> dict[str, Any]:
        image, labels = self._read(i)
        item = {
            "image": torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0),
            "labels": torch.from_numpy(np.asarray(labels, dtype=np.int64)),
            "index": int(self.indices[i]),
            "view": int(self.views[i]),
            "phase": int(self.phases[i]),
        }
        return self.transform(item) if self.transform else item


def codes(values: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """int64 position of each value in ``names`` (e.g. a store's ``view`` column and
    :data:`~edmcli.data.labels.VIEWS`), -1 where it is not one of them."""
    lookup = {name: k for k, name in enumerate(names)}
    return np.array([lookup.get(str(v), -1) for v in values], dtype=np.int64)
