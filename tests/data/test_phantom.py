from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy import ndimage, stats

from edmcli.data.labels import LA, LV, MYO, OUTSIDE, SECTOR
from edmcli.data.phantom import (
    PERSISTENCE_FRAMES,
    generate_patient,
    nakagami_mean,
    nearest_centroid_view_accuracy,
    render,
    sample_anatomy,
    speckle_envelope,
)


def _over_local_mean(img, region, w):
    """Intensities of ``region``'s core (eroded by w // 2) divided by their local mean over a
    w × w window of the region: speckle with the slow echogenicity changes taken out."""
    local = ndimage.uniform_filter(img * region, w) / np.maximum(
        ndimage.uniform_filter(region.astype(float), w), 1e-6
    )
    core = ndimage.binary_erosion(region, iterations=w // 2)
    return img[core] / local[core]


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


def test_cavities_are_grey_and_the_wall_only_faintly_brighter():
    """Calibrated to real echoes: blood haze makes cavities grey, not black, and the myocardium is
    brighter than the cavity, but by a margin that varies and that speckle often swamps."""
    records = [r for p in range(6) for r in generate_patient(seed=0, patient=p, size=64)]
    img = np.stack([r["image"] for r in records]).astype(float)
    lab = np.stack([r["labels"] for r in records])
    lv, myo, sector = (img[lab == k].mean() for k in (LV, MYO, SECTOR))
    assert 0.5 * sector < lv < sector  # old look: LV 0.2 × sector
    assert lv < myo < 2 * lv  # old look: myocardium 9 × the cavity
    per_image = [(i[m == MYO].mean() - i[m == LV].mean()) for i, m in zip(img, lab, strict=True)]
    assert np.std(per_image) > 0.3 * np.mean(per_image)  # the wall's contrast varies


def test_views_are_distinguishable_but_not_trivially():
    """The right heart of A4C is faint: a nearest-centroid rule on raw pixels separates the views
    of held-out patients well above chance but not perfectly (real CAMUS: 0.90)."""
    records = [(p, r) for p in range(16) for r in generate_patient(seed=9, patient=p, size=64)]
    images = np.stack([r["image"] for _, r in records])
    views = [r["view"] for _, r in records]
    accuracy = nearest_centroid_view_accuracy(images, views, [p for p, _ in records], folds=4)
    assert 0.7 <= accuracy < 0.97  # old look: 1.0


def test_acquisition_settings_do_not_move_the_labels():
    """Label geometry draws first from each stream: changing every image-formation setting of an
    anatomy leaves the label map (and only it) unchanged."""
    anatomy = sample_anatomy(np.random.default_rng(4))
    other = dataclasses.replace(
        anatomy, tissue_echo=0.2, wall_contrast=2.0, gain=0.7, blood_haze=0.1, near_haze=0.0,
        reverb_floor=0.0, side_lobe=0.0, tgc_slope=0.5, beam_far_mm=1.0, smoke=0.0,
    )  # fmt: skip
    for view in ("A2C", "A4C"):
        a = render(anatomy, view, "ES", 64, np.random.default_rng(1))
        b = render(other, view, "ES", 64, np.random.default_rng(1))
        np.testing.assert_array_equal(a[1], b[1])
        assert a[2] == b[2] and not np.array_equal(a[0], b[0])


@pytest.fixture
def acoustics_only(monkeypatch):
    """The image formation before the resize to the output size (no resize blur or grain,
    speckle at its acoustic size): what the speckle-statistics tests examine."""
    from edmcli.data import phantom

    for name, value in {"SPECKLE_SCALE": 1.0, "SPECKLE_SCALE_STEP": 0.0, "DISPLAY_BLUR": 0.0,
                        "DISPLAY_BLUR_STEP": 0.0, "DISPLAY_GRAIN": 0.0}.items():  # fmt: skip
        monkeypatch.setattr(phantom, name, value)


@pytest.mark.usefixtures("acoustics_only")
def test_blood_speckle_is_nakagami_from_frame_persistence():
    """Without clutter, blood is the mean intensity of PERSISTENCE_FRAMES independent speckle
    patterns: its envelope (over the local mean) is Nakagami with m = that number, SNR
    μ/√(1 − μ²) with μ = Γ(m + ½)/(Γ(m)√m) (3.40 for m = 3), smoother than tissue's Rayleigh."""
    m = PERSISTENCE_FRAMES
    mu = nakagami_mean(m)
    snr = mu / np.sqrt(1 - mu**2)
    assert nakagami_mean(1) == pytest.approx(np.sqrt(np.pi) / 2)
    for patient in range(2):
        anatomy = sample_anatomy(np.random.default_rng(patient))
        quiet = dataclasses.replace(anatomy, near_haze=0.0, reverb_floor=0.0, side_lobe=0.0)
        img, lab, _ = render(quiet, "A2C", "ED", 256, np.random.default_rng(10 + patient))
        cavity = ndimage.binary_erosion(lab == LV, iterations=6)
        v = _over_local_mean(img, cavity, 15)
        assert v.size > 1000  # pixels of the core
        assert v.mean() / v.std() == pytest.approx(snr, rel=0.1)
        scale = np.sqrt(np.mean(v**2))
        ks_nakagami = stats.kstest(v, stats.nakagami(m, scale=scale).cdf).statistic
        ks_rayleigh = stats.kstest(v, stats.rayleigh(scale=scale / np.sqrt(2)).cdf).statistic
        assert ks_nakagami < 0.04 < 0.15 < ks_rayleigh


def test_speckle_field_is_rayleigh():
    z = speckle_envelope(np.random.default_rng(0), 256, 256)
    envelope = np.hypot(z[0], z[1]).ravel()
    scale = np.sqrt(np.mean(envelope**2) / 2)
    assert stats.kstest(envelope, stats.rayleigh(scale=scale).cdf).statistic < 0.02
    assert envelope.mean() / envelope.std() == pytest.approx(1.913, abs=0.05)


@pytest.mark.usefixtures("acoustics_only")
def test_image_speckle_inside_tissue_is_roughly_rayleigh():
    """Tissue intensities divided by their local mean follow a unit-mean Rayleigh law (SNR 1.91),
    clearly better than a Gaussian of the same mean and spread."""
    for patient in range(2):
        r = generate_patient(seed=1, patient=patient, size=256)[0]
        img, lab = r["image"].astype(float), r["labels"]
        tissue = ndimage.binary_erosion(lab == SECTOR, iterations=8)
        v = _over_local_mean(img, tissue, 17)
        assert v.size > 2000  # pixels of the core
        assert 1.7 < v.mean() / v.std() < 2.3
        ks_rayleigh = stats.kstest(v / v.mean(), stats.rayleigh(scale=np.sqrt(2 / np.pi)).cdf)
        ks_normal = stats.kstest((v - v.mean()) / v.std(), "norm")
        assert ks_rayleigh.statistic < 0.04
        assert ks_rayleigh.statistic < ks_normal.statistic


def test_size_too_small_is_refused():
    with pytest.raises(ValueError, match="at least 16"):
        generate_patient(0, 0, 8)
