"""The plan of ``prepare``: every refusal before a file is written, and the plan is what the
stage writes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import zarr

from edmcli.data.prepare import prepare, run_prepare
from edmcli.data.prepare_plan import MAX_SIZE, plan_prepare
from edmcli.errors import DataError


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _folder_source(root: Path, n: int = 2, label: bool = True) -> Path:
    """``root/images/pNN_A2C_ED.png`` with their label maps (``label``: for all of them)."""
    from PIL import Image

    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for k in range(n):
        stem = f"p{k:02d}_A2C_ED"
        image = np.zeros((20, 20), np.uint8)
        image[2:18, 2:18] = 100
        Image.fromarray(image).save(root / "images" / f"{stem}.png")
        if label:
            labels = np.zeros((20, 20), np.uint8)
            labels[5:10, 5:10] = 1
            Image.fromarray(labels).save(root / "labels" / f"{stem}.png")
    return root


def _refusal(tmp_path: Path, **kwargs) -> str:
    before = _files(tmp_path)
    with pytest.raises(DataError) as info:
        plan_prepare(tmp_path / "out.zarr", **kwargs)
    assert _files(tmp_path) == before  # a refusal writes nothing either
    return str(info.value)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"source": "dicom"}, "source 'dicom' is unknown; choose from phantom, camus, folder"),
        ({"split_ratio": "8:1"}, "--split-ratio '8:1' must be three non-negative numbers"),
        ({"n_patients": 0}, "--n-patients must be at least 1"),
        ({"size": 15}, "--size must be at least 16, got 15"),
        ({"size": MAX_SIZE + 1}, f"--size {MAX_SIZE + 1} is larger than {MAX_SIZE}"),
        ({"n_patients": 4, "split_ratio": "2:49:49"}, "leaves no training patient out of 4"),
        ({"source": "camus"}, "the camus source needs its folder (--camus-dir DIR)"),
        ({"source": "folder"}, "the folder source needs its root (--folder DIR)"),
    ],
)
def test_argument_refusals(tmp_path, kwargs, message):
    assert message in _refusal(tmp_path, **{"size": 16, **kwargs})


def test_existing_output_is_refused_before_any_source_is_read(tmp_path):
    out = tmp_path / "out.zarr"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    # the existing output is refused first, although the camus folder is missing too
    message = _refusal(tmp_path, source="camus", camus_dir=tmp_path / "nowhere")
    assert f"{out} already exists; pass --overwrite to replace it" in message
    message = _refusal(tmp_path, source="camus", camus_dir=tmp_path / "nowhere", overwrite=True)
    assert f"--overwrite refuses to delete {out}:" in message
    # the source comes before the split ratio and the split ratio before the output
    assert "unknown" in _refusal(tmp_path, source="dicom", split_ratio="x")
    assert "--split-ratio" in _refusal(tmp_path, split_ratio="x")


def test_camus_refusals(tmp_path):
    from camus_files import make_camus

    nowhere = tmp_path / "nowhere"
    assert f"CAMUS directory {nowhere} does not exist" in _refusal(
        tmp_path, source="camus", camus_dir=nowhere, size=16
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "does not look like a CAMUS copy" in _refusal(
        tmp_path, source="camus", camus_dir=empty, size=16
    )
    root = tmp_path / "camus"
    make_camus(root, "nifti", n_patients=3)  # split files name patients 1-3
    make_camus(root, "nifti", n_patients=1, split=False, first=9)  # in none of them
    message = _refusal(tmp_path, source="camus", camus_dir=root, size=16)
    assert f"patient patient0009 is in none of the official split files of {root}" in message


def test_folder_refusals(tmp_path):
    nowhere = tmp_path / "nowhere"
    assert f"folder {nowhere} does not exist" in _refusal(
        tmp_path, source="folder", folder=nowhere, size=16
    )
    root = _folder_source(tmp_path / "pairs")
    assert "--meta-pattern is not a valid regular expression" in _refusal(
        tmp_path, source="folder", folder=root, meta_pattern="(", size=16
    )
    assert "contains no image/label pairs" in _refusal(
        tmp_path, source="folder", folder=root, image_glob="*.jpg", size=16
    )
    assert "--size must be at least 16, got 8" in _refusal(
        tmp_path, source="folder", folder=root, size=8
    )
    assert f"--size {MAX_SIZE * 2} is larger" in _refusal(
        tmp_path, source="folder", folder=root, size=MAX_SIZE * 2
    )
    unlabelled = _folder_source(tmp_path / "unlabelled", label=False)
    assert "has no label file: expected" in _refusal(
        tmp_path, source="folder", folder=unlabelled, size=16
    )


def test_phantom_plan_writes_nothing_and_is_what_prepare_writes(tmp_path):
    out = tmp_path / "deep" / "store.zarr"
    plan = plan_prepare(out, size=16, n_patients=3, seed=4, split_ratio="1:1:1")
    assert _files(tmp_path) == []
    assert plan.samples == 12 and plan.layout == "phantom" and not plan.replaces
    assert plan.split_counts == {"train": 4, "val": 4, "test": 4}
    assert any("12 images of 3 patients at 16×16" in line for line in plan.describe())
    result = run_prepare(plan)
    assert (result.samples, result.patients, result.split_counts) == (12, 3, plan.split_counts)
    group = zarr.open_group(str(out), mode="r")
    patients, splits = group["patient"][:].tolist(), group["split"][:].tolist()
    assert sorted(set(patients)) == list(plan.patients)
    assert all(plan.split[p] == s for p, s in zip(patients, splits, strict=True))
    # the stage function is plan then run: the same store again, now replacing the first
    again = plan_prepare(out, size=16, n_patients=3, seed=4, split_ratio="1:1:1", overwrite=True)
    assert again.replaces and again.split == plan.split
    second = prepare(out, size=16, n_patients=3, seed=4, split_ratio="1:1:1", overwrite=True)
    assert second == result
    assert np.array_equal(zarr.open_group(str(out), mode="r")["images"][:], group["images"][:])


def test_folder_plan_writes_nothing_and_is_what_the_stage_writes(tmp_path):
    root = _folder_source(tmp_path / "pairs", n=3)
    before = _files(tmp_path)
    out = tmp_path / "store.zarr"
    plan = plan_prepare(out, source="folder", folder=root, size=16, split_ratio="1:1:1")
    assert _files(tmp_path) == before and not os.path.exists(out)
    assert plan.layout == "folder" and plan.samples == 3 and plan.split_kind == "seeded"
    assert plan.provenance["path"] == str(root.resolve())
    result = run_prepare(plan)
    assert result.layout == "folder" and result.split_counts == plan.split_counts
