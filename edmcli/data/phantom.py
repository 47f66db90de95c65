"""Procedural, CAMUS-like echocardiograms: the built-in data that makes echo-synth usable offline.

Each synthetic patient has an anatomy drawn from its own seed (``SeedSequence([seed, patient])``,
so patient *k* is the same whatever the number of patients) and is imaged in the apical
two-chamber (A2C) and four-chamber (A4C) views at end-diastole (ED) and end-systole (ES).

Geometry is drawn in millimetres in the probe's frame (apex of the fan at the top centre, depth
downwards) and mapped onto a square image, stretching the fan laterally to fill the width as
resizing CAMUS to 256² does (so pixels are not square; ``spacing`` records both sizes):

* LV cavity: a half-ellipse whose flat side is the mitral plane; myocardium: a band around it,
  open at the mitral plane; LA: an ellipse below the base. ES shortens and narrows the cavity,
  thickens the wall and enlarges the LA.
* A4C adds the right ventricle (dark pool behind the septum, bright free wall) and right atrium;
  they are imaged but labelled 4 (sector), as CAMUS labels only LV, myocardium and LA.

Image formation, in the spirit of B-mode: an echogenicity map per tissue (blood dark, myocardium
and pericardium bright, surrounding tissue textured), multiplied by fully developed speckle (the
envelope of a complex Gaussian field blurred anisotropically in the probe's polar frame, hence
Rayleigh distributed, lateral blur larger than axial, scan-converted so speckle widens with
depth), depth attenuation partly compensated by time-gain compensation, lateral fall-off at the
fan's edges, an electronic noise floor, linear display mapping and zero outside the sector.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from edmcli.data.labels import LA, LV, MYO, OUTSIDE, SECTOR

SPECKLE_SIGMA_AXIAL = 0.7  # polar-grid bins (≈ pixels along the beam)
SPECKLE_SIGMA_LATERAL = 1.6  # polar-grid bins (≈ pixels across the beam at mid depth)


@dataclass(frozen=True)
class ViewGeometry:
    """LV placement of one view of one patient (millimetres, degrees)."""

    apex_x: float
    apex_y: float
    tilt_deg: float
    width_scale: float


@dataclass(frozen=True)
class PatientAnatomy:
    """Everything about one synthetic patient that does not change between its four images."""

    depth_mm: float
    opening_deg: float
    lv_length: float
    lv_width: float
    wall: float
    la_length: float
    la_width: float
    la_offset: float
    es_long: float
    es_short: float
    es_wall: float
    es_la: float
    rv_width: float
    rv_length: float
    ra_length: float
    ra_width: float
    tissue_echo: float
    myo_echo: float
    attenuation: float
    tgc_fraction: float
    gain: float
    views: dict[str, ViewGeometry]


def sample_anatomy(rng: np.random.Generator) -> PatientAnatomy:
    """Draw one patient's anatomy and acquisition settings."""
    u = rng.uniform
    lv_length, lv_width = u(74, 92), u(46, 60)
    la_length, la_width = u(40, 54), u(32, 44)
    views = {
        "A2C": ViewGeometry(u(-3, 3), u(16, 28), u(-8, 8), u(0.92, 1.05)),
        "A4C": ViewGeometry(u(1, 6), u(16, 28), u(7, 15), u(0.95, 1.1)),
    }
    bottom = max(v.apex_y for v in views.values()) + lv_length + la_length * 1.2
    return PatientAnatomy(
        depth_mm=max(u(150, 180), bottom + u(4, 14)),
        opening_deg=u(70, 80),
        lv_length=lv_length,
        lv_width=lv_width,
        wall=u(7, 12),
        la_length=la_length,
        la_width=la_width,
        la_offset=u(-4, 4),
        es_long=u(0.84, 0.92),
        es_short=u(0.70, 0.82),
        es_wall=u(1.2, 1.45),
        es_la=u(1.1, 1.25),
        rv_width=u(26, 38),
        rv_length=u(0.65, 0.8),
        ra_length=u(38, 50),
        ra_width=u(30, 40),
        tissue_echo=u(0.22, 0.34),
        myo_echo=u(0.4, 0.55),
        attenuation=u(1.2, 2.4),
        tgc_fraction=u(0.7, 0.95),
        gain=u(0.9, 1.15),
        views=views,
    )


def _half_ellipse(s, w, length, half_width, shape_noise):
    """Inside-test of a half-ellipse centred on the base (s = length) reaching the apex (s = 0)."""
    ds = (s - length) / length
    dw = w / half_width
    phi = np.arctan2(dw, ds)
    radius = 1.0 + sum(a * np.cos(k * phi + p) for k, (a, p) in enumerate(shape_noise, start=2))
    return (ds**2 + dw**2 <= radius**2) & (s <= length)


def _frame(x, y, origin_x, origin_y, tilt_deg):
    """Coordinates along (s, from the apex towards the base) and across (w) a tilted axis."""
    t = math.radians(tilt_deg)
    dx, dy = x - origin_x, y - origin_y
    s = dx * math.sin(t) + dy * math.cos(t)
    w = dx * math.cos(t) - dy * math.sin(t)
    return s, w


def _smooth_field(rng, size, sigma, amplitude):
    """1 + low-frequency texture (correlation ``sigma`` pixels) of the given relative amplitude.

    Drawn on a grid coarser by ``sigma / 2`` and upsampled: the same statistics as a full-size
    Gaussian-filtered field at a fraction of the cost."""
    step = max(1.0, sigma / 2)
    coarse = max(4, int(math.ceil(size / step)) + 1)
    field = ndimage.gaussian_filter(rng.standard_normal((coarse, coarse)), 2.0, mode="reflect")
    field = ndimage.zoom(field, size / coarse, order=1, mode="nearest", grid_mode=True)
    field = field[:size, :size]
    field = (field - field.mean()) / (field.std() + 1e-12)
    return 1.0 + amplitude * field


def speckle_envelope(rng: np.random.Generator, n_radial: int, n_lateral: int) -> np.ndarray:
    """Complex Gaussian field blurred anisotropically (axial < lateral) on the polar grid; returns
    the complex field scaled so that E|z|² = 1 (its modulus is Rayleigh with mean √π/2)."""
    z = rng.standard_normal((2, n_radial, n_lateral))
    sigma = (0, SPECKLE_SIGMA_AXIAL, SPECKLE_SIGMA_LATERAL)
    z = ndimage.gaussian_filter(z, sigma, mode="wrap")
    z /= math.sqrt(float(np.mean(z[0] ** 2 + z[1] ** 2)))
    return z


def render(
    anatomy: PatientAnatomy, view: str, phase: str, size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """One image: (uint8 image (size, size), uint8 labels (size, size), spacing (row, col) mm)."""
    a, g = anatomy, anatomy.views[view]
    half = math.radians(a.opening_deg / 2)
    depth_total = a.depth_mm * 1.02
    half_width = a.depth_mm * math.sin(half) * 1.02
    spacing = (depth_total / size, 2 * half_width / size)
    y = (np.arange(size) + 0.5)[:, None] * spacing[0]
    x = ((np.arange(size) + 0.5)[None, :] - size / 2) * spacing[1]
    rho = np.hypot(x, y)
    theta = np.arctan2(x, y)
    sector = (rho <= a.depth_mm) & (np.abs(theta) <= half)

    es = phase == "ES"
    length = a.lv_length * (a.es_long if es else 1.0)
    lv_half = a.lv_width * g.width_scale / 2 * (a.es_short if es else 1.0)
    wall = a.wall * (a.es_wall if es else 1.0)
    la_scale = a.es_la if es else 1.0
    shape_noise = [(rng.uniform(0, 0.05), rng.uniform(0, 2 * math.pi)) for _ in range(2)]

    # LV: the apex stays put; the base (mitral plane) moves towards it in systole.
    s, w = _frame(x, y, g.apex_x, g.apex_y, g.tilt_deg)
    cavity = _half_ellipse(s, w, length, lv_half, shape_noise)
    outer = _half_ellipse(s + wall, w, length + wall, lv_half + wall, shape_noise)
    myo = outer & ~cavity
    pericardium = _half_ellipse(s + wall + 3, w, length + wall + 3, lv_half + wall + 3, []) & ~outer
    la_len, la_half = a.la_length * la_scale, a.la_width * la_scale / 2
    # The LA opens onto the LV across the mitral plane (its centre lies below the plane by 3/4
    # of its half-length, so the two chambers share a wide mouth).
    la_centre = length + 0.75 * la_len / 2
    la = ((s - la_centre) / (la_len / 2)) ** 2 + ((w - a.la_offset) / la_half) ** 2 <= 1
    la &= s > length

    blood = cavity | la
    bright = np.zeros_like(sector)
    if view == "A4C":  # right heart behind the septum: imaged, labelled as sector
        rv_len = length * a.rv_length
        rv_centre = -(lv_half + wall + a.rv_width / 2 + 1.5)
        s_rv = s - (length - rv_len)
        rv = _half_ellipse(s_rv, w - rv_centre, rv_len, a.rv_width / 2, [])
        rv_wall = _half_ellipse(s_rv + 4, w - rv_centre, rv_len + 4, a.rv_width / 2 + 4, [])
        ra_half = a.ra_width / 2
        ra_centre = length + 0.75 * a.ra_length / 2
        ra = ((s - ra_centre) / (a.ra_length / 2)) ** 2 + ((w - rv_centre - 3) / ra_half) ** 2 <= 1
        ra &= (s > length) & ~la
        blood |= rv | ra
        bright |= rv_wall & ~rv & ~outer

    labels = np.full((size, size), SECTOR, dtype=np.uint8)
    labels[la] = LA
    labels[myo] = MYO
    labels[cavity] = LV
    labels[~sector] = OUTSIDE

    # Echogenicity map (relative amplitude), then soft tissue edges.
    pixel = min(spacing)
    echo = a.tissue_echo * _smooth_field(rng, size, 6.0 / pixel, 0.25)
    echo = np.where(myo, a.myo_echo * _smooth_field(rng, size, 4.0 / pixel, 0.15), echo)
    echo = np.where(pericardium & ~la, 0.85, echo)
    echo = np.where(bright, a.myo_echo * 1.1, echo)
    clutter = 0.03 + 0.08 * np.exp(-y / 25.0)
    echo = np.where(blood, clutter, echo)
    echo = ndimage.gaussian_filter(echo, (0.5 / spacing[0], 1.0 / spacing[1]))

    # Speckle on the probe's polar grid, scan-converted to the image.
    n_radial, n_lateral = int(size * 1.1), size
    z = speckle_envelope(rng, n_radial, n_lateral)
    ir = rho / a.depth_mm * (n_radial - 1)
    il = (theta + half) / (2 * half) * (n_lateral - 1)
    coords = np.stack([ir, il])
    real = ndimage.map_coordinates(z[0], coords, order=1, mode="nearest")
    imag = ndimage.map_coordinates(z[1], coords, order=1, mode="nearest")
    speckle = np.hypot(real, imag) / (math.sqrt(math.pi) / 2)  # Rayleigh, mean 1

    depth = rho / a.depth_mm
    gain = np.exp(-a.attenuation * (1 - a.tgc_fraction) * depth)  # attenuation after TGC
    falloff = 1 - 0.35 * (np.abs(theta) / half) ** 4
    amplitude = echo * speckle * gain * falloff
    noise = 0.01 * np.hypot(rng.standard_normal((size, size)), rng.standard_normal((size, size)))
    image = np.clip((amplitude + noise) * a.gain * 255.0, 0, 255)
    image[~sector] = 0
    return image.astype(np.uint8), labels, spacing


def generate_patient(seed: int, patient: int, size: int) -> list[dict]:
    """The four images (A2C/A4C × ED/ES) of synthetic patient ``patient`` for a global seed."""
    if size < 16:
        raise ValueError(f"phantom size must be at least 16 pixels, got {size}")
    root = np.random.SeedSequence([seed, patient])
    anatomy_seq, *image_seqs = root.spawn(5)
    anatomy = sample_anatomy(np.random.default_rng(anatomy_seq))
    out = []
    for (view, phase), seq in zip(
        [("A2C", "ED"), ("A2C", "ES"), ("A4C", "ED"), ("A4C", "ES")], image_seqs, strict=True
    ):
        image, labels, spacing = render(anatomy, view, phase, size, np.random.default_rng(seq))
        out.append(
            {"image": image, "labels": labels, "view": view, "phase": phase, "spacing": spacing}
        )
    return out
