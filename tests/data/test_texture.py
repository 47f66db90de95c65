"""The texture statistics (HF, R3, AC1) on hand-made images with known answers."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from edmcli.data.texture import mean_texture, texture_statistics

N = 128


def _noise(seed=0, n=N):
    return np.random.default_rng(seed).standard_normal((n, n)) * 20 + 100


def test_white_noise_spreads_its_power_over_every_frequency():
    """White noise: HF is the share of non-DC frequency bins beyond radius H/4 (≈ 1 − π/16),
    R3 = √(8/9) (the pixel minus a mean of 9 that holds it), AC1 = −56/2352 (the 7×7 means of
    neighbours share 42 of 49 pixels)."""
    ky = np.fft.fftfreq(N) * N
    radius = np.hypot(ky[:, None], ky[None, :])
    share = (radius > N / 4).sum() / (radius > 0).sum()
    labels = np.full((N, N), 4)
    stats = mean_texture(np.stack([_noise(s) for s in range(8)]), np.stack([labels] * 8))
    assert stats.hf == pytest.approx(share, abs=0.01)
    assert stats.r3 == pytest.approx(np.sqrt(8 / 9), abs=0.01)
    assert stats.ac1 == pytest.approx(-56 / 2352, abs=0.01)


def test_wide_grain_is_low_frequency_and_correlated():
    image = ndimage.gaussian_filter(_noise(), 3)
    stats = texture_statistics(image, np.full((N, N), 4))
    assert stats.hf < 0.02 and stats.r3 < 0.2 and stats.ac1 > 0.8  # HF: the image's edges


def test_only_the_sector_counts():
    """Outside the sector (label 0, stored as 0) nothing is measured: noise there changes
    nothing but through the box means at the sector's border."""
    labels = np.zeros((N, N), dtype=int)
    labels[16:112, 16:112] = 4
    image = np.where(labels > 0, ndimage.gaussian_filter(_noise(), 3), 0.0)
    inside = texture_statistics(image, labels)
    image[:4] = 255 * np.random.default_rng(2).random((4, N))  # far from the sector
    again = texture_statistics(image, labels)
    assert np.allclose(again.as_tuple(), inside.as_tuple(), rtol=1e-12)
    assert inside.ac1 > 0.8


def test_a_flat_image_has_no_texture():
    stats = texture_statistics(np.full((N, N), 7.0), np.full((N, N), 4))
    assert np.isnan(stats.hf) and np.isnan(stats.r3) and np.isnan(stats.ac1)


def test_the_definitions_reproduce_the_measurement_of_the_phantom_in_the_issue(tmp_path):
    """Issue 27 measured today's phantom (version 2) at 64² over a store's first 400 images:
    HF 0.349, R3 0.637, AC1 0.525 — these functions give the same figures (so the real CAMUS
    figures of :data:`CAMUS_TEXTURE` are comparable). Recalibrating the phantom changes them."""
    from edmcli.data.phantom import PHANTOM_VERSION
    from edmcli.data.prepare import prepare_phantom
    from edmcli.data.store import DatasetStore
    from edmcli.data.texture import store_texture

    assert PHANTOM_VERSION == 2, "a recalibrated phantom: measure and update these figures"
    store = tmp_path / "p64.zarr"
    prepare_phantom(store, 100, 64, 0, (0.8, 0.1, 0.1))
    stats = store_texture(DatasetStore(store), 400)
    assert stats.as_tuple() == pytest.approx((0.349, 0.637, 0.525), abs=0.004)
