"""Random transformations of label maps that multiply the generator's inputs (paper: 5 per map).

They follow the reference augmentation of "Echo from Noise" (``docs/reference.md``): a torchvision
``RandomAffine(degrees=(-5, 5), translate=(0, 0.05), scale=(0.8, 1.05), shear=5)`` followed by a
torchio ``RandomElasticDeformation(num_control_points=10, max_displacement=30, locked_borders=1)``
at 256², both nearest neighbour. One draw per ``(map, seed)``:

* affine, about the image centre ``((H - 1) / 2, (W - 1) / 2)``: shear along x only (rows stay),
  angle ``φ ~ U(±shear_deg)``; one isotropic scale ``s ~ U(scale)`` that enlarges the map by
  ``s``; rotation ``θ ~ U(±rotate_deg)``; a vertical shift ``~ U(±translate_rows · H)`` pixels
  (torchvision's order: ``x' = c + t + s R(θ) Shx(φ) (x - c)``; its shift is rounded to whole
  pixels, ours is not);
* elastic: a ``n × n`` grid of control points whose displacements are drawn uniformly in
  ``±max_displacement · size / 256`` pixels per axis, the outer ``locked_borders`` rings set to
  zero, and the dense field evaluated as a **cubic B-spline** of that grid with torchio's (ITK's)
  geometry: ``n - 3`` spline cells span the image from pixel edge to pixel edge, so the outermost
  ring lies one cell outside the image. The B-spline weights are non-negative and sum to one, so
  the field never exceeds the largest control displacement. With ``locked_borders=1`` (the
  reference) the field is *not* zero on the image's edge, only damped there (at most 5/6 of the
  maximum); ``locked_borders=2`` brings it to at most 1/6.

Both are applied in one nearest-neighbour resampling: the output pixel ``x`` takes the source
label at ``A⁻¹(x + d(x))`` (the affine map ``A`` first, then the elastic pull ``d``, as the
reference applies them one after the other), 0 (outside) where that falls off the map. Identity
parameters return the input exactly. The moved map is then kept inside the sector: the original
fan stays where it is, moved structures outside it are cut, and sector pixels the structures no
longer cover become label 4.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from edmcli.data.labels import OUTSIDE, SECTOR

SPLINE_ORDER = 3
REFERENCE_SIZE = 256  # the size at which ``elastic_max_displacement`` is given in pixels


@dataclass(frozen=True)
class LabelTransformConfig:
    """Ranges of one random transformation; :data:`IDENTITY` switches every part off.

    ``elastic_control_points=0`` or ``elastic_max_displacement=0`` switch the elastic part off
    without changing the affine draws of a seed (the affine parameters are drawn first).
    """

    rotate_deg: float = 5.0  # rotation angle ~ U(-r, r)
    translate_rows: float = 0.05  # vertical shift ~ U(-t, t) × height; no horizontal shift
    scale: tuple[float, float] = (0.8, 1.05)  # one isotropic factor; the map is enlarged by it
    shear_deg: float = 5.0  # shear angle along x ~ U(-a, a); rows are not sheared
    elastic_control_points: int = 10  # per axis (torchio's num_control_points)
    elastic_max_displacement: float = 30.0  # pixels at 256², per axis, scaled with the size
    elastic_locked_borders: int = 1  # outer control-point rings held at zero displacement

    def __post_init__(self) -> None:
        for name in ("rotate_deg", "translate_rows", "shear_deg", "elastic_max_displacement"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be ≥ 0, got {getattr(self, name)}")
        lo, hi = self.scale
        if not 0 < lo <= hi:
            raise ValueError(f"scale must be a range 0 < low ≤ high, got {self.scale}")
        if self.shear_deg >= 90 or self.rotate_deg > 180:
            raise ValueError("shear_deg must be < 90 and rotate_deg ≤ 180")
        n = self.elastic_control_points
        if n != 0 and n < SPLINE_ORDER + 1:
            raise ValueError(f"elastic_control_points must be 0 (off) or ≥ 4, got {n}")
        if self.elastic_locked_borders < 0:
            raise ValueError("elastic_locked_borders must be ≥ 0")


IDENTITY = LabelTransformConfig(
    rotate_deg=0.0,
    translate_rows=0.0,
    scale=(1.0, 1.0),
    shear_deg=0.0,
    elastic_control_points=0,
    elastic_max_displacement=0.0,
    elastic_locked_borders=0,
)


@dataclass(frozen=True)
class TransformDraw:
    """The random parameters of one transformation (pixels and degrees)."""

    rotate_deg: float
    shift_rows: float  # positive moves the map down
    scale: float
    shear_deg: float
    control: np.ndarray  # (2, n, n): control-point displacements (rows, columns) in pixels


def cubic_bspline(t: np.ndarray) -> np.ndarray:
    """The uniform cubic B-spline basis function β₃ (support [-2, 2], β₃(0) = 2/3)."""
    a = np.abs(t)
    inner = 2.0 / 3.0 - a**2 + 0.5 * a**3
    outer = (2.0 - a) ** 3 / 6.0
    return np.where(a < 1.0, inner, np.where(a < 2.0, outer, 0.0))


def bspline_weights(size: int, n: int) -> np.ndarray:
    """(size, n): weight of control point ``j`` at pixel ``i`` along one axis.

    ``n - 3`` cells span the pixel edges ``[-0.5, size - 0.5]``; control point ``j`` sits at
    cell coordinate ``j - 1``, so the first and last lie one cell outside the image.
    """
    cells = n - SPLINE_ORDER
    position = (np.arange(size) + 0.5) * cells / size + 1.0  # in control-point index units
    return cubic_bspline(position[:, None] - np.arange(n)[None, :])


class LabelMapTransform:
    """``transform(labels, seed) -> labels``: one seeded random transformation of a map.

    ``labels`` is a (size, size) uint8 map (0 outside the sector, 1–3 structures, 4 sector);
    the result has the same shape, type and sector and depends only on ``(labels, seed)``.
    :meth:`draw`, :meth:`displacement`, :meth:`coordinates` and :meth:`move` expose the steps.
    """

    def __init__(self, size: int, config: LabelTransformConfig | None = None) -> None:
        self.size = int(size)
        self.config = config or LabelTransformConfig()
        n = self.config.elastic_control_points
        self._weights = bspline_weights(self.size, n) if n else None
        grid = np.arange(self.size, dtype=np.float64)
        self._rows, self._cols = np.meshgrid(grid, grid, indexing="ij")

    @property
    def max_displacement(self) -> float:
        """The largest control-point displacement per axis, in pixels at this size."""
        c = self.config
        return c.elastic_max_displacement * self.size / REFERENCE_SIZE

    def draw(self, seed: int) -> TransformDraw:
        c = self.config
        rng = np.random.default_rng(int(seed) % 2**64)
        rotate, shift, shear = rng.uniform(-1.0, 1.0, size=3)
        scale = float(rng.uniform(c.scale[0], c.scale[1]))
        n, locked = c.elastic_control_points, c.elastic_locked_borders
        control = rng.uniform(-1.0, 1.0, size=(2, n, n)) * self.max_displacement
        if locked:
            free = np.zeros((n, n), dtype=bool)
            free[locked : n - locked, locked : n - locked] = True
            control = np.where(free, control, 0.0)
        return TransformDraw(
            rotate_deg=float(rotate * c.rotate_deg),
            shift_rows=float(shift * c.translate_rows * self.size),
            scale=scale,
            shear_deg=float(shear * c.shear_deg),
            control=control,
        )

    def displacement(self, draw: TransformDraw) -> np.ndarray:
        """(2, size, size): the elastic pull (rows, columns) in pixels at every output pixel."""
        if self._weights is None or not np.any(draw.control):
            return np.zeros((2, self.size, self.size))
        w = self._weights
        return np.stack([w @ grid @ w.T for grid in draw.control])

    def coordinates(self, draw: TransformDraw) -> np.ndarray:
        """(2, size, size): the source (row, column) each output pixel samples."""
        d = self.displacement(draw)
        y = self._rows + d[0]
        x = self._cols + d[1]
        centre = (self.size - 1) / 2.0
        # Invert x' = c + t + s R(θ) Shx(φ) (x - c) in (x, y) = (column, row) coordinates.
        theta, phi = math.radians(draw.rotate_deg), math.radians(draw.shear_deg)
        rotation = np.array(
            [[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]]
        )
        shear = np.array([[1.0, -math.tan(phi)], [0.0, 1.0]])
        inverse = np.linalg.inv(draw.scale * rotation @ shear)
        dx, dy = x - centre, y - centre - draw.shift_rows
        src_x = centre + inverse[0, 0] * dx + inverse[0, 1] * dy
        src_y = centre + inverse[1, 0] * dx + inverse[1, 1] * dy
        return np.stack([src_y, src_x])

    def resample(self, labels: np.ndarray, draw: TransformDraw) -> np.ndarray:
        """The map moved by ``draw`` (nearest neighbour, 0 off the map), before clipping."""
        labels = np.asarray(labels)
        if labels.shape != (self.size, self.size):
            raise ValueError(f"expected a {self.size}² label map, got shape {labels.shape}")
        rows, cols = np.floor(self.coordinates(draw) + 0.5).astype(np.int64)
        inside = (rows >= 0) & (rows < self.size) & (cols >= 0) & (cols < self.size)
        out = np.full(labels.shape, OUTSIDE, dtype=np.uint8)
        out[inside] = labels[rows[inside], cols[inside]]
        return out

    def move(self, labels: np.ndarray, seed: int) -> np.ndarray:
        """The map moved by the transformation of ``seed``, before the sector clipping."""
        return self.resample(labels, self.draw(seed))

    @staticmethod
    def clip(labels: np.ndarray, moved: np.ndarray) -> np.ndarray:
        """Keep ``labels``' sector: moved structures inside it, label 4 for the rest of it."""
        sector = labels != OUTSIDE
        structures = (moved != OUTSIDE) & (moved != SECTOR)
        out = np.where(sector, SECTOR, OUTSIDE).astype(np.uint8)
        keep = sector & structures
        out[keep] = moved[keep]
        return out

    def __call__(self, labels: np.ndarray, seed: int) -> np.ndarray:
        labels = np.asarray(labels)
        return self.clip(labels, self.move(labels, seed))
