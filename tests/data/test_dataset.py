from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from edmcli.data.dataset import EchoDataset
from edmcli.data.store import DatasetStore
from edmcli.errors import DataError


def test_items_match_the_store(phantom_store):
    ds = EchoDataset(phantom_store, splits="train")
    store = DatasetStore(phantom_store)
    assert len(ds) == 24
    item = ds[3]
    row = item["index"]
    assert item["image"].shape == (1, 32, 32) and item["image"].dtype == torch.float32
    assert 0 <= item["image"].min() and item["image"].max() <= 1
    np.testing.assert_array_equal(item["image"][0].numpy() * 255, store.images[row, 0])
    np.testing.assert_array_equal(item["labels"].numpy(), store.labels[row])
    assert item["view"] == ("A2C", "A4C").index(store.column("view")[row])


def test_workers_and_in_memory_give_the_same_batches(phantom_store):
    lazy = EchoDataset(phantom_store, splits=["val", "test"], views="A4C")
    memory = EchoDataset(phantom_store, splits=["val", "test"], views="A4C", in_memory=True)
    assert len(lazy) == 12 and set(lazy.views.tolist()) == {1}
    batches = list(DataLoader(lazy, batch_size=5, num_workers=2))
    reference = list(DataLoader(memory, batch_size=5, num_workers=0))
    for a, b in zip(batches, reference, strict=True):
        torch.testing.assert_close(a["image"], b["image"])
        torch.testing.assert_close(a["labels"], b["labels"])


def test_transform_and_empty_selection(phantom_store):
    ds = EchoDataset(phantom_store, transform=lambda d: {**d, "image": d["image"] * 0})
    assert ds[0]["image"].sum() == 0
    with pytest.raises(DataError, match="no samples in split"):
        EchoDataset(phantom_store, splits="holdout")
