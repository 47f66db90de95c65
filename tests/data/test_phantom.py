from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage, stats

from edmcli.data.labels import LA, LV, MYO, OUTSIDE, SECTOR
from edmcli.data.phantom import generate_patient, speckle_envelope


def test_deterministic_per_seed_and_patient():
    a = generate_patient(seed=5, patient=2, size=64)
    b = generate_patient(seed=5, patient=2, size=64)
    c = generate_patient(seed=6, patient=2, size=64)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["labels"], y["labels"])
    assert not np.array_equal(a[0]["image"], c[0]["image"])


def test_four_images_with_camus_label_set():
    records = generate_patient(seed=0, patient=0, size=64)
    assert [(r["view"], r["phase"]) for r in records] == [
        ("A2C", "ED"), ("A2C", "ES"), ("A4C", "ED"), ("A4C", "ES"),
    ]  # fmt: skip
    for r in records:
        assert r["image"].dtype == np.uint8 and r["image"].shape == (64, 64)
        assert set(np.unique(r["labels"])) == {OUTSIDE, LV, MYO, LA, SECTOR}
        assert np.all(r["image"][r["labels"] == OUTSIDE] == 0)  # zero outside the sector
        assert r["labels"][0, 0] == OUTSIDE and r["labels"][-1, 0] == OUTSIDE
        # apex of the fan at the top centre
        assert r["labels"][1, 32] != OUTSIDE and r["labels"][1, 5] == OUTSIDE


def test_systole_has_smaller_lv_and_larger_la():
    for patient in range(5):
        a2c_ed, a2c_es, a4c_ed, a4c_es = generate_patient(seed=1, patient=patient, size=96)
        for ed, es in ((a2c_ed, a2c_es), (a4c_ed, a4c_es)):
            assert (es["labels"] == LV).sum() < 0.9 * (ed["labels"] == LV).sum()
            assert (es["labels"] == LA).sum() > (ed["labels"] == LA).sum()


def test_myocardium_surrounds_the_cavity_but_is_open_at_the_mitral_plane():
    labels = generate_patient(seed=2, patient=0, size=128)[0]["labels"]
    cavity = labels == LV
    ring = ndimage.binary_dilation(cavity, iterations=2) & ~cavity
    touching = labels[ring]
    assert (touching == MYO).mean() > 0.6  # mostly wall around the cavity
    assert (touching == LA).sum() > 0  # but the LA opens onto it


def test_patients_vary():
    sizes = [(generate_patient(0, p, 64)[0]["labels"] == LV).sum() for p in range(6)]
    assert len(set(sizes)) == 6


def test_blood_is_dark_and_myocardium_bright():
    r = generate_patient(seed=0, patient=1, size=128)[0]
    img, lab = r["image"].astype(float), r["labels"]
    assert img[lab == LV].mean() < 0.4 * img[lab == SECTOR].mean()
    assert img[lab == MYO].mean() > img[lab == SECTOR].mean()


def test_views_are_distinguishable_from_the_image():
    """A4C shows the right heart (dark pools) left of the septum, labelled as sector; a nearest-
    centroid rule on the dark fraction of sector pixels separates the views on held-out patients."""

    def dark_sector_fraction(record):
        lab = record["labels"]
        img = ndimage.gaussian_filter(record["image"].astype(float), 1.5)  # average out speckle
        sector = img[lab == SECTOR]
        return float((sector < 0.35 * np.median(sector)).mean())

    def features(patients):
        out = {"A2C": [], "A4C": []}
        for p in patients:
            for r in generate_patient(seed=9, patient=p, size=64):
                out[r["view"]].append(dark_sector_fraction(r))
        return out

    train, test = features(range(0, 8)), features(range(8, 16))
    centroid = {v: np.mean(x) for v, x in train.items()}
    correct = total = 0
    for view, values in test.items():
        for x in values:
            guess = min(centroid, key=lambda v: abs(centroid[v] - x))
            correct += guess == view
            total += 1
    assert correct / total >= 0.95


def test_speckle_field_is_rayleigh():
    z = speckle_envelope(np.random.default_rng(0), 256, 256)
    envelope = np.hypot(z[0], z[1]).ravel()
    scale = np.sqrt(np.mean(envelope**2) / 2)
    assert stats.kstest(envelope, stats.rayleigh(scale=scale).cdf).statistic < 0.02
    assert envelope.mean() / envelope.std() == pytest.approx(1.913, abs=0.05)


def test_image_speckle_inside_tissue_is_roughly_rayleigh():
    """Tissue intensities divided by their local mean follow a unit-mean Rayleigh law (SNR 1.91),
    clearly better than a Gaussian of the same mean and spread."""
    for patient in range(2):
        r = generate_patient(seed=1, patient=patient, size=256)[0]
        img, lab = r["image"].astype(float), r["labels"]
        tissue = ndimage.binary_erosion(lab == SECTOR, iterations=8)
        w = 17
        local = ndimage.uniform_filter(img * tissue, w) / np.maximum(
            ndimage.uniform_filter(tissue.astype(float), w), 1e-6
        )
        core = ndimage.binary_erosion(tissue, iterations=w // 2)
        v = img[core] / local[core]
        assert core.sum() > 2000
        assert 1.7 < v.mean() / v.std() < 2.3
        ks_rayleigh = stats.kstest(v / v.mean(), stats.rayleigh(scale=np.sqrt(2 / np.pi)).cdf)
        ks_normal = stats.kstest((v - v.mean()) / v.std(), "norm")
        assert ks_rayleigh.statistic < 0.04
        assert ks_rayleigh.statistic < ks_normal.statistic


def test_size_too_small_is_refused():
    with pytest.raises(ValueError, match="at least 16"):
        generate_patient(0, 0, 8)
