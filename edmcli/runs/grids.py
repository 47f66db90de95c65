"""PNG grids of images (rows of a batch each), for reconstructions and samples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def save_image_grid(rows: list[torch.Tensor], path: Path, pad: int = 2) -> Path:
    """Each tensor (N, 1, H, W) in [0, 1] becomes one row of the grid."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = [r.detach().float().clamp(0, 1).cpu().numpy()[:, 0] for r in rows]
    n = max(a.shape[0] for a in arrays)
    h, w = arrays[0].shape[1:]
    grid = np.zeros((len(arrays) * (h + pad) - pad, n * (w + pad) - pad), dtype=np.float32)
    for r, a in enumerate(arrays):
        for c, image in enumerate(a):
            grid[r * (h + pad) : r * (h + pad) + h, c * (w + pad) : c * (w + pad) + w] = image
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray((grid * 255).round().astype(np.uint8)).save(tmp, format="PNG")
    tmp.replace(path)
    return path
