"""Runs side by side (``evaluate --jobs``): the order, the refusals, and the same numbers as one
after another."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from test_evaluate import FAST, _fake_synthetic, _invoke

from edmcli.errors import EchoSynthError
from edmcli.evaluation.run_pool import check_jobs, run_order, train_runs


@pytest.fixture(autouse=True)
def _keep_threads():
    threads = torch.get_num_threads()  # --threads sets them for the whole process
    yield
    torch.set_num_threads(threads)


def _run(task, steps):
    return {"task": task, "config": SimpleNamespace(steps=steps)}


def test_longest_runs_go_first():
    runs = [_run("seg", 400), _run("cls", 400), _run("seg", 100), _run("cls", 320)]
    assert run_order(runs) == [1, 3, 0, 2]


@pytest.mark.parametrize(
    ("jobs", "device", "world", "message"),
    [(0, "cpu", 1, "--jobs 0 must be at least 1"),
     (2, "cuda:0", 1, "on cuda:0 give --jobs 1"),
     (2, "cpu", 2, "with 2 processes give --jobs 1")],
)  # fmt: skip
def test_jobs_refused_where_they_cannot_run(jobs, device, world, message):
    with pytest.raises(EchoSynthError, match=message):
        check_jobs(jobs, device, world)
    check_jobs(1, device, world)  # one at a time runs anywhere


def test_one_job_trains_in_this_process_in_plan_order():
    seen = []
    runs = [_run("seg", 1), _run("cls", 9)]
    train_runs(runs, lambda run: seen.append(run["task"]), jobs=1, threads=2)
    assert seen == ["seg", "cls"]


@pytest.mark.slow
def test_two_jobs_give_the_numbers_of_one_after_another(phantom_store, tmp_path):
    """Two runs at once with one thread each = the same runs one after another with one thread:
    the same steps, checkpoints chosen and test numbers."""
    synthetic = _fake_synthetic(tmp_path / "syn.zarr", phantom_store)
    reports = {}
    for jobs, threads in ((1, 1), (2, 2)):
        out = tmp_path / f"jobs{jobs}"
        args = ["--train", phantom_store, "--train", synthetic, "--test", phantom_store,
                "--out", out, "--jobs", str(jobs), "--threads", str(threads), *FAST]  # fmt: skip
        result = _invoke(args)
        assert result.exit_code == 0, result.output
        reports[jobs] = json.loads((out / "report.json").read_text())
    one, two = reports[1], reports[2]
    assert two["settings"]["jobs"] == 2 and one["settings"]["jobs"] == 1
    assert "2 runs at once" in (tmp_path / "jobs2" / "report.md").read_text()
    assert "runs at once" not in (tmp_path / "jobs1" / "report.md").read_text()
    for a, b in zip(one["runs"], two["runs"], strict=True):
        assert (a["task"], a["label"]) == (b["task"], b["label"])
        assert a["steps"] == b["steps"] and a["best_step"] == b["best_step"]
        assert a["metrics"] == b["metrics"]
