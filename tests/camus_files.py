"""Writers of tiny CAMUS-like folders in both release layouts, for the reader tests.

An image's display orientation is (rows = depth from the probe, cols = lateral); the NIfTI
release stores its transpose (x first), the .mhd/.raw release stores display order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SPACING = (0.308, 0.154)  # (row, col) mm, unequal to catch swapped axes


def display_pair(seed: int, h: int = 40, w: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """A fan-shaped image (apex at the top row) and CAMUS labels {0,1,2,3} inside it."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:h, 0:w]
    fan = np.abs(cols - w / 2) <= rows * 0.6 + 1
    image = np.where(fan, rng.integers(20, 255, (h, w)), 0).astype(np.uint8)
    labels = np.zeros((h, w), np.uint8)
    labels[8:20, w // 2 - 3 : w // 2 + 3] = 1
    labels[8:20, w // 2 - 5 : w // 2 - 3] = 2
    labels[8:20, w // 2 + 3 : w // 2 + 5] = 2
    labels[20:28, w // 2 - 4 : w // 2 + 4] = 3
    return image, labels


def write_nifti(path: Path, display: np.ndarray) -> None:
    import nibabel as nib

    affine = np.diag([SPACING[1], SPACING[0], 1.0, 1.0])
    nib.save(nib.Nifti1Image(np.ascontiguousarray(display.T), affine), str(path))


def write_mhd(path: Path, display: np.ndarray) -> None:
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(display[None])
    image.SetSpacing((SPACING[1], SPACING[0], 1.0))
    sitk.WriteImage(image, str(path))


CFG = "ED: 1\nES: 12\nNbFrame: 20\nSex: F\nAge: 61\nImageQuality: {q}\nEF: {ef}\nFrameRate: 30\n"


def make_camus(
    root: Path, layout: str, n_patients: int = 6, split: bool = True, first: int = 1
) -> dict[tuple[str, str, str], tuple[np.ndarray, np.ndarray]]:
    """Write a CAMUS copy; returns {(patient, view, phase): (display image, labels)}."""
    written = {}
    if layout == "nifti":
        base, suffix, writer = root / "database_nifti", ".nii.gz", write_nifti
    else:
        base, suffix, writer = root / "training", ".mhd", write_mhd
    for k in range(first, first + n_patients):
        patient = f"patient{k:04d}"
        folder = base / patient
        folder.mkdir(parents=True)
        for v, view in enumerate(("2CH", "4CH")):
            quality = ("Good", "Medium", "Poor")[(k + v) % 3]
            (folder / f"Info_{view}.cfg").write_text(CFG.format(q=quality, ef=40 + k))
            for p, phase in enumerate(("ED", "ES")):
                image, labels = display_pair(seed=k * 10 + v * 2 + p)
                writer(folder / f"{patient}_{view}_{phase}{suffix}", image)
                writer(folder / f"{patient}_{view}_{phase}_gt{suffix}", labels)
                written[(patient, view, phase)] = (image, labels)
    if layout == "nifti" and split:
        split_dir = root / "database_split"
        split_dir.mkdir()
        ids = [f"patient{k:04d}" for k in range(first, first + n_patients)]
        (split_dir / "subgroup_training.txt").write_text("\n".join(ids[:-2]) + "\n")
        (split_dir / "subgroup_validation.txt").write_text(ids[-2] + "\n")
        (split_dir / "subgroup_testing.txt").write_text(ids[-1] + "\n")
    return written
