"""Paired augmentation of (image, label map) items from MONAI transforms, seeded per item.

Geometric transforms move image and labels together (bilinear / nearest) and fill with label 0
(outside the sector); intensity transforms touch the image only and keep it in [0, 1] and zero
outside the sector. The VAE and the segmenter use both; diffusion models only the geometric
ones (no colour changes, as the paper).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.transforms import (
    Compose,
    RandAdjustContrastd,
    RandAffined,
    RandGaussianSmoothd,
    RandScaleIntensityd,
)

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
        self.transform = Compose(transforms)

    def __call__(self, item: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        self.transform.set_random_state(seed=int(rng.integers(0, 2**31 - 1)))
        data = {"image": item["image"], "labels": item["labels"][None].float()}
        out = self.transform(data)
        # MONAI returns MetaTensors: hand plain tensors on to the training code.
        labels = torch.as_tensor(out["labels"]).as_subclass(torch.Tensor).round().long()[0]
        image = torch.as_tensor(out["image"]).as_subclass(torch.Tensor).float().clamp(0.0, 1.0)
        return {**item, "image": image * (labels != OUTSIDE), "labels": labels}
