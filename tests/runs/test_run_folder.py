"""Run folders: a bad first command no longer poisons the run (no checkpoint: the corrected
command's settings replace it), settings stay fixed once a checkpoint exists, and two trainings
of one run folder never run together (the run's lock)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from edmcli.errors import EchoSynthError
from edmcli.runs.checkpoint import checkpoint_path, save_checkpoint
from edmcli.runs.folder import prepare_run_dir
from edmcli.runs.lock import LockedError
from edmcli.training.engine import TrainConfig, TrainingTask
from edmcli.training.run import train_run

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def _checkpoint(run: Path, step: int = 2) -> None:
    save_checkpoint({"step": step, "model": {}}, checkpoint_path(run, step))


def _config(run: Path) -> dict:
    return yaml.safe_load((run / "config.yaml").read_text())


# --------------------------------------------------------------------------- prepare_run_dir
def test_without_a_checkpoint_a_differing_config_replaces_the_failed_attempt(tmp_path):
    run = tmp_path / "r"
    assert prepare_run_dir(run, {"lr": -0.001, "steps": 10}) is False  # the bad command
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    (run / "grids").mkdir()
    (run / "grids" / "samples-00000001.png").write_bytes(b"png")
    (run / "checkpoints").mkdir()
    save_checkpoint({"step": 1, "model": {}}, run / "checkpoints" / "best.pt", keep=None)
    (run / "training_patients.json").write_text("{}")
    assert prepare_run_dir(run, {"lr": 1e-3, "steps": 10}) is False  # the corrected one runs
    assert _config(run) == {"lr": 1e-3, "steps": 10}
    for stale in ("metrics.jsonl", "grids", "checkpoints/best.pt"):
        assert not (run / stale).exists(), stale
    assert (run / "training_patients.json").is_file()  # rewritten by every start anyway


def test_without_a_checkpoint_the_same_config_keeps_the_run_records(tmp_path):
    run = tmp_path / "r"
    prepare_run_dir(run, {"lr": 1e-3, "steps": 10})
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    assert prepare_run_dir(run, {"lr": 1e-3, "steps": 20}) is False  # nothing to resume yet
    assert (run / "metrics.jsonl").is_file() and _config(run)["steps"] == 20


def test_with_a_checkpoint_differing_settings_are_refused_and_lengths_may_change(tmp_path):
    run = tmp_path / "r"
    prepare_run_dir(run, {"lr": 1e-3, "steps": 10})
    _checkpoint(run)
    assert prepare_run_dir(run, {"lr": 1e-3, "steps": 20}) is True
    assert _config(run)["steps"] == 20
    with pytest.raises(EchoSynthError, match="started with lr=0.001 but this command asks"):
        prepare_run_dir(run, {"lr": 1e-2, "steps": 20})
    with pytest.raises(EchoSynthError, match="started with batch=None"):
        prepare_run_dir(run, {"lr": 1e-3, "steps": 20, "batch": 4})
    assert _config(run) == {"lr": 1e-3, "steps": 20}
    # the other ranks check the same way and write nothing
    with pytest.raises(EchoSynthError, match="started with lr"):
        prepare_run_dir(run, {"lr": 1e-2, "steps": 20}, is_main=False)


def test_an_unreadable_config_is_replaced_only_while_there_is_no_checkpoint(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "config.yaml").write_text("lr: [unclosed\n")
    assert prepare_run_dir(run, {"lr": 1e-3}) is False
    assert _config(run) == {"lr": 1e-3}
    (run / "config.yaml").write_text("lr: [unclosed\n")
    _checkpoint(run)
    with pytest.raises(EchoSynthError, match="is not valid YAML"):
        prepare_run_dir(run, {"lr": 1e-3})


def test_folders_that_are_not_runs(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    with pytest.raises(EchoSynthError, match="not a training run"):
        prepare_run_dir(other, {"lr": 1})
    locked_only = tmp_path / "new"
    locked_only.mkdir()
    (locked_only / ".lock").write_text("{}")  # the run lock is taken before the folder is made
    assert prepare_run_dir(locked_only, {"lr": 1}) is False
    orphan = tmp_path / "orphan"
    _checkpoint(orphan)
    with pytest.raises(EchoSynthError, match="has checkpoints but no config.yaml"):
        prepare_run_dir(orphan, {"lr": 1})


def test_two_spellings_of_one_file_are_one_setting(tmp_path, monkeypatch):
    """Older runs recorded the Γ-VAE checkpoint relative to the working directory; resuming
    them with the absolute path recorded now is no change of settings."""
    target = tmp_path / "vae" / "checkpoints" / "checkpoint-00000004.pt"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "r"
    prepare_run_dir(run, {"vae_checkpoint": "vae/checkpoints/checkpoint-00000004.pt"})
    _checkpoint(run)
    assert prepare_run_dir(run, {"vae_checkpoint": str(target)}) is True
    assert _config(run) == {"vae_checkpoint": str(target)}
    other = tmp_path / "other.pt"
    other.write_bytes(b"x")
    with pytest.raises(EchoSynthError, match="started with vae_checkpoint"):
        prepare_run_dir(run, {"vae_checkpoint": str(other)})


# --------------------------------------------------------------------------- train_run
class TinyTask(TrainingTask):
    """A two-weight regression: the shared flow without a real model."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay

    def build_model(self) -> nn.Module:
        return nn.Linear(2, 1)

    def train_dataset(self):
        return [torch.tensor([float(i), 1.0]) for i in range(8)]

    def loss(self, model, batch, step, epoch):
        time.sleep(self.delay)
        value = (model(batch).squeeze(1) - batch[:, 0]).pow(2).mean()
        return value, {"mse": value.detach()}


def tiny_run(run: Path, store: Path, task=TinyTask, steps: int = 4, batch: int = 4, **config):
    train_config = TrainConfig(steps=steps, batch=batch, checkpoint_every=2, log_every=1, **config)
    resolved = {"kind": "tiny", "steps": steps, "batch": batch, **config}
    return train_run(
        run=run, device="cpu", resolved=resolved, data=str(store), train_config=train_config,
        make_task=lambda env: task(), describe="tiny", report=lambda run, env: {}, title="tiny",
    )  # fmt: skip


def _steps(run: Path) -> list[int]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines]


def test_the_corrected_command_runs_in_the_run_a_bad_one_started(phantom_store, tmp_path):
    run = tmp_path / "r"
    with pytest.raises(EchoSynthError, match="lr -0.001 must be positive"):  # refused first
        tiny_run(run, phantom_store, lr=-0.001)
    assert not (run / "config.yaml").exists()
    with pytest.raises(EchoSynthError, match="1000"):  # a batch larger than the 8 items
        tiny_run(run, phantom_store, batch=1000, lr=1e-3)
    assert _config(run)["batch"] == 1000
    summary = tiny_run(run, phantom_store, lr=1e-3)
    assert summary["steps"] == 4 and _config(run)["lr"] == 1e-3
    assert _steps(run) == [1, 2, 3, 4]
    with pytest.raises(EchoSynthError, match="started with lr=0.001"):  # now it has checkpoints
        tiny_run(run, phantom_store, lr=1e-2)
    assert not (run / ".lock").exists()


def test_a_task_that_cannot_be_built_writes_no_config(phantom_store, tmp_path):
    def offline():
        raise EchoSynthError("the LPIPS weights are missing (or train with --perceptual none)")

    run = tmp_path / "r"
    with pytest.raises(EchoSynthError, match="LPIPS"):
        tiny_run(run, phantom_store, task=offline)
    assert not (run / "config.yaml").exists() and not (run / ".lock").exists()


TRAIN = """
import sys
sys.path.insert(0, sys.argv[3])
from pathlib import Path
from test_run_folder import TinyTask, tiny_run
tiny_run(Path(sys.argv[1]), Path(sys.argv[2]), task=lambda: TinyTask(0.25), steps=6)
"""


def _wait_for(condition, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while not condition():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_two_identical_trainings_of_one_run_never_run_together(phantom_store, tmp_path):
    """Before the lock both ran and metrics.jsonl got steps twice. The second is refused at
    once; after the first is SIGKILLed its stale lock file blocks nobody: the rerun resumes."""
    run = tmp_path / "r"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(
        [sys.executable, "-c", TRAIN, str(run), str(phantom_store), str(HERE)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        _wait_for(lambda: (run / "metrics.jsonl").is_file(), first)  # it is training
        with pytest.raises(LockedError, match=f"run folder {run} is in use by process {first.pid}"):
            tiny_run(run, phantom_store, task=lambda: TinyTask(0.25), steps=6)
        _wait_for(lambda: list((run / "checkpoints").glob("checkpoint-*.pt")), first)
    finally:
        first.kill()
        first.wait(timeout=30)
    assert first.returncode == -9 and (run / ".lock").is_file()  # stale: its holder is dead
    summary = tiny_run(run, phantom_store, steps=6)
    assert summary["steps"] == 6 and summary["resumed from step"] >= 2
    assert _steps(run) == list(range(1, 7))  # every step once
    assert not (run / ".lock").exists()


def test_train_vae_bad_commands_then_the_corrected_one_on_one_run(phantom_store, tmp_path):
    """The reproduction: each bad command used to leave a config.yaml that refused the next."""
    from typer.testing import CliRunner

    from edmcli.cli import app

    run = tmp_path / "vae"
    base = ["train-vae", "--data", str(phantom_store), "--latent", "64", "--run", str(run),
            "--preset", "tiny", "--steps", "2", "--base-channels", "8", "--checkpoint-every",
            "1", "--device", "cpu"]  # fmt: skip
    runner = CliRunner()
    bad = runner.invoke(app, [*base, "--batch", "1000"])
    assert bad.exit_code == 2 and "global batch of 1000" in bad.output
    assert _config(run)["batch"] == 1000
    good = runner.invoke(app, [*base, "--batch", "4"])
    assert good.exit_code == 0, good.output
    assert _config(run)["batch"] == 4 and _steps(run) == [2]
    refused = runner.invoke(app, [*base, "--batch", "8"])
    assert refused.exit_code == 2 and "started with batch=4" in refused.output
