"""The label convention shared by every store and every model, and the sector mask.

| id | meaning |
|----|---------|
| 0  | outside the ultrasound sector (padding) |
| 1  | LV endocardium (cavity), CAMUS 1 |
| 2  | LV myocardium, CAMUS 2 |
| 3  | left atrium, CAMUS 3 |
| 4  | inside the sector, no labelled structure |

Label maps at another size than the store's (a latent, a UNet level, a downstream network) follow
one rule, :func:`label_fractions`: each class's one-hot channel is **area-averaged** over the
pixels a target pixel covers (``F.interpolate(mode="area")``; block averages for integer
factors, replication when enlarging). From it:

* :func:`label_onehot` — the SPADE input: class fractions per pixel (exactly one-hot at the
  store's size, partial-volume fractions summing to 1 when smaller);
* :func:`sector_mask` — a target pixel is in the sector when at least half of it is (the
  Γ-VAE's latent sector, the diffusion losses' mask and the outside of decoded images agree);
* :func:`resize_label_map` — the majority class (ties to the lower id), for integer targets.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

OUTSIDE, LV, MYO, LA, SECTOR = 0, 1, 2, 3, 4
NUM_CLASSES = 5
LABEL_NAMES: dict[int, str] = {
    OUTSIDE: "outside",
    LV: "lv_endocardium",
    MYO: "lv_myocardium",
    LA: "left_atrium",
    SECTOR: "sector",
}
VIEWS = ("A2C", "A4C")
PHASES = ("ED", "ES")
SPLITS = ("train", "val", "test")


def invalid_label_values(labels: np.ndarray, allowed: int = NUM_CLASSES) -> list[int]:
    """Sorted label values of ``labels`` that are not in ``0..allowed-1``."""
    values = np.unique(labels)
    return [int(v) for v in values if v < 0 or v >= allowed]


def sector_from_image(image: np.ndarray, threshold: float = 0) -> np.ndarray:
    """Boolean sector mask of a B-mode image: pixels above ``threshold``, holes filled, largest
    connected component kept (docs/design.md). An all-zero image gives an all-false mask."""
    mask = ndimage.binary_fill_holes(np.asarray(image) > threshold)
    components, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    mask = components == int(np.argmax(sizes))
    # Speckle drop-outs inside the fan are holes of the largest component: fill them again.
    return ndimage.binary_fill_holes(mask)


def add_sector_label(camus_labels: np.ndarray, sector: np.ndarray) -> np.ndarray:
    """CAMUS-style labels {0,1,2,3} → the 5-class convention: unlabelled pixels inside the
    sector become 4; labelled structures are kept even where the thresholded sector misses them."""
    out = np.asarray(camus_labels, dtype=np.uint8).copy()
    out[(out == OUTSIDE) & sector] = SECTOR
    return out


def resize_fractions(maps: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """The one resize rule for label-derived maps: area averaging of (N, C, H, W) float maps to
    ``size`` (identity at equal size)."""
    target = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(maps.shape[-2:]) == target:
        return maps
    return F.interpolate(maps, size=target, mode="area")


def label_fractions(
    labels: torch.Tensor, size: int | tuple[int, int] | None = None, num_classes: int = NUM_CLASSES
) -> torch.Tensor:
    """(N, H, W) integer label maps → (N, num_classes, size, size) float32 class fractions."""
    if labels.ndim != 3:
        raise ValueError(f"labels must be shaped (N, H, W), got {tuple(labels.shape)}.")
    classes = torch.arange(num_classes, device=labels.device, dtype=labels.dtype)
    onehot = (labels[:, None] == classes[None, :, None, None]).to(torch.float32)
    return onehot if size is None else resize_fractions(onehot, size)


def label_onehot(
    labels: torch.Tensor,
    size: int | tuple[int, int] | None = None,
    num_classes: int = NUM_CLASSES,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """SPADE's input: :func:`label_fractions` in ``dtype``."""
    return label_fractions(labels, size, num_classes).to(dtype)


def mask_at(mask: torch.Tensor, size: int | tuple[int, int] | None = None) -> torch.Tensor:
    """A (N, 1, H, W) bool or {0, 1} mask at ``size``: in when at least half of a target pixel
    is (:func:`resize_fractions` ≥ 0.5); float32 (or the mask's float dtype)."""
    if mask.ndim != 4 or mask.shape[1] != 1:
        raise ValueError(f"mask must be shaped (N, 1, H, W), got {tuple(mask.shape)}.")
    values = mask if mask.is_floating_point() else mask.to(torch.float32)
    if size is None:
        return (values >= 0.5).to(values.dtype)
    return (resize_fractions(values, size) >= 0.5).to(values.dtype)


def sector_mask(labels: torch.Tensor, size: int | tuple[int, int] | None = None) -> torch.Tensor:
    """(N, H, W) label maps → (N, 1, size, size) float32 {0, 1} sector mask (label ≠ 0) at
    ``size`` (default: the maps' own size) under the one rule."""
    if labels.ndim != 3:
        raise ValueError(f"labels must be shaped (N, H, W), got {tuple(labels.shape)}.")
    return mask_at((labels != OUTSIDE)[:, None], size)


def resize_label_map(labels: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """(N, H, W) integer label maps at ``size``: the majority class of each target pixel."""
    target = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(labels.shape[-2:]) == target:
        return labels
    return label_fractions(labels, target).argmax(dim=1).to(labels.dtype)
