"""The memorisation statistic: exact distances, copies flagged, new patients at the percentile."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edmcli.data.prepare import prepare_phantom
from edmcli.data.store import DatasetStore
from edmcli.errors import EchoSynthError
from edmcli.evaluation.image_sets import ImageSet
from edmcli.evaluation.memorisation import memorisation_check, real_subset
from edmcli.runs.memorisation import (
    MemorisationReference,
    TrainingImages,
    calibrate,
    nearest,
    pixel_codes,
    relative_distance,
)


@pytest.fixture(scope="module")
def many_patients(tmp_path_factory):
    """60 phantom patients at 32²: 20 train, 40 test (two halves of 80 images)."""
    out = tmp_path_factory.mktemp("mem") / "p60.zarr"
    prepare_phantom(out, n_patients=60, size=32, seed=5, split_ratio=(1 / 3, 0.0, 2 / 3))
    return out


def _training(store: DatasetStore, rows: np.ndarray) -> TrainingImages:
    subset = real_subset(store.path, rows)
    return TrainingImages(subset.images, subset.labels, subset.patients, [])


def test_nearest_matches_a_brute_force_masked_rms():
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(7, 1, 6, 5, generator=gen)
    labels = (torch.rand(7, 6, 5, generator=gen) > 0.3).to(torch.uint8) * 4
    codes, masks = pixel_codes(images, labels)
    train, _ = pixel_codes(torch.rand(9, 1, 6, 5, generator=gen),
                           torch.full((9, 6, 5), 4, dtype=torch.uint8))  # fmt: skip
    dist, index = nearest(codes, train, masks, k=3, block=2)
    brute = torch.stack([
        (((codes[i] - train) ** 2 * masks[i]).sum(1) / masks[i].sum()).sqrt() for i in range(7)
    ]).double()  # fmt: skip
    expected, rows = brute.sort(1)
    np.testing.assert_allclose(dist, expected[:, :3].numpy(), rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(index, rows[:, :3].numpy())
    # each code: mean 0 and unit standard deviation inside its sector, 0 outside
    inside = masks.bool()
    for c, m in zip(codes, inside, strict=True):
        assert abs(float(c[m].mean())) < 1e-5 and abs(float(c[m].std(unbiased=False)) - 1) < 1e-4
        assert torch.all(c[~m] == 0)


def test_relative_distance_and_calibration():
    d = np.array([[0.0, 1.0, 1.0], [2.0, 2.0, 2.0], [1.0, 2.0, 3.0]])
    np.testing.assert_allclose(relative_distance(d), [0.0, 1.0, 0.5])
    thresholds = calibrate(np.arange(101, dtype=float), (1, 5))
    assert thresholds == {"1.0": 1.0, "5.0": 5.0}
    with pytest.raises(EchoSynthError, match="at least 20 real test images"):
        calibrate(np.arange(5.0))


def test_copies_are_flagged_and_new_patients_sit_at_the_percentile(many_patients, tmp_path):
    store = DatasetStore(many_patients)
    train_rows, test_rows = store.indices("train"), store.indices("test")
    test_patients = np.array(store.patients("test"))
    half = np.isin(store.column("patient")[test_rows], test_patients[::2])
    reference = real_subset(many_patients, test_rows[half])
    new = real_subset(many_patients, test_rows[~half])
    training = _training(store, train_rows)
    # images of new patients: flagged at about the chosen percentile
    against = MemorisationReference.build(training, reference)
    entry = memorisation_check(new, against, percentiles=(5, 50))
    flagged = entry["spaces"]["pixel"]["flagged"]
    assert flagged["5.0"]["all"] <= 0.15
    assert 0.3 <= flagged["50.0"]["all"] <= 0.7
    # copies of training images (with the view recorded): every one flagged, in every view
    copies = real_subset(many_patients, train_rows)
    entry = memorisation_check(copies, against, grid=tmp_path / "pairs.png")
    pixel = entry["spaces"]["pixel"]
    assert pixel["flagged"]["1.0"] == {"all": 1.0, "A2C": 1.0, "A4C": 1.0}
    assert pixel["nearest_distance"]["flagged"]["1.0"]["all"] == 1.0
    assert pixel["nearest_is_own_source_patient"] == 1.0
    assert all(c["relative_distance"] == 0.0 for c in entry["closest"])
    assert (tmp_path / "pairs.png").is_file() and entry["grid"] == str(tmp_path / "pairs.png")
    # a feature space: copies of training features flagged too
    gen = np.random.default_rng(0)
    train_f = gen.normal(size=(len(training), 8))
    ref_f = gen.normal(size=(len(reference.images), 8))
    against = MemorisationReference.build(training, reference, {"segmenter": (train_f, ref_f)})
    entry = memorisation_check(copies, against, features={"segmenter": train_f.copy()})
    assert entry["spaces"]["segmenter"]["flagged"]["5.0"]["all"] == 1.0


def test_a_smoother_image_is_not_flagged_by_the_relative_distance(many_patients):
    """The reason for the relative statistic: blurred images of new patients sit closer to every
    training image (their raw nearest distance drops), but not closer to one of them."""
    store = DatasetStore(many_patients)
    test_rows = store.indices("test")
    test_patients = np.array(store.patients("test"))
    half = np.isin(store.column("patient")[test_rows], test_patients[::2])
    reference = real_subset(many_patients, test_rows[half])
    new = real_subset(many_patients, test_rows[~half])
    blurred = torch.nn.functional.avg_pool2d(new.images, 5, stride=1, padding=2)
    smooth = ImageSet(blurred, new.labels, new.views, new.patients, None, len(new.images))
    against = MemorisationReference.build(_training(store, store.indices("train")), reference)
    entry = memorisation_check(smooth, against, percentiles=(5,))
    pixel = entry["spaces"]["pixel"]
    assert pixel["flagged"]["5.0"]["all"] <= 0.2
    assert pixel["nearest_distance"]["flagged"]["5.0"]["all"] >= 0.3  # the raw one is fooled
    assert (
        pixel["nearest_distance"]["median"]["synthetic"]
        < (pixel["nearest_distance"]["median"]["reference"])
    )
