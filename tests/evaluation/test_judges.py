"""The real-trained networks as judges: a store whose images encode their own label maps, read
back by a "segmenter" that decodes intensities, has label fidelity 1; misplaced structures
lower it; a classifier that always says A4C is right on the A4C share."""

from __future__ import annotations

import numpy as np
import pytest
from fidelity_fakes import AlwaysA4C, label_copy_store, reference_nets

from edmcli.data.store import DatasetStore
from edmcli.evaluation.image_sets import load_synthetic
from edmcli.evaluation.judges import classifier_outputs, label_fidelity, run_networks, view_accuracy


def test_a_store_that_copies_its_label_maps_has_label_fidelity_one(phantom_store, tmp_path):
    store = label_copy_store(phantom_store, tmp_path / "copy.zarr")
    data = load_synthetic([str(store)], None, seed=0)
    assert len(data.images) == data.total == 2 * len(DatasetStore(phantom_store).indices("train"))
    out = run_networks(reference_nets(32), data.images)
    assert out.features["segmenter"].shape == (len(data.images), 1)  # pooled (B, 1, 8, 8)
    fidelity = label_fidelity(out.seg_pred, data.labels, data.views)
    assert set(fidelity) == {"all", "A2C", "A4C"}
    for entry in fidelity.values():
        assert entry["dice_mean"] == 1.0 and set(entry["dice"].values()) == {1.0}
        assert set(entry["hd95_px"].values()) == {0.0}
        assert set(entry["hd95_failures"].values()) == {0}
    assert fidelity["A2C"]["n"] + fidelity["A4C"]["n"] == fidelity["all"]["n"]


def test_misplaced_structures_lower_label_fidelity(phantom_store, tmp_path):
    scores = []
    for shift in (0, 1, 3):
        store = label_copy_store(phantom_store, tmp_path / f"s{shift}.zarr", shift=shift)
        data = load_synthetic([str(store)], None, seed=0)
        out = run_networks(reference_nets(32), data.images)
        scores.append(label_fidelity(out.seg_pred, data.labels, data.views)["all"])
    dice = [s["dice_mean"] for s in scores]
    hd = [s["hd95_px"]["lv_endocardium"] for s in scores]
    assert dice[0] == 1.0 > dice[1] > dice[2]
    assert hd[0] == 0.0 < hd[1] < hd[2]
    # a 3-pixel shift moves the LV's boundary by 3 pixels: its HD95 cannot exceed that much
    assert hd[2] <= 3.0 + 1e-9


def test_classifier_accuracy_on_synthetic_images_by_hand(phantom_store, tmp_path):
    store = label_copy_store(phantom_store, tmp_path / "copy.zarr")
    data = load_synthetic([str(store)], None, seed=0)
    views, features = classifier_outputs(AlwaysA4C(), data.images, 32)
    assert features.shape == (len(data.images), 1)  # the hook pools (B, 1, 2, 2) over space
    acc = view_accuracy(views, data.views)
    share_a4c = float((data.views == 1).mean())  # a classifier that always says A4C
    assert acc["all"]["accuracy"] == pytest.approx(share_a4c)
    assert acc["A4C"]["accuracy"] == 1.0 and acc["A2C"]["accuracy"] == 0.0
    assert view_accuracy(views, np.full(len(views), -1)) is None
