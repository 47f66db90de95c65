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
* A4C adds the right ventricle (a blood pool behind the septum with a faint free wall) and the
  right atrium; they are imaged but labelled 4 (sector), as CAMUS labels only LV, myocardium and
  LA.

Image formation, in the spirit of B-mode, calibrated so that the phantom is as hard as real
echoes (:data:`CAMUS_TARGETS`: grey, hazy cavities, weak wall contrast, faint right heart):

* **scatterers**: an echogenicity map per tissue: surrounding tissue with a smooth texture; the
  myocardium brighter than it by a weak, patient-variable margin (``wall_contrast``); the
  pericardium and a thin atrial wall brighter; the RV free wall barely brighter; blood a grey
  haze (``blood_haze`` × tissue), smoothly textured in the ventricles (more in the RV:
  trabeculations) and, in the atria where flow is slow, a log-normal swirling "smoke"
  (spontaneous echo contrast). The map is blurred by the resolution cell: 0.5 mm axially and
  across the beam 1 mm at the probe widening to ``beam_far_mm`` at the bottom;
* **dropout along the beam**: angular bands (usually one over the LV lateral wall, which lies
  parallel to the beam; sometimes another anywhere) in which scattering weakens from some depth
  on (:func:`dropout_gain`);
* **speckle**: complex Gaussian fields blurred anisotropically on the probe's polar grid
  (:func:`speckle_envelope`; lateral blur larger than axial, scan-converted so speckle widens
  with depth). Static scatterers (tissue, reverberation, side lobes) share one field, so their
  envelope is Rayleigh (fully developed speckle); moving scatterers (blood, myocardium, RV and
  atrial walls) decorrelate between frames, and frame persistence averages the intensity of
  ``PERSISTENCE_FRAMES`` frames, so in blood the envelope is Nakagami with m = that number
  (:func:`nakagami_mean`), smoother than tissue;
* **clutter**: side-lobe leakage (the scatterer map blurred laterally by a beam widening from 2
  to 10 mm with depth, which bleeds walls into chambers), near-field reverberation haze decaying
  with depth and a reverberation floor. Scatterers are attenuated along the round trip;
  reverberation is not, so time-gain compensation (TGC, ``attenuation`` × ``tgc_fraction`` +
  ``tgc_slope`` per unit depth) raises the floor in the far field;
* **acquisition**: lateral fall-off at the fan's edges, an electronic noise floor, a patient
  gain (log-uniform, ± 12 %) with a 5 % per-image jitter, linear display mapping clipped to
  0–255 and zero outside the sector.

The label geometry draws first from each random stream, so acquisition and image formation can
change without moving a label (``PHANTOM_VERSION`` counts the looks: 1 was high-contrast with
black cavities). :func:`calibration_statistics` measures a set of patients against
:data:`CAMUS_TARGETS` (:func:`region_statistics`, :func:`nearest_centroid_view_accuracy`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from edmcli.data.labels import LA, LV, MYO, OUTSIDE, SECTOR

SPECKLE_SIGMA_AXIAL = 0.7  # polar-grid bins (≈ pixels along the beam), × speckle_scale(size)
SPECKLE_SIGMA_LATERAL = 1.6  # polar-grid bins (≈ pixels across the beam at mid depth), × the same
# Texture after resizing (version 3, calibrated to real CAMUS's HF, R3 and AC1 at 64² and 128²,
# :mod:`edmcli.data.texture`): real B-mode grain, resized to these sizes, spans a few output
# pixels, so the speckle is coarser in pixels than at full resolution (SPECKLE_SCALE at 64², ×
# SPECKLE_SCALE_STEP per doubling), the image is blurred by the resize (DISPLAY_BLUR pixels at
# 64², + DISPLAY_BLUR_STEP per doubling, applied with zero outside the sector, which also softens
# its edge) and keeps a little pixel-scale grain (DISPLAY_GRAIN, relative).
SPECKLE_SCALE, SPECKLE_SCALE_STEP = 2.2, 0.3
DISPLAY_BLUR, DISPLAY_BLUR_STEP = 0.9, 0.2
DISPLAY_GRAIN = 0.07
WALL_TEXTURE = 0.3  # relative amplitude of the myocardium's smooth texture
BLOOD_LEVEL = 0.9  # × the drawn blood haze (cavity brightness)
ATRIAL_LEVEL = 0.85  # × the drawn atrial haze
BLOOD_TEXTURE = 0.45  # relative amplitude of the ventricles' smooth blood texture
SMOKE_SPREAD = 1.5  # × the drawn log-normal spread of the atrial smoke
ATRIAL_WALL_MM = 2.5  # thickness of the (unlabelled) atrial wall
SMOKE_MM = 6.0  # correlation length of the atrial smoke
SIDE_LOBE_MM = (2.0, 10.0)  # lateral spread of side-lobe clutter at the probe and at the bottom
PERSISTENCE_FRAMES = 3  # frames averaged in intensity: blood speckle decorrelates between them
PHANTOM_VERSION = 3  # 1: high contrast (black cavities); 2: CAMUS grey levels; 3: + CAMUS texture

# Real CAMUS at 64² (aggregate over images, grey levels 0-255): (mean, std) of the pixels of each
# region, the myocardium-vs-cavity Cohen's d and the held-out accuracy of a nearest-centroid
# view rule on raw pixels (issue 14).
CAMUS_TARGETS: dict[str, float] = {
    "lv_mean": 71.0,
    "lv_std": 29.0,
    "myo_mean": 107.0,
    "myo_std": 47.0,
    "la_mean": 81.0,
    "la_std": 41.0,
    "sector_mean": 95.0,
    "sector_std": 49.0,
    "cohen_d": 0.91,
    "view_accuracy": 0.90,
}
REGIONS = {"lv": LV, "myo": MYO, "la": LA, "sector": SECTOR}


@dataclass(frozen=True)
class ViewGeometry:
    """LV placement of one view of one patient (millimetres, degrees)."""

    apex_x: float
    apex_y: float
    tilt_deg: float
    width_scale: float


@dataclass(frozen=True)
class PatientAnatomy:
    """Everything about one synthetic patient that does not change between its four images.

    Lengths in millimetres; echogenicities are relative amplitudes (the display maps amplitude
    × ``gain`` × 255 to grey levels); contrasts are ratios to ``tissue_echo``."""

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
    wall_contrast: float
    attenuation: float
    tgc_fraction: float
    gain: float
    pericardium_contrast: float
    rv_wall_contrast: float
    blood_haze: float
    near_haze: float
    near_haze_mm: float
    side_lobe: float
    tgc_slope: float
    reverb_floor: float
    beam_far_mm: float
    atrial_wall_contrast: float
    atrial_haze: float
    rv_haze: float
    smoke: float
    views: dict[str, ViewGeometry]


def sample_anatomy(rng: np.random.Generator) -> PatientAnatomy:
    """Draw one patient's anatomy and acquisition settings.

    The geometry is drawn first, in a fixed order, so that acquisition settings can change
    without changing any label map."""
    u = rng.uniform
    lv_length, lv_width = u(74, 92), u(46, 60)
    la_length, la_width = u(40, 54), u(32, 44)
    views = {
        "A2C": ViewGeometry(u(-3, 3), u(16, 28), u(-8, 8), u(0.92, 1.05)),
        "A4C": ViewGeometry(u(1, 6), u(16, 28), u(7, 15), u(0.95, 1.1)),
    }
    bottom = max(v.apex_y for v in views.values()) + lv_length + la_length * 1.2
    return PatientAnatomy(  # keyword arguments are evaluated, hence drawn, in this order
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
        # acquisition (after the geometry: free to change without moving a label)
        tissue_echo=u(0.34, 0.44),
        wall_contrast=u(0.9, 1.45),
        attenuation=u(1.2, 2.4),
        tgc_fraction=u(0.8, 0.95),
        gain=math.exp(u(-0.12, 0.12)),
        pericardium_contrast=u(1.1, 1.7),
        rv_wall_contrast=u(0.9, 1.45),
        blood_haze=u(0.42, 0.86),
        near_haze=u(0.2, 1.0),
        near_haze_mm=u(15, 35),
        side_lobe=u(0.2, 0.45),
        tgc_slope=u(0.0, 0.3),
        reverb_floor=u(0.05, 0.15),
        beam_far_mm=u(2.5, 5.0),
        atrial_wall_contrast=u(1.0, 2.0),
        atrial_haze=u(0.9, 1.4),
        rv_haze=u(1.0, 1.5),
        smoke=u(0.2, 0.6),
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


def _from_frame(s, w, origin_x, origin_y, tilt_deg):
    """Inverse of :func:`_frame`: probe coordinates (x, y) of a point (s, w) of a tilted axis."""
    t = math.radians(tilt_deg)
    return origin_x + s * math.sin(t) + w * math.cos(t), origin_y + s * math.cos(t) - w * math.sin(
        t
    )


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


def resize_octaves(size: int) -> float:
    """Doublings of ``size`` over 64 (the calibration's steps are per doubling)."""
    return math.log2(size / 64)


def speckle_envelope(
    rng: np.random.Generator, n_radial: int, n_lateral: int, scale: float = 1.0
) -> np.ndarray:
    """Complex Gaussian field blurred anisotropically (axial < lateral, × ``scale``) on the polar
    grid; returns the complex field scaled so that E|z|² = 1 (its modulus is Rayleigh with mean
    √π/2)."""
    z = rng.standard_normal((2, n_radial, n_lateral))
    sigma = (0, SPECKLE_SIGMA_AXIAL * scale, SPECKLE_SIGMA_LATERAL * scale)
    z = ndimage.gaussian_filter(z, sigma, mode="wrap")
    z /= math.sqrt(float(np.mean(z[0] ** 2 + z[1] ** 2)))
    return z


def nakagami_mean(m: float) -> float:
    """E[R] of a Nakagami-m envelope with E[R²] = 1: Γ(m + ½) / (Γ(m) √m).

    m = 1 is Rayleigh (√π/2); the envelope of the mean intensity of m independent speckle
    patterns (frame persistence over decorrelated blood) is Nakagami-m."""
    return math.exp(math.lgamma(m + 0.5) - math.lgamma(m)) / math.sqrt(m)


def dropout_gain(
    theta: np.ndarray,
    rho: np.ndarray,
    bands: Sequence[tuple[float, float, float, float]],
    ramp_mm: float = 6.0,
) -> np.ndarray:
    """Multiplicative loss of scattering along the beam: the product over bands of
    ``1 − strength · across(θ) · along(ρ)``.

    Each band ``(angle, half_width, start_mm, strength)`` (radians, radians, mm, 0-1) weakens
    the beams around ``angle`` (Gaussian profile of standard deviation ``half_width``) by up to
    ``strength`` from depth ``start_mm`` onwards (a logistic ramp of scale ``ramp_mm``), as a
    wall parallel to the beam or a shadow does. Returns values in (0, 1]."""
    out = np.ones_like(theta, dtype=float)
    for angle, half_width, start, strength in bands:
        across = np.exp(-0.5 * ((theta - angle) / half_width) ** 2)
        along = 1.0 / (1.0 + np.exp(-(rho - start) / ramp_mm))
        out *= 1.0 - strength * across * along
    return out


def _lateral_blur(field, sigma_cols_near, sigma_cols_far, depth):
    """Blur across the beam whose width grows linearly with depth (0 at the probe, 1 at the
    bottom): the mix of two Gaussian blurs weighted by depth."""
    near = ndimage.gaussian_filter(field, (0.0, sigma_cols_near), mode="nearest")
    far = ndimage.gaussian_filter(field, (0.0, sigma_cols_far), mode="nearest")
    return near + (far - near) * np.clip(depth, 0.0, 1.0)


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
    # The atrial wall: a thin shell around the LA below the mitral plane (imaged, labelled 4).
    t = ATRIAL_WALL_MM
    la_outer = ((s - la_centre) / (la_len / 2 + t)) ** 2 + ((w - a.la_offset) / (la_half + t)) ** 2
    atrial_wall = (la_outer <= 1) & ~la & ~outer & (s > length)

    blood, atria = cavity | la, la.copy()
    rv_wall, rv_pool = np.zeros_like(sector), np.zeros_like(sector)
    if view == "A4C":  # right heart behind the septum: imaged, labelled as sector
        rv_len = length * a.rv_length
        rv_centre = -(lv_half + wall + a.rv_width / 2 + 1.5)
        s_rv = s - (length - rv_len)
        rv = _half_ellipse(s_rv, w - rv_centre, rv_len, a.rv_width / 2, [])
        rv_outer = _half_ellipse(s_rv + 4, w - rv_centre, rv_len + 4, a.rv_width / 2 + 4, [])
        ra_half = a.ra_width / 2
        ra_centre = length + 0.75 * a.ra_length / 2
        ra = ((s - ra_centre) / (a.ra_length / 2)) ** 2 + ((w - rv_centre - 3) / ra_half) ** 2 <= 1
        ra &= (s > length) & ~la
        blood |= rv | ra
        rv_pool = rv
        atria |= ra
        rv_wall = rv_outer & ~rv & ~outer

    labels = np.full((size, size), SECTOR, dtype=np.uint8)
    labels[la] = LA
    labels[myo] = MYO
    labels[cavity] = LV
    labels[~sector] = OUTSIDE

    # ---- image formation: every draw below comes after the geometry's
    pixel = min(spacing)
    tissue = a.tissue_echo
    echo = tissue * _smooth_field(rng, size, 6.0 / pixel, 0.15)
    wall_echo = tissue * a.wall_contrast * rng.uniform(0.9, 1.1)  # a little per view and phase
    echo = np.where(myo, wall_echo * _smooth_field(rng, size, 4.0 / pixel, WALL_TEXTURE), echo)
    echo = np.where(pericardium & ~la, tissue * a.pericardium_contrast, echo)
    echo = np.where(rv_wall, tissue * a.rv_wall_contrast, echo)
    echo = np.where(atrial_wall, tissue * a.atrial_wall_contrast, echo)
    echo = np.where(blood, 0.0, echo)
    # Resolution cell: 0.5 mm axially; across the beam 1 mm at the probe widening with depth.
    depth = rho / a.depth_mm
    echo = ndimage.gaussian_filter(echo, (0.5 / spacing[0], 0.0))
    echo = _lateral_blur(echo, 1.0 / spacing[1], a.beam_far_mm / spacing[1], depth)

    # Dropout along the beam: usually over the lateral wall (parallel to the beam), sometimes
    # another band anywhere across the fan.
    wall_x, wall_y = _from_frame(0.55 * length, lv_half + wall / 2, g.apex_x, g.apex_y, g.tilt_deg)
    wall_angle, wall_depth = math.atan2(wall_x, wall_y), math.hypot(wall_x, wall_y)
    bands = []
    if rng.uniform() < 0.7:
        bands.append(
            (
                wall_angle + rng.normal(0, math.radians(3)),
                math.radians(rng.uniform(3, 7)),
                wall_depth - rng.uniform(10, 30),
                rng.uniform(0.4, 0.85),
            )
        )
    if rng.uniform() < 0.35:
        bands.append(
            (
                rng.uniform(-half, half),
                math.radians(rng.uniform(3, 8)),
                rng.uniform(0.1, 0.6) * a.depth_mm,
                rng.uniform(0.3, 0.7),
            )
        )
    echo = echo * dropout_gain(theta, rho, bands)

    # Speckle on the probe's polar grid, scan-converted to the image. Static scatterers (tissue,
    # reverberation, side lobes) share one pattern; blood decorrelates between frames, so frame
    # persistence averages the intensity of PERSISTENCE_FRAMES independent blood patterns.
    n_radial, n_lateral = int(size * 1.1), size
    speckle_scale = SPECKLE_SCALE + SPECKLE_SCALE_STEP * resize_octaves(size)
    ir = rho / a.depth_mm * (n_radial - 1)
    il = (theta + half) / (2 * half) * (n_lateral - 1)
    coords = np.stack([ir, il])

    def field() -> np.ndarray:
        z = speckle_envelope(rng, n_radial, n_lateral, speckle_scale)
        real = ndimage.map_coordinates(z[0], coords, order=1, mode="nearest")
        imag = ndimage.map_coordinates(z[1], coords, order=1, mode="nearest")
        return real + 1j * imag

    soft = (0.5 / spacing[0], 1.0 / spacing[1])
    moving_mask = (blood | myo | rv_wall | atrial_wall).astype(float)
    moving = np.clip(ndimage.gaussian_filter(moving_mask, soft), 0, 1)
    # Blood: a grey haze, smoothly textured in the ventricles; in the atria, where flow is slow,
    # swirling "smoke" (spontaneous echo contrast): a log-normal texture, brighter on average.
    ventricles = (blood & ~atria).astype(float)
    ventricles[rv_pool] *= a.rv_haze  # trabeculations and the moderator band clutter the RV
    ventricles = ndimage.gaussian_filter(ventricles, soft)
    texture = _smooth_field(rng, size, 12.0 / pixel, BLOOD_TEXTURE) * ventricles
    smoke = _smooth_field(rng, size, SMOKE_MM / pixel, 1.0) - 1.0  # unit-variance field
    spread = a.smoke * SMOKE_SPREAD
    smoke = a.atrial_haze * ATRIAL_LEVEL * np.exp(spread * smoke - spread**2 / 2)
    texture = texture + smoke * ndimage.gaussian_filter(atria.astype(float), soft)
    blood_echo = a.blood_haze * BLOOD_LEVEL * tissue * texture
    side = _lateral_blur(echo, SIDE_LOBE_MM[0] / spacing[1], SIDE_LOBE_MM[1] / spacing[1], depth)
    # Scatterers are attenuated on the way (round trip); reverberation clutter (near-field and
    # a floor) is not, so that time-gain compensation raises it with depth.
    tgc_rate = a.attenuation * a.tgc_fraction + a.tgc_slope
    attenuation = np.exp(-a.attenuation * depth)
    clutter = tissue * (a.near_haze * np.exp(-rho / a.near_haze_mm) + a.reverb_floor)
    scatter = echo**2 * (1 - moving) + (a.side_lobe * side) ** 2
    static_amplitude = np.sqrt(scatter * attenuation**2 + clutter**2)
    static = static_amplitude * field()
    heart = np.sqrt(echo**2 * moving + blood_echo**2) * attenuation
    frames = [np.abs(static + heart * field()) ** 2 for _ in range(PERSISTENCE_FRAMES)]
    intensity = sum(frames) / PERSISTENCE_FRAMES
    noise = 0.01 * np.hypot(rng.standard_normal((size, size)), rng.standard_normal((size, size)))
    tgc = np.exp(tgc_rate * depth)
    amplitude = np.sqrt(intensity) / (math.sqrt(math.pi) / 2) * tgc + noise
    falloff = 1 - 0.25 * (np.abs(theta) / half) ** 4
    gain = a.gain * math.exp(rng.normal(0, 0.05))
    image = np.where(sector, amplitude * falloff * gain * 255.0, 0.0)
    blur = DISPLAY_BLUR + DISPLAY_BLUR_STEP * resize_octaves(size)
    image = ndimage.gaussian_filter(image, blur) * (
        1 + DISPLAY_GRAIN * rng.standard_normal(image.shape)
    )
    image = np.clip(image, 0, 255)
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


# ------------------------------------------------------------------ calibration statistics
def cohen_d(mean_a: float, std_a: float, mean_b: float, std_b: float) -> float:
    """Cohen's d of region *a* against region *b*: (μ_a − μ_b) / √((σ_a² + σ_b²) / 2)."""
    return (mean_a - mean_b) / math.sqrt((std_a**2 + std_b**2) / 2)


def region_statistics(images: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Aggregate grey-level statistics of a set of images: for each region of :data:`REGIONS`
    the mean and standard deviation of all its pixels pooled over the images (``lv_mean``,
    ``lv_std``, …), and ``cohen_d``, the myocardium-vs-cavity contrast from those figures.

    Args:
        images: (N, H, W) grey levels (any numeric type; 0-255 for the CAMUS figures).
        labels: (N, H, W) label maps in the store convention.
    """
    images, labels = np.asarray(images), np.asarray(labels)
    if images.shape != labels.shape or images.ndim != 3:
        raise ValueError(f"images {images.shape} and labels {labels.shape} must both be (N, H, W)")
    out: dict[str, float] = {}
    for name, label in REGIONS.items():
        values = images[labels == label].astype(np.float64)
        if values.size == 0:
            raise ValueError(f"no pixel of region {name!r} (label {label}) in the images")
        out[f"{name}_mean"], out[f"{name}_std"] = float(values.mean()), float(values.std())
    out["cohen_d"] = cohen_d(out["myo_mean"], out["myo_std"], out["lv_mean"], out["lv_std"])
    return out


def nearest_centroid_view_accuracy(
    images: np.ndarray, views: Sequence[str], patients: Sequence[object], folds: int = 5
) -> float:
    """Held-out accuracy of the nearest-centroid view rule on raw pixels.

    The patients (in order of first appearance) are cut into ``folds`` contiguous groups; for
    each group, the mean image of each view over the other groups' images is its class
    centroid, and each of the group's images gets the view of the nearest centroid (L2 on the
    raw pixels). Returns the fraction of all images classified correctly (every patient is
    held out once; with ``folds = 2`` it is a train-on-half, test-on-half rule both ways)."""
    x = np.asarray(images, dtype=np.float64).reshape(len(views), -1)
    views, patients = np.asarray(views), np.asarray(patients)
    order = list(dict.fromkeys(patients.tolist()))
    classes = sorted(set(views.tolist()))
    if len(classes) != 2 or not 2 <= folds <= len(order):
        raise ValueError(
            f"need two views and 2 <= folds <= patients, got views {classes}, {folds} folds for "
            f"{len(order)} patients"
        )
    group_of = {p: k * folds // len(order) for k, p in enumerate(order)}
    group = np.array([group_of[p] for p in patients.tolist()])
    correct = 0
    for k in range(folds):
        train, test = group != k, group == k
        centroids = np.stack([x[train & (views == c)].mean(0) for c in classes])
        distance = ((x[test, None, :] - centroids[None]) ** 2).sum(-1)
        correct += int((np.asarray(classes)[distance.argmin(1)] == views[test]).sum())
    return correct / len(views)


def calibration_statistics(
    n_patients: int = 50, size: int = 64, seed: int = 0, folds: int = 5
) -> dict[str, float]:
    """The statistics of :data:`CAMUS_TARGETS` measured on phantom patients ``0 … n − 1``:
    :func:`region_statistics` and ``view_accuracy`` (:func:`nearest_centroid_view_accuracy`)."""
    records = [(p, r) for p in range(n_patients) for r in generate_patient(seed, p, size)]
    images = np.stack([r["image"] for _, r in records])
    stats = region_statistics(images, np.stack([r["labels"] for _, r in records]))
    stats["view_accuracy"] = nearest_centroid_view_accuracy(
        images, [r["view"] for _, r in records], [p for p, _ in records], folds
    )
    return stats


def relative_errors(
    stats: Mapping[str, float], targets: Mapping[str, float] = CAMUS_TARGETS
) -> dict[str, float]:
    """``stats[k] / targets[k] − 1`` for every key of ``targets``."""
    return {k: stats[k] / t - 1.0 for k, t in targets.items()}
