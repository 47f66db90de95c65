from __future__ import annotations

import gzip

import numpy as np
import pytest
from camus_files import SPACING, display_pair, make_camus, write_nifti

from edmcli.data.labels import SECTOR
from edmcli.data.prepare import prepare_from_source
from edmcli.data.sources import camus_source, load_item
from edmcli.data.store import DatasetStore
from edmcli.errors import DataError

RATIO = (0.5, 0.25, 0.25)


@pytest.mark.parametrize("layout", ["nifti", "mhd"])
def test_reader_keeps_display_orientation_spacing_and_labels(tmp_path, layout):
    written = make_camus(tmp_path, layout, n_patients=2)
    source = camus_source(tmp_path)
    assert source.layout == f"camus-{layout}"
    assert len(source.items) == 8
    for item in source.items:
        view = {"A2C": "2CH", "A4C": "4CH"}[item.view]
        image, labels = written[(item.patient, view, item.phase)]
        got_image, got_labels, spacing = load_item(item)
        np.testing.assert_array_equal(got_image, image)  # apex row on top, not transposed
        np.testing.assert_allclose(spacing, SPACING, rtol=1e-6)
        structures = got_labels.copy()
        structures[structures == SECTOR] = 0
        np.testing.assert_array_equal(structures, labels)
        # sector label added from the image, only where the image is non-zero (fan)
        assert np.all(image[got_labels == SECTOR] > 0)
        assert np.all(got_labels[image == 0] != SECTOR)


def test_cfg_metadata_and_official_split(tmp_path):
    make_camus(tmp_path, "nifti", n_patients=6)
    source = camus_source(tmp_path)
    assert source.official_split["patient0005"] == "val"
    assert source.official_split["patient0006"] == "test"
    item = next(i for i in source.items if i.patient == "patient0003" and i.view == "A4C")
    assert item.quality == "medium" and item.ef == 43.0  # (3 + 1) % 3 → Medium
    out = tmp_path / "camus.zarr"
    result = prepare_from_source(source, out, 32, 0, RATIO, source_path=tmp_path)
    assert result.split_counts == {"train": 16, "val": 4, "test": 4}
    store = DatasetStore(out)
    assert store.info["provenance"]["split"] == "official"
    assert set(store.column("patient")[store.indices("test")]) == {"patient0006"}
    assert set(store.column("quality")) <= {"good", "medium", "poor"}
    # spacing scaled by the resize: 40×30 → 32×32
    np.testing.assert_allclose(store.column("spacing")[0], [0.308 * 40 / 32, 0.154 * 30 / 32])
    labels = store.labels[:]
    assert set(np.unique(labels)) <= {0, 1, 2, 3, 4}


def test_old_release_uses_seeded_split_and_skips_unlabelled_testing(tmp_path):
    make_camus(tmp_path, "mhd", n_patients=4)
    test_dir = tmp_path / "testing" / "patient0451"
    test_dir.mkdir(parents=True)
    from camus_files import write_mhd

    write_mhd(test_dir / "patient0451_2CH_ED.mhd", display_pair(0)[0])
    source = camus_source(tmp_path)
    assert source.official_split is None
    assert any("patient0451" in s for s in source.skipped)
    out = tmp_path / "old.zarr"
    result = prepare_from_source(source, out, 24, 0, RATIO, source_path=tmp_path)
    assert result.patients == 4 and sum(result.split_counts.values()) == 16
    assert DatasetStore(out).info["provenance"]["split"] == "seeded"


def test_keep_aspect_pads_instead_of_stretching(tmp_path):
    make_camus(tmp_path, "nifti", n_patients=1, split=False)
    source = camus_source(tmp_path)
    out = tmp_path / "a.zarr"
    prepare_from_source(source, out, 40, 0, (1, 0, 0), keep_aspect=True, source_path=tmp_path)
    store = DatasetStore(out)
    labels = store.labels[0]
    assert np.all(labels[:, :4] == 0) and np.all(labels[:, -4:] == 0)  # 30 wide → padded by 5
    np.testing.assert_allclose(store.column("spacing")[0], SPACING)


# ------------------------------------------------------------------------------- bad input
def test_missing_directory(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        camus_source(tmp_path / "nope")


def test_not_a_camus_folder(tmp_path):
    with pytest.raises(DataError, match="does not look like a CAMUS copy"):
        camus_source(tmp_path)


def test_missing_gt_names_the_file(tmp_path):
    make_camus(tmp_path, "nifti", n_patients=2)
    gt = tmp_path / "database_nifti" / "patient0002" / "patient0002_4CH_ES_gt.nii.gz"
    gt.unlink()
    with pytest.raises(DataError, match="patient0002_4CH_ES.nii.gz has no label file"):
        camus_source(tmp_path)


def test_truncated_nifti(tmp_path):
    make_camus(tmp_path, "nifti", n_patients=1, split=False)
    path = tmp_path / "database_nifti" / "patient0001" / "patient0001_2CH_ED.nii.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw)[: len(gzip.compress(raw)) // 2])
    source = camus_source(tmp_path)
    with pytest.raises(DataError, match="patient0001_2CH_ED.nii.gz is corrupt or truncated"):
        prepare_from_source(source, tmp_path / "o.zarr", 32, 0, RATIO, source_path=tmp_path)
    assert not (tmp_path / "o.zarr").exists()


def test_truncated_raw(tmp_path):
    make_camus(tmp_path, "mhd", n_patients=1)
    raw = tmp_path / "training" / "patient0001" / "patient0001_4CH_ES.raw"
    raw.write_bytes(raw.read_bytes()[:100])
    source = camus_source(tmp_path)
    item = next(i for i in source.items if i.image.name == "patient0001_4CH_ES.mhd")
    with pytest.raises(DataError, match="patient0001_4CH_ES.mhd is corrupt or truncated"):
        load_item(item)


def test_label_values_outside_convention(tmp_path):
    make_camus(tmp_path, "nifti", n_patients=1, split=False)
    path = tmp_path / "database_nifti" / "patient0001" / "patient0001_2CH_ES_gt.nii.gz"
    labels = display_pair(1)[1]
    labels[0, 0] = 7
    write_nifti(path, labels)
    source = camus_source(tmp_path)
    item = next(i for i in source.items if i.label == path)
    with pytest.raises(DataError, match=r"_2CH_ES_gt.nii.gz has label values \[7\]"):
        load_item(item)


def test_image_and_label_shapes_differ(tmp_path):
    make_camus(tmp_path, "nifti", n_patients=1, split=False)
    path = tmp_path / "database_nifti" / "patient0001" / "patient0001_4CH_ED_gt.nii.gz"
    write_nifti(path, np.zeros((30, 30), np.uint8))
    source = camus_source(tmp_path)
    item = next(i for i in source.items if i.label == path)
    with pytest.raises(DataError, match="has shape .* but its image"):
        load_item(item)


def test_incomplete_official_split(tmp_path):
    make_camus(tmp_path, "nifti", n_patients=3)
    (tmp_path / "database_split" / "subgroup_testing.txt").unlink()
    with pytest.raises(DataError, match="subgroup_testing.txt is missing"):
        camus_source(tmp_path)
