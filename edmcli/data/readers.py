"""Reading one 2-D image or label file (NIfTI, MetaImage .mhd/.raw, PNG) into display orientation.

Every reader returns ``(array (H, W), spacing (row, col) in mm or NaN)`` with row 0 at the top of
the displayed image (the probe's apex, for echo), or raises a DataError naming the file.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from edmcli.errors import DataError

NAN_SPACING = (math.nan, math.nan)


def strip_suffix(path: Path) -> str:
    """File name without its image suffix (``.nii.gz`` counts as one suffix)."""
    name = path.name
    for suffix in (".nii.gz", ".nii", ".mhd", ".png", ".PNG"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def read_2d(path: Path) -> tuple[np.ndarray, tuple[float, float]]:
    """Read a 2-D image or label file by its suffix."""
    name = path.name.lower()
    if not path.is_file():
        raise DataError(f"{path} does not exist")
    if name.endswith((".nii", ".nii.gz")):
        return _read_nifti(path)
    if name.endswith(".mhd"):
        return _read_mhd(path)
    if name.endswith(".png"):
        return _read_png(path), NAN_SPACING
    raise DataError(f"{path} has an unsupported format (use .nii, .nii.gz, .mhd or .png)")


def _as_2d(array: np.ndarray, path: Path) -> np.ndarray:
    array = np.squeeze(np.asarray(array))
    if array.ndim != 2:
        raise DataError(f"{path} is not a 2-D image (shape {tuple(array.shape)})")
    return array


def _read_nifti(path: Path) -> tuple[np.ndarray, tuple[float, float]]:
    """NIfTI stores the first axis as x (columns): CAMUS images display as the transpose."""
    import nibabel as nib

    try:
        image = nib.load(str(path))
        data = np.asarray(image.dataobj)
        zooms = image.header.get_zooms()
    except Exception as exc:  # nibabel raises many types for damaged files
        raise DataError(f"{path} is corrupt or truncated ({_reason(exc)})") from None
    data = _as_2d(data, path).T
    sx = float(zooms[0]) if len(zooms) > 0 else math.nan
    sy = float(zooms[1]) if len(zooms) > 1 else math.nan
    return data, (sy, sx)


def _read_mhd(path: Path) -> tuple[np.ndarray, tuple[float, float]]:
    """MetaImage: SimpleITK's array is already (z, y, x), i.e. display rows first."""
    import SimpleITK as sitk

    try:
        image = sitk.ReadImage(str(path))
        data = sitk.GetArrayFromImage(image)
        spacing = image.GetSpacing()
    except Exception as exc:  # SimpleITK raises RuntimeError with a long multi-line text
        raise DataError(f"{path} is corrupt or truncated ({_reason(exc)})") from None
    return _as_2d(data, path), (float(spacing[1]), float(spacing[0]))


def _read_png(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            if image.mode not in ("L", "I", "I;16", "P", "F"):
                image = image.convert("L")
            return _as_2d(np.asarray(image), path)
    except (OSError, UnidentifiedImageError, SyntaxError) as exc:
        raise DataError(f"{path} is corrupt or truncated ({_reason(exc)})") from None


def _reason(exc: Exception) -> str:
    """The first line of an exception's text, for one-line messages."""
    text = str(exc).strip().splitlines()
    first = next((line.strip() for line in text if line.strip()), type(exc).__name__)
    return first[:160]
