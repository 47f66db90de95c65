"""Three texture statistics of B-mode images inside their sector (issue 27), the figures the
phantom is calibrated against and synthetic images are judged by:

- **HF**: the share of the in-sector image's power at radial frequencies above half of Nyquist
  (the image minus its in-sector mean, zero outside the sector, 2-D FFT, DC excluded; radius in
  frequency-index units > H/4);
- **R3**: the std over the sector of the image minus its 3×3 box mean, over the std of the image
  over the sector (how much of the grey-level variation is pixel-scale grain);
- **AC1**: the correlation of horizontally adjacent sector pixels of the image minus its 7×7 box
  mean (how wide the grain is: ≈ 0 for white noise, → 1 for grain much wider than a pixel).

Box means use scipy's ``uniform_filter`` with its default reflecting border, over the whole image
(outside the sector is 0, as stored). :func:`texture_statistics` gives each per image;
:func:`store_texture` the means over a store's first ``n`` images (real CAMUS:
:data:`CAMUS_TEXTURE`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

# Real CAMUS, the means over the first 400 images of a store (issue 27, measured on the user's
# copy with these definitions): (HF, R3, AC1) at 64² and at 128².
CAMUS_TEXTURE: dict[int, tuple[float, float, float]] = {
    64: (0.062, 0.233, 0.750),
    128: (0.041, 0.184, 0.739),
}
TEXTURE_NAMES = ("HF", "R3", "AC1")


@dataclass(frozen=True)
class Texture:
    hf: float
    r3: float
    ac1: float

    def as_tuple(self) -> tuple[float, float, float]:
        return (self.hf, self.r3, self.ac1)


def high_frequency_share(image: np.ndarray, sector: np.ndarray) -> float:
    """HF of one image (module docstring); NaN for a sector without variation."""
    x = np.where(sector, image - image[sector].mean(), 0.0)
    power = np.abs(np.fft.fft2(x)) ** 2
    h, w = x.shape
    ky = np.fft.fftfreq(h) * h
    kx = np.fft.fftfreq(w) * w
    radius = np.hypot(ky[:, None], kx[None, :])
    total = power[radius > 0].sum()
    return float(power[radius > h / 4].sum() / total) if total > 0 else float("nan")


def grain_ratio(image: np.ndarray, sector: np.ndarray) -> float:
    """R3 of one image (module docstring)."""
    residual = image - ndimage.uniform_filter(image, 3)
    spread = image[sector].std()
    return float(residual[sector].std() / spread) if spread > 0 else float("nan")


def adjacent_correlation(image: np.ndarray, sector: np.ndarray) -> float:
    """AC1 of one image (module docstring)."""
    residual = image - ndimage.uniform_filter(image, 7)
    pairs = sector[:, :-1] & sector[:, 1:]
    a, b = residual[:, :-1][pairs], residual[:, 1:][pairs]
    if a.size < 2 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def texture_statistics(image: np.ndarray, labels: np.ndarray) -> Texture:
    """HF, R3 and AC1 of one image (H, W) (or (1, H, W)) inside its sector (labels > 0)."""
    image = np.asarray(image, dtype=np.float64).reshape(np.shape(labels)[-2:])
    sector = np.asarray(labels).reshape(image.shape) > 0
    return Texture(
        high_frequency_share(image, sector),
        grain_ratio(image, sector),
        adjacent_correlation(image, sector),
    )


def mean_texture(images: np.ndarray, labels: np.ndarray) -> Texture:
    """The means of HF, R3 and AC1 over images (N, [1,] H, W) and their label maps (N, H, W)."""
    rows = np.array(
        [texture_statistics(i, m).as_tuple() for i, m in zip(images, labels, strict=True)]
    )
    return Texture(*(float(v) for v in np.nanmean(rows, axis=0)))


def store_texture(store, n: int = 400) -> Texture:
    """:func:`mean_texture` of the first ``n`` images of a dataset store."""
    count = min(n, len(store))
    return mean_texture(store.images[:count], store.labels[:count])
