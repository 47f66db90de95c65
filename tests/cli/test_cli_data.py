from __future__ import annotations

import json

import zarr
from camus_files import make_camus
from typer.testing import CliRunner

from edmcli.cli import app

runner = CliRunner()


def _one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    text = " ".join(result.output.split())
    for fragment in fragments:
        assert fragment in text, text


def test_prepare_phantom_and_info(tmp_path):
    out = tmp_path / "data" / "phantom.zarr"
    result = runner.invoke(
        app, ["prepare", "--source", "phantom", "--n-patients", "5", "--size", "32", "--out",
              str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "20 images of 5 patients" in result.output
    assert zarr.open_group(str(out), mode="r")["images"].shape == (20, 1, 32, 32)
    result = runner.invoke(app, ["info", str(out)])
    assert result.exit_code == 0 and "A4C/ES" in result.output and "provenance" in result.output
    summary = json.loads(runner.invoke(app, ["info", str(out), "--json"]).output)
    assert summary["samples"] == 20
    _one_line_error(
        runner.invoke(app, ["prepare", "--size", "32", "--n-patients", "1", "--out", str(out)]),
        "already exists", "--overwrite",
    )  # fmt: skip


def test_prepare_camus_via_cli(tmp_path):
    make_camus(tmp_path / "camus", "nifti", n_patients=3)
    out = tmp_path / "c.zarr"
    args = ["prepare", "--source", "camus", "--camus-dir", str(tmp_path / "camus"), "--size",
            "32", "--out", str(out)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "12 images of 3 patients" in result.output and "camus-nifti" in result.output


def test_config_file_and_override(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("size: 16\nn-patients: 3\nsource: phantom\n")
    out = tmp_path / "c.zarr"
    result = runner.invoke(
        app, ["prepare", "--config", str(config), "--n-patients", "2", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "8 images of 2 patients" in result.output and "16×16" in result.output
    config.write_text("sise: 16\n")
    result = runner.invoke(app, ["prepare", "--config", str(config), "--out", str(out)])
    assert result.exit_code != 0 and "unknown option 'sise'" in " ".join(result.output.split())


def test_bad_inputs_fail_cleanly(tmp_path):
    _one_line_error(
        runner.invoke(app, ["prepare", "--source", "camus", "--camus-dir", str(tmp_path / "x"),
                            "--out", str(tmp_path / "o.zarr")]),
        "does not exist",
    )  # fmt: skip
    _one_line_error(
        runner.invoke(app, ["prepare", "--source", "camus", "--out", str(tmp_path / "o.zarr")]),
        "--camus-dir",
    )
    _one_line_error(runner.invoke(app, ["info", str(tmp_path)]), "not a dataset store")
    _one_line_error(
        runner.invoke(app, ["prepare", "--split-ratio", "1:2", "--out", str(tmp_path / "o")]),
        "--split-ratio",
    )
    assert not (tmp_path / "o.zarr").exists()
