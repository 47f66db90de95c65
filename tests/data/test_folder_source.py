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


# ------------------------------------------------------------------- grey levels wider than 8 bits
SIDE = 64  # images written at the store's size: no resampling, values compared exactly


def _labels(side=SIDE):
    """CAMUS labels {0, 1, 2, 3}; the sector (4) comes from the image, non-zero everywhere."""
    labels = np.zeros((side, side), np.uint8)
    labels[10:30, 20:40] = 1
    labels[10:30, 16:20] = 2
    labels[30:40, 22:38] = 3
    return labels


def _speckle(top, seed, n_top=20, side=SIDE):
    """Values 1..0.9·top, and ``n_top`` pixels (0.5 % of 64²) at ``top``."""
    image = np.random.default_rng(seed).integers(1, int(top * 0.9), (side, side))
    image.flat[:n_top] = top
    return image


def _write_pairs(root, images, labels=None):
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    for k, image in enumerate(images):
        Image.fromarray(image).save(root / "images" / f"p{k}_A2C_ED.png")
        Image.fromarray(_labels() if labels is None else labels).save(
            root / "labels" / f"p{k}_A2C_ED.png"
        )


def _prepared(root):
    source = folder_source(root)
    out = root / "out.zarr"
    prepare_from_source(source, out, SIDE, 0, (1, 0, 0), source_path=root)
    store = DatasetStore(out)
    order = np.argsort([int(p[1:]) for p in store.column("patient")])
    return store.images[:][order, 0], store.labels[:][order], source


@pytest.mark.parametrize("top", [4095, 65535])
def test_16_bit_png_is_scaled_not_clipped(tmp_path, top):
    images = [_speckle(top, 0).astype(np.uint16), _speckle(top // 2, 1).astype(np.uint16)]
    _write_pairs(tmp_path, images)
    with Image.open(tmp_path / "images" / "p0_A2C_ED.png") as png:
        assert png.mode in ("I;16", "I")  # really a 16-bit file
    got, _, source = _prepared(tmp_path)
    white = 2 ** int(top).bit_length() - 1
    for src, out in zip(images, got, strict=True):
        # one factor for the source: the half-bright image stays half as bright
        np.testing.assert_array_equal(out, np.rint(src * (255 / white)).astype(np.uint8))
        assert (out == 255).mean() < 0.01  # the source had 0.5 % of its pixels at its max
        order = np.argsort(src, axis=None, kind="stable")
        assert np.all(np.diff(out.ravel()[order].astype(int)) >= 0)  # grey-level order kept
    assert got[0].max() == 255 and got[1].max() == round(top // 2 * 255 / white)
    assert len(source.grey_levels.notes) == 1
    assert f"scaled by 255/{white}" in source.grey_levels.notes[0]


def test_8_bit_png_and_16_bit_png_of_8_bit_values_are_unchanged(tmp_path):
    image = _speckle(255, 2).astype(np.uint8)
    _write_pairs(tmp_path / "a", [image])
    _write_pairs(tmp_path / "b", [image.astype(np.uint16)])
    for root in (tmp_path / "a", tmp_path / "b"):
        got, _, source = _prepared(root)
        np.testing.assert_array_equal(got[0], image)
        assert source.grey_levels.notes == []


def test_16_bit_label_png_is_read_as_class_ids(tmp_path):
    labels = _labels()
    labels[0:5, 0:5] = 4
    _write_pairs(tmp_path, [_speckle(4095, 3).astype(np.uint16)], labels.astype(np.uint16))
    with Image.open(tmp_path / "labels" / "p0_A2C_ED.png") as png:
        assert png.mode in ("I;16", "I")
    _, got, _ = _prepared(tmp_path)
    np.testing.assert_array_equal(got[0], labels)  # already 5-class: kept as it is


def _nifti_pair(root, image):
    root.mkdir(parents=True, exist_ok=True)
    write_nifti(root / "x_A4C_ES.nii.gz", image)
    write_nifti(root / "x_A4C_ES_seg.nii.gz", _labels())
    return folder_source(root, image_glob="*.nii.gz", label_template="{stem}_seg.nii.gz")


def test_float_image_in_0_1_is_multiplied_by_255(tmp_path):
    levels = _speckle(255, 4).astype(np.uint8)
    source = _nifti_pair(tmp_path, levels.astype(np.float32) / 255)
    prepare_from_source(source, tmp_path / "o.zarr", SIDE, 0, (1, 0, 0), source_path=tmp_path)
    np.testing.assert_array_equal(DatasetStore(tmp_path / "o.zarr").images[0, 0], levels)
    assert "multiplied by 255" in source.grey_levels.notes[0]


@pytest.mark.parametrize(
    ("value", "message"),
    [(np.nan, r"x_A4C_ES.nii.gz contains NaN or infinite values"),
     (-3.5, r"x_A4C_ES.nii.gz has float values in \[-3.5, 200\]: expected grey levels in 0..1"),
     (1000.0, r"x_A4C_ES.nii.gz has float values in \[0.5, 1000\]: expected")],
)  # fmt: skip
def test_float_image_refused_in_one_line(tmp_path, value, message):
    image = np.full((SIDE, SIDE), 0.5, np.float32)
    image[5, 5], image[6, 6] = value, 200.0 if value < 0 else 0.5
    source = _nifti_pair(tmp_path, image)
    with pytest.raises(DataError, match=message) as err:
        prepare_from_source(source, tmp_path / "o.zarr", SIDE, 0, (1, 0, 0), source_path=tmp_path)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "o.zarr").exists()


def test_prepare_prints_the_rescaling(tmp_path, capsys):
    from edmcli.data.prepare import prepare

    _write_pairs(tmp_path, [_speckle(4095, 5).astype(np.uint16)])
    prepare(tmp_path / "o.zarr", source="folder", folder=tmp_path, size=SIDE)
    out = capsys.readouterr().out
    assert "note: 1 of 1 images hold integer values up to 4095" in out
    assert "scaled by 255/4095 (the 12-bit range)" in out
