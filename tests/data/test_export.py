"""``echo-synth export``: nnU-Net v2 layout, NIfTI/PNG pairs that round-trip through prepare."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from edmcli.cli import app
from edmcli.data.card import CARD_FILE
from edmcli.data.export import NNUNET_ENDING, nnunet_labels
from edmcli.data.store import DatasetStore
from edmcli.data.store_format import ATTRS_KEY

runner = CliRunner()


def _ok(args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def _key(store: DatasetStore, i: int) -> tuple[str, str, str]:
    return store.column("patient")[i], store.column("view")[i], store.column("phase")[i]


@pytest.mark.parametrize("fmt, ending", [("png", "png"), ("nifti", "nii.gz")])
def test_pairs_round_trip_through_prepare_folder_exactly(phantom_store, tmp_path, fmt, ending):
    out = tmp_path / fmt
    _ok(["export", phantom_store, "--format", fmt, "--out", out])
    original = DatasetStore(phantom_store)
    assert (out / CARD_FILE).is_file()
    with (out / "samples.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(original)
    assert [r["patient"] for r in rows] == original.column("patient").tolist()
    assert [r["split"] for r in rows] == original.column("split").tolist()
    back = tmp_path / "back.zarr"
    _ok(["prepare", "--source", "folder", "--folder", out, "--image-glob",
         f"images/*.{ending}", "--label-template", f"labels/{{stem}}.{ending}", "--size", "32",
         "--out", back])  # fmt: skip
    again = DatasetStore(back)
    assert len(again) == len(original)
    where = {_key(original, i): i for i in range(len(original))}
    for j in range(len(again)):
        i = where[_key(again, j)]  # patient, view and phase read back from the file names
        np.testing.assert_array_equal(again.images[j], original.images[i])
        np.testing.assert_array_equal(again.labels[j], original.labels[i])
    if fmt == "nifti":  # NIfTI also keeps the pixel size
        np.testing.assert_allclose(again.column("spacing")[0], original.column("spacing")[0])


def _check_nnunet_layout(out, store: DatasetStore, sector_ignore: bool) -> None:
    """nnU-Net v2's documented raw format (dataset_format.md): imagesTr/CASE_XXXX.ENDING per
    channel, labelsTr/CASE.ENDING, dataset.json with channel_names, labels (background 0,
    consecutive integers, 'ignore' the highest), numTraining, file_ending."""
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["channel_names"] == {"0": "echo"}
    labels = dataset["labels"]
    assert labels["background"] == 0
    assert sorted(labels.values()) == list(range(len(labels)))
    assert ("ignore" in labels) == sector_ignore
    if sector_ignore:
        assert labels["ignore"] == max(labels.values())
    assert dataset["file_ending"] == NNUNET_ENDING
    train = store.indices(["train", "val"])
    test = store.indices("test")
    assert dataset["numTraining"] == len(train)
    for images, labels_dir, rows in (
        ("imagesTr", "labelsTr", train),
        ("imagesTs", "labelsTs", test),
    ):
        cases = sorted(p.name[: -len(NNUNET_ENDING)] for p in (out / labels_dir).iterdir())
        assert len(cases) == len(rows)
        channels = sorted(p.name for p in (out / images).iterdir())
        assert channels == [f"{c}_0000{NNUNET_ENDING}" for c in cases]
    with (out / "cases.csv").open() as fh:
        table = {r["case"]: r for r in csv.DictReader(fh)}
    for case, row in table.items():
        i = int(row["row"])
        image = nib.load(out / row["image"])
        label = nib.load(out / row["label"])
        assert image.shape == label.shape and np.allclose(image.affine, label.affine)
        np.testing.assert_array_equal(np.asarray(image.dataobj).T, store.images[i][0])
        values = np.asarray(label.dataobj).T
        np.testing.assert_array_equal(values, nnunet_labels(store.labels[i], sector_ignore))
        assert set(np.unique(values)) <= set(labels.values())
        assert row["split"] == store.column("split")[i] and case.endswith(f"{i:06d}")


@pytest.mark.parametrize("sector_ignore", [False, True])
def test_nnunet_layout_follows_the_documented_format(phantom_store, tmp_path, sector_ignore):
    out = tmp_path / "Dataset501_Echo"
    _ok(["export", phantom_store, "--format", "nnunet", "--out", out,
         *(["--sector-ignore"] if sector_ignore else [])])  # fmt: skip
    _check_nnunet_layout(out, DatasetStore(phantom_store), sector_ignore)
    # label 4 (inside the sector, nothing labelled) is background; outside: 0 or ignore
    labels = np.array([[0, 1, 2], [3, 4, 4]], dtype=np.uint8)
    np.testing.assert_array_equal(nnunet_labels(labels, False), [[0, 1, 2], [3, 0, 0]])
    np.testing.assert_array_equal(nnunet_labels(labels, True), [[4, 1, 2], [3, 0, 0]])


def test_bad_inputs_are_one_line_and_write_nothing(phantom_store, tmp_path):
    def refused(args, text):
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code == 2, result.output
        assert text in result.output and "Traceback" not in result.output

    out = tmp_path / "out"
    refused(
        ["export", phantom_store, "--format", "dicom", "--out", out], "--format 'dicom' is unknown"
    )
    refused(["export", phantom_store, "--format", "png", "--sector-ignore", "--out", out],
            "--sector-ignore applies to --format nnunet only")  # fmt: skip
    assert not out.exists() and not (tmp_path / ".out.partial").exists()
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    refused(["export", phantom_store, "--format", "png", "--out", out], "is not an empty folder")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    refused(["export", phantom_store, "--format", "png", "--out", phantom_store / "x"],
            "is inside the store")  # fmt: skip
    incomplete = tmp_path / "incomplete.zarr"
    shutil.copytree(phantom_store, incomplete)
    group = zarr.open_group(str(incomplete), mode="r+")
    group.attrs[ATTRS_KEY] = {**group.attrs[ATTRS_KEY], "complete": False}
    refused(["export", incomplete, "--format", "png", "--out", tmp_path / "o2"], "incomplete")
    refused(["export", tmp_path / "missing.zarr", "--format", "png", "--out", tmp_path / "o3"],
            "does not exist")  # fmt: skip
    # an empty folder is fine
    empty = tmp_path / "empty"
    empty.mkdir()
    _ok(["export", phantom_store, "--format", "png", "--out", empty])
    assert (empty / "samples.csv").is_file()


@pytest.mark.slow
def test_nnunet_accepts_the_layout_in_its_integrity_check(phantom_store, tmp_path):
    """nnU-Net's own check (nnUNetv2_plan_and_preprocess --verify_dataset_integrity), when the
    package is installed (``pip install -e ".[nnunet]"``; not in ``test``: ~400 MB more).
    Passed with nnunetv2 2.8.1, 2026-12-07."""
    if importlib.util.find_spec("nnunetv2") is None:
        pytest.skip("nnunetv2 is not installed (pip install -e '.[nnunet]' runs nnU-Net's check)")
    raw = tmp_path / "raw"
    _ok(["export", phantom_store, "--format", "nnunet", "--out", raw / "Dataset501_Echo"])
    env = {**os.environ, "nnUNet_raw": str(raw), "nnUNet_preprocessed": str(tmp_path / "pre"),
           "nnUNet_results": str(tmp_path / "results")}  # fmt: skip
    code = ("from nnunetv2.experiment_planning.plan_and_preprocess_api import "
            "extract_fingerprints; extract_fingerprints([501], check_dataset_integrity=True, "
            "num_processes=1)")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert (tmp_path / "pre" / "Dataset501_Echo" / "dataset_fingerprint.json").is_file()
