"""The fast path of the paired augmentation gives MONAI's own outputs, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import get_track_meta, set_track_meta

from edmcli.data.augment import AugmentConfig, PairedAugment


def _item(seed: int, size: int = 32) -> dict:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 5, (size, size), generator=g)
    image = torch.rand(1, size, size, generator=g) * (labels != 0)
    return {"image": image, "labels": labels, "index": seed}


def _monai_reference(augment: PairedAugment, item: dict, rng: np.random.Generator) -> dict:
    """What PairedAugment computed before its fast path: MONAI's set_random_state (new
    RandomStates) and metadata tracking on."""
    augment.transform.set_random_state(seed=int(rng.integers(0, 2**31 - 1)))
    out = augment.transform({"image": item["image"], "labels": item["labels"][None].float()})
    labels = torch.as_tensor(out["labels"]).as_subclass(torch.Tensor).round().long()[0]
    image = torch.as_tensor(out["image"]).as_subclass(torch.Tensor).float().clamp(0.0, 1.0)
    return {"image": image * (labels != 0), "labels": labels}


@pytest.mark.parametrize("intensity", [True, False])
def test_fast_reseeding_matches_monai_set_random_state(intensity):
    config = AugmentConfig(affine_prob=0.7, intensity=intensity, intensity_prob=0.6)
    fast, reference = PairedAugment(config, (32, 32)), PairedAugment(config, (32, 32))
    changed = 0
    for k in range(60):
        item = _item(k)
        seed = [0, 3, k, 0xA06]
        got = fast(item, np.random.default_rng(seed))
        want = _monai_reference(reference, item, np.random.default_rng(seed))
        assert torch.equal(got["image"], want["image"]), k
        assert torch.equal(got["labels"], want["labels"]), k
        assert type(got["image"]) is torch.Tensor and type(got["labels"]) is torch.Tensor
        changed += not torch.equal(got["image"], item["image"])
    assert changed > 20  # the transforms did act


def test_same_seed_same_output_whatever_came_before():
    augment = PairedAugment(AugmentConfig(), (32, 32))
    item = _item(1)
    first = augment(item, np.random.default_rng(7))
    for k in range(5):  # other items in between leave no trace
        augment(_item(k), np.random.default_rng(100 + k))
    again = augment(item, np.random.default_rng(7))
    assert torch.equal(first["image"], again["image"])
    assert torch.equal(first["labels"], again["labels"])


def test_metadata_tracking_is_restored():
    augment = PairedAugment(AugmentConfig(), (32, 32))
    assert get_track_meta()
    augment(_item(0), np.random.default_rng(0))
    assert get_track_meta()
    set_track_meta(False)
    try:
        augment(_item(0), np.random.default_rng(0))
        assert not get_track_meta()
    finally:
        set_track_meta(True)
