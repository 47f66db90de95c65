"""The label convention shared by every store and every model, and the sector mask.

| id | meaning |
|----|---------|
| 0  | outside the ultrasound sector (padding) |
| 1  | LV endocardium (cavity), CAMUS 1 |
| 2  | LV myocardium, CAMUS 2 |
| 3  | left atrium, CAMUS 3 |
| 4  | inside the sector, no labelled structure |
"""

from __future__ import annotations

import numpy as np
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
    connected component kept (DESIGN.md). An all-zero image gives an all-false mask."""
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
