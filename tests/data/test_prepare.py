"""Preparing a store: the --split-ratio option and the patient-level split assignment."""

from __future__ import annotations

import pytest

from edmcli.data.prepare_plan import assign_splits, parse_split_ratio
from edmcli.errors import DataError


def test_split_ratio_parsing_and_assignment():
    assert parse_split_ratio("8:1:1") == pytest.approx((0.8, 0.1, 0.1))
    assert parse_split_ratio("400,50,50") == pytest.approx((0.8, 0.1, 0.1))
    for bad in ("8:1", "a:b:c", "0:1:1", "-1:1:1"):
        with pytest.raises(DataError, match="split-ratio"):
            parse_split_ratio(bad)
    patients = [f"p{i:03d}" for i in range(500)]
    split = assign_splits(patients, (0.8, 0.1, 0.1), seed=0)
    counts = {s: list(split.values()).count(s) for s in ("train", "val", "test")}
    assert counts == {"train": 400, "val": 50, "test": 50}
    assert split == assign_splits(list(reversed(patients)), (0.8, 0.1, 0.1), seed=0)
    assert split != assign_splits(patients, (0.8, 0.1, 0.1), seed=1)
    small = assign_splits(["a", "b", "c"], (0.8, 0.1, 0.1), seed=0)
    assert sorted(small.values()) == ["test", "train", "val"]
