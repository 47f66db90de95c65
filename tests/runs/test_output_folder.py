"""The one output-folder rule of evaluate, bench, study and demo (issue 25: evaluate --out mypaper
replaced the user's report.md, bench --out their bench.json, --out / crashed in the lock)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from edmcli.cli import app
from edmcli.errors import DataError
from edmcli.runs.output_folder import MARKER, check_output_folder, mark_output_folder

runner = CliRunner()


def _user_folder(tmp_path, name="mypaper", file="report.md"):
    folder = tmp_path / name
    (folder / "plots").mkdir(parents=True)
    (folder / file).write_text("my own words")
    (folder / "plots" / "dice.png").write_bytes(b"mine")
    return folder


@pytest.mark.parametrize("kind", ["evaluation", "bench", "study", "demo"])
def test_a_folder_of_someone_elses_files_is_refused(tmp_path, kind):
    folder = _user_folder(tmp_path)
    with pytest.raises(DataError, match="already holds files echo-synth did not write"):
        check_output_folder(folder, kind)
    assert (folder / "report.md").read_text() == "my own words" and not (folder / MARKER).exists()


@pytest.mark.parametrize("kind", ["evaluation", "bench", "study", "demo"])
def test_new_empty_or_marked_folders_are_written(tmp_path, kind):
    check_output_folder(tmp_path / "new" / "deeper", kind)
    (tmp_path / "empty").mkdir()
    check_output_folder(tmp_path / "empty", kind)
    mark_output_folder(tmp_path / "new", kind)
    (tmp_path / "new" / "report.md").write_text("ours")
    check_output_folder(tmp_path / "new", kind)  # a rerun resumes into its own folder
    record = json.loads((tmp_path / "new" / MARKER).read_text())
    assert record["kind"] == kind and record["tool"] == "echo-synth"


def test_another_kinds_output_is_refused(tmp_path):
    mark_output_folder(tmp_path / "b", "bench")
    (tmp_path / "b" / "bench.json").write_text("{}")
    with pytest.raises(DataError, match="already holds echo-synth bench output"):
        check_output_folder(tmp_path / "b", "evaluation")


def test_outputs_of_earlier_versions_are_recognised_by_their_records(tmp_path):
    old = tmp_path / "old-eval"
    old.mkdir()
    (old / "report.json").write_text(json.dumps({"settings": {}, "runs": [], "test": {}}))
    check_output_folder(old, "evaluation")
    fake = _user_folder(tmp_path, "fake", "report.json")  # a report.json that is not ours
    with pytest.raises(DataError, match="did not write"):
        check_output_folder(fake, "evaluation")


def test_roots_home_and_folders_above_the_current_one_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    for path, text in (("/", "filesystem root"), (tmp_path / "home", "home directory"),
                       (tmp_path.parent, "above the current one")):  # fmt: skip
        with pytest.raises(DataError, match=text):
            check_output_folder(path, "evaluation")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(DataError, match="is a file, not a folder"):
        check_output_folder(tmp_path / "afile", "bench")


@pytest.mark.parametrize("command", [
    ["evaluate", "--train", "STORE", "--test", "STORE", "--preset", "tiny", "--device", "cpu"],
    ["bench", "--preset", "tiny", "--device", "cpu", "--models", "edm-l64"],
])  # fmt: skip
def test_the_commands_refuse_a_users_folder_in_one_line_and_touch_nothing(
    command, tmp_path, phantom_store
):
    folder = _user_folder(tmp_path, file="report.md" if command[0] == "evaluate" else "bench.json")
    args = [str(phantom_store) if a == "STORE" else a for a in command]
    result = runner.invoke(app, [*args, "--out", str(folder)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "already holds files echo-synth did not write" in lines[0]
    assert sorted(p.name for p in folder.rglob("*")) == sorted(
        ["plots", "dice.png", "report.md" if command[0] == "evaluate" else "bench.json"]
    )
    result = runner.invoke(app, [*args, "--out", "/"])  # before: a ValueError traceback
    assert result.exit_code == 2 and "filesystem root" in result.output
