from __future__ import annotations

import numpy as np
import pytest
from camus_files import display_pair, write_nifti
from PIL import Image

from edmcli.data.prepare import prepare_from_source
from edmcli.data.sources import folder_source
from edmcli.data.store import DatasetStore
from edmcli.errors import DataError


def _png_pairs(root, names, side_by_side=False):
    img_dir = root if side_by_side else root / "images"
    lab_dir = root if side_by_side else root / "labels"
    img_dir.mkdir(exist_ok=True)
    lab_dir.mkdir(exist_ok=True)
    for k, name in enumerate(names):
        image, labels = display_pair(k)
        Image.fromarray(image).save(img_dir / f"{name}.png")
        Image.fromarray(labels).save(
            lab_dir / (f"{name}_gt.png" if side_by_side else f"{name}.png")
        )


def test_png_pairs_with_metadata_from_names(tmp_path):
    names = [f"case{p}_{v}_{ph}" for p in range(4) for v in ("A2C", "4CH") for ph in ("ED", "ES")]
    _png_pairs(tmp_path, names)
    source = folder_source(tmp_path)
    assert len(source.items) == 16
    assert {i.view for i in source.items} == {"A2C", "A4C"}
    assert {i.patient for i in source.items} == {f"case{p}" for p in range(4)}
    out = tmp_path / "f.zarr"
    result = prepare_from_source(source, out, 32, 0, (0.5, 0.25, 0.25), source_path=tmp_path)
    assert result.patients == 4
    store = DatasetStore(out)
    assert set(np.unique(store.labels[:])) == {0, 1, 2, 3, 4}
    assert np.isnan(store.column("spacing")).all()


def test_side_by_side_files_and_nifti(tmp_path):
    _png_pairs(tmp_path, ["a_A2C_ED", "b_A4C_ES"], side_by_side=True)
    source = folder_source(tmp_path, image_glob="*.png", label_template="{stem}_gt.png")
    assert sorted(i.image.name for i in source.items) == ["a_A2C_ED.png", "b_A4C_ES.png"]
    nii = tmp_path / "nii"
    nii.mkdir()
    image, labels = display_pair(3)
    write_nifti(nii / "x.nii.gz", image)
    write_nifti(nii / "x_seg.nii.gz", labels)
    source = folder_source(nii, image_glob="*.nii.gz", label_template="{stem}_seg.nii.gz")
    assert len(source.items) == 1 and source.items[0].view == "unknown"


def test_missing_label_and_empty_folder(tmp_path):
    _png_pairs(tmp_path, ["a_A2C_ED"])
    (tmp_path / "labels" / "a_A2C_ED.png").unlink()
    with pytest.raises(DataError, match="a_A2C_ED.png has no label file"):
        folder_source(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    source = folder_source(empty)
    with pytest.raises(DataError, match="contains no image/label pairs"):
        prepare_from_source(source, tmp_path / "o.zarr", 32, 0, (1, 0, 0), source_path=empty)
    assert not (tmp_path / "o.zarr").exists()


def test_corrupt_png(tmp_path):
    _png_pairs(tmp_path, ["a_A2C_ED"])
    (tmp_path / "images" / "a_A2C_ED.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    source = folder_source(tmp_path)
    with pytest.raises(DataError, match="a_A2C_ED.png is corrupt or truncated"):
        prepare_from_source(source, tmp_path / "o.zarr", 32, 0, (1, 0, 0), source_path=tmp_path)
