"""Every command is thin: bad input becomes one line and exit 2, demo included."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from edmcli.cli import app

runner = CliRunner()


def _one_line_error(args, *expected):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def test_demo_out_is_a_file(tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    _one_line_error(["demo", "--out", target], "is a file")
    assert target.read_text() == "keep me"


def test_demo_too_few_patients(tmp_path):
    _one_line_error(["demo", "--out", tmp_path / "d", "--n-patients", "2"], "at least 10")
    assert not (tmp_path / "d").exists()


def test_sample_needs_a_model_or_a_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _one_line_error(["sample"], "--model", "--run")
    _one_line_error(["sample", "--model", "edm-l32"], "edm-l32", "valid: sdm")
    _one_line_error(["sample", "--run", tmp_path / "none"], "no trained run at", "--model")


def test_user_text_is_printed_without_markup(tmp_path):
    odd = tmp_path / "[old] :smile: [/]"
    line = _one_line_error(["info", odd])
    assert "[old] :smile: [/]" in line


def test_paths_with_brackets_are_written_and_printed_as_they_are(tmp_path):
    """Rich markup in a path (issue 25): ``[/]`` raised MarkupError after the store was written
    complete, ``[old]``/``[bold red]`` were printed mangled."""
    odd = tmp_path / "mk[/]st [bold red]x [old].zarr"
    result = runner.invoke(app, ["prepare", "--n-patients", "2", "--size", "16", "--out",
                                 str(odd), "--threads", "1"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"wrote {odd}" in result.output
    result = runner.invoke(app, ["info", str(odd), "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert f"{odd}: 8 images" in result.output


@pytest.mark.parametrize("command", ["train-vae", "train-diffusion", "evaluate"])
def test_a_store_that_does_not_exist(tmp_path, command):
    missing = tmp_path / "missing.zarr"
    args = {
        "train-vae": ["train-vae", "--data", missing, "--latent", "64", "--run", tmp_path / "r"],
        "train-diffusion": ["train-diffusion", "--model", "edm", "--data", missing, "--run",
                            tmp_path / "r"],
        "evaluate": ["evaluate", "--train", missing, "--test", missing, "--out", tmp_path / "e"],
    }[command]  # fmt: skip
    _one_line_error(args, "missing.zarr")
    assert not (tmp_path / "r").exists()


def test_demo_rerun_with_other_patients_is_refused(tmp_path):
    from edmcli.data.prepare import prepare_phantom

    prepare_phantom(tmp_path / "d" / "phantom64.zarr", n_patients=10, size=64, seed=0,
                    split_ratio=(0.5, 0.1, 0.4))  # fmt: skip
    line = _one_line_error(["demo", "--out", tmp_path / "d", "--n-patients", "12"])
    assert "holds a demo of 10 phantom patients" in line
    line = _one_line_error(["demo", "--out", tmp_path / "d", "--n-patients", "10", "--seed", "3"])
    assert "another --n-patients or --seed" in line
