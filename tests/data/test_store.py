"""The dataset store as written and read: plain Zarr round trip, the reader's columns, selections
and summary, and the stores it refuses to open."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from edmcli.data.store import DatasetStore
from edmcli.data.store_format import SampleMeta, meta_columns
from edmcli.data.store_writer import create_store, mark_complete, write_block
from edmcli.errors import DataError


def test_phantom_store_round_trip_with_plain_zarr(phantom_store):
    group = zarr.open_group(str(phantom_store), mode="r")
    info = group.attrs["echo_synth"]
    assert info["complete"] is True and info["format"] == "echo-synth-dataset"
    assert group["images"].shape == (48, 1, 32, 32) and group["images"].dtype == np.uint8
    assert group["labels"].shape == (48, 32, 32)
    assert set(np.asarray(group["view"][:].tolist())) == {"A2C", "A4C"}
    assert info["label_names"]["4"] == "sector"
    # the store holds exactly what the generator makes
    from edmcli.data.phantom import generate_patient

    first = generate_patient(seed=3, patient=0, size=32)
    np.testing.assert_array_equal(group["images"][0, 0], first[0]["image"])
    np.testing.assert_array_equal(group["labels"][3], first[3]["labels"])


def test_reader_columns_indices_and_summary(phantom_store):
    store = DatasetStore(phantom_store)
    assert len(store) == 48 and store.image_size == (32, 32)
    train = store.indices("train")
    assert len(train) == 24
    assert set(store.column("split")[train]) == {"train"}
    a4c_test = store.indices("test", "A4C")
    assert set(store.column("view")[a4c_test]) == {"A4C"}
    # patient-level split: no patient in two splits
    splits = {s: set(store.patients(s)) for s in ("train", "val", "test")}
    assert not (splits["train"] & splits["test"]) and not (splits["val"] & splits["test"])
    summary = store.summary()
    assert summary["splits"]["train"]["A2C/ED"] == 6
    assert sum(summary["label_fraction"].values()) == pytest.approx(1, abs=1e-3)
    assert summary["bytes_on_disk"] > 0
    assert summary["provenance"]["source"] == "phantom"
    spacing = store.column("spacing")
    assert spacing.shape == (48, 2) and np.all(spacing > 0)


def test_incomplete_store_is_refused(tmp_path):
    group = create_store(tmp_path / "s.zarr", 4, 8, 8, {})
    write_block(
        group, 0, np.zeros((2, 8, 8)), np.zeros((2, 8, 8)),
        meta_columns([SampleMeta("p", "A2C", "ED", "train")] * 2),
    )  # fmt: skip
    with pytest.raises(DataError, match="incomplete"):
        DatasetStore(tmp_path / "s.zarr")
    mark_complete(group)
    assert len(DatasetStore(tmp_path / "s.zarr")) == 4


def test_non_stores_are_refused(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        DatasetStore(tmp_path / "missing.zarr")
    with pytest.raises(DataError, match="not a dataset store"):
        DatasetStore(tmp_path)
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w").attrs["x"] = 1
    with pytest.raises(DataError, match="not an echo-synth dataset store"):
        DatasetStore(tmp_path / "other.zarr")
    (tmp_path / "broken.zarr").mkdir()
    (tmp_path / "broken.zarr" / "zarr.json").write_text("{not json")
    with pytest.raises(DataError, match="not a readable Zarr store"):
        DatasetStore(tmp_path / "broken.zarr")
