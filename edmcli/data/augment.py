"""Paired augmentation of (image, label map) items from MONAI transforms, seeded per item.

Geometric transforms move image and labels together (bilinear / nearest) and fill with label 0
(outside the sector); intensity transforms touch the image only and keep it in [0, 1] and zero
outside the sector. The VAE and the segmenter use both; diffusion models only the geometric
ones (no colour changes, as the paper).

Per-item cost: MONAI's ``Compose.set_random_state(seed)`` builds a new NumPy ``RandomState``
for each of the ten random transforms inside (≈ 90 µs each), and its transforms track metadata
that training never reads. :func:`reseed` re-seeds the existing generators in MONAI's own order
(≈ 1.5 µs each) and the transforms run with metadata tracking off: the same outputs, bit for bit
(tests/data/test_augment.py), at ≈ 0.85 instead of ≈ 2.7 ms per 64² item on the CI-class CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.data import get_track_meta, set_track_meta
from monai.transforms import (
    Compose,
    RandAdjustContrastd,
    RandAffined,
    RandGaussianSmoothd,
    Randomizable,
    RandScaleIntensityd,
)
from monai.utils import MAX_SEED

from edmcli.data.labels import OUTSIDE


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges; ``intensity=False`` keeps only the geometric part."""

    affine_prob: float = 0.5
    rotate_deg: float = 10.0
    translate: float = 0.05  # fraction of the image size
    scale: tuple[float, float] = (0.9, 1.1)  # the image is resized by s in this range (> 0)
    shear: float = 0.05
    intensity: bool = True
    intensity_prob: float = 0.3
    gamma: tuple[float, float] = (0.7, 1.5)
    brightness: float = 0.15  # relative scale change
    blur_sigma: tuple[float, float] = (0.25, 1.0)


class PairedAugment:
    """Callable ``(item, rng) → item`` for :class:`~edmcli.training.engine.SeededItems`:
    ``item`` holds ``image`` (1, H, W) float in [0, 1] and ``labels`` (H, W) int64."""

    def __init__(self, config: AugmentConfig, image_size: tuple[int, int]) -> None:
        h, w = image_size
        c = config
        transforms: list[Any] = [
            RandAffined(
                keys=("image", "labels"),
                prob=c.affine_prob,
                rotate_range=(math.radians(c.rotate_deg),),
                translate_range=(c.translate * h, c.translate * w),
                # MONAI scales the sampling grid, which resizes the image by the reciprocal:
                # draw grid factors in [1 / high, 1 / low] so the image is resized by s ∈ scale.
                scale_range=((1.0 / c.scale[1] - 1.0, 1.0 / c.scale[0] - 1.0),) * 2,
                shear_range=(c.shear, c.shear),
                mode=("bilinear", "nearest"),
                padding_mode="zeros",
            )
        ]
        if c.intensity:
            transforms += [
                RandAdjustContrastd(keys="image", prob=c.intensity_prob, gamma=c.gamma),
                RandScaleIntensityd(keys="image", factors=c.brightness, prob=c.intensity_prob),
                RandGaussianSmoothd(
                    keys="image",
                    prob=c.intensity_prob,
                    sigma_x=c.blur_sigma,
                    sigma_y=c.blur_sigma,
                ),
            ]
        self.transform = Compose(transforms).set_random_state(seed=0)

    def __call__(self, item: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        reseed(self.transform, int(rng.integers(0, 2**31 - 1)))
        data = {"image": item["image"], "labels": item["labels"][None].float()}
        tracking = get_track_meta()
        set_track_meta(False)  # plain tensors in and out: nothing reads the metadata
        try:
            out = self.transform(data)
        finally:
            set_track_meta(tracking)
        # MONAI returns MetaTensors: hand plain tensors on to the training code.
        labels = torch.as_tensor(out["labels"]).as_subclass(torch.Tensor).round().long()[0]
        image = torch.as_tensor(out["image"]).as_subclass(torch.Tensor).float().clamp(0.0, 1.0)
        return {**item, "image": image * (labels != OUTSIDE), "labels": labels}


def reseed(transform: Randomizable, seed: int) -> None:
    """``transform.set_random_state(seed=seed)`` of MONAI without its cost: the same generator
    states, set by re-seeding the ``RandomState`` each random transform already holds (MONAI
    builds new ones). As MONAI does, a ``Compose`` draws each random child's seed from its own
    generator, and a wrapping transform hands its seed on to the random transforms it holds."""
    seed = int(seed) % MAX_SEED
    transform.R.seed(seed)
    if isinstance(transform, Compose):
        for child in transform.transforms:
            if isinstance(child, Randomizable):
                reseed(child, transform.R.randint(MAX_SEED, dtype="uint32"))
        return
    for held in vars(transform).values():
        if isinstance(held, Randomizable) and held is not transform:
            reseed(held, seed)
