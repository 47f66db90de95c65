"""Random transformations of label maps that multiply the generator's inputs (paper: 5 per map).

As in "Echo from Noise" and the paper: a random affine transformation (rotation ±5°, translation
≤ 5 % of the size, scale 0.8–1.05, shear ±5°) and an elastic deformation, applied in one
resampling (MONAI ``Rand2DElasticd``, nearest neighbour), then kept inside the sector: the
original fan stays where it is, transformed structures outside it are cut, and sector pixels the
structures no longer cover become label 4.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from monai.transforms import Rand2DElasticd

from edmcli.data.labels import OUTSIDE, SECTOR


@dataclass(frozen=True)
class LabelTransformConfig:
    rotate_deg: float = 5.0
    translate: float = 0.05
    scale: tuple[float, float] = (0.8, 1.05)
    shear_deg: float = 5.0
    elastic_spacing: float = 0.25  # control-point spacing, fraction of the size
    elastic_magnitude: tuple[float, float] = (0.0, 0.02)  # displacement, fraction of the size


class LabelMapTransform:
    """``transform(labels, seed) -> labels``: one seeded random transformation of a map."""

    def __init__(self, size: int, config: LabelTransformConfig | None = None) -> None:
        c = config or LabelTransformConfig()
        shear = math.tan(math.radians(c.shear_deg))
        rotate = math.radians(c.rotate_deg)
        self.transform = Rand2DElasticd(
            keys="labels",
            spacing=max(2.0, c.elastic_spacing * size),
            magnitude_range=(c.elastic_magnitude[0] * size, c.elastic_magnitude[1] * size),
            prob=1.0,
            rotate_range=(-rotate, rotate),
            shear_range=((-shear, shear), (-shear, shear)),
            translate_range=((-c.translate * size, c.translate * size),) * 2,
            scale_range=((c.scale[0] - 1, c.scale[1] - 1),) * 2,
            mode="nearest",
            padding_mode="zeros",
        )

    def __call__(self, labels: np.ndarray, seed: int) -> np.ndarray:
        self.transform.set_random_state(seed=int(seed) % (2**32 - 1))
        moved = self.transform({"labels": torch.as_tensor(labels[None], dtype=torch.float32)})
        moved = np.asarray(torch.as_tensor(moved["labels"]).as_subclass(torch.Tensor))[0]
        moved = np.rint(moved).astype(np.uint8)
        sector = labels != OUTSIDE
        structures = (moved != OUTSIDE) & (moved != SECTOR)
        out = np.where(sector, SECTOR, OUTSIDE).astype(np.uint8)
        out[sector & structures] = moved[sector & structures]
        return out
