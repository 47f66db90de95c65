"""A run built on another run's checkpoint (a latent model on its Γ-VAE) keeps a frozen copy of
it: lengthening the Γ-VAE run prunes its old checkpoints, yet the dependant still loads the one
it was trained with (hard link, or a copy across filesystems); recorded paths are found from
any working directory."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from edmcli.errors import EchoSynthError
from edmcli.models.gamma_vae import GammaVAE
from edmcli.runs.checkpoint import (
    checkpoint_path,
    file_sha256,
    find_checkpoint,
    link_or_copy,
    list_checkpoints,
    save_checkpoint,
)
from edmcli.runs.folder import Dependency, freeze_dependency, frozen_dependency
from edmcli.runs.vae_run import VAESettings, load_vae_run, settings_dict

CPU = torch.device("cpu")


def _settings() -> VAESettings:
    return VAESettings(data="/nowhere/store.zarr", latent=64, image_size=32, base_channels=8,
                       num_res_blocks=1, norm_groups=8)  # fmt: skip


def _save(run: Path, step: int, keep: int = 2) -> dict[str, torch.Tensor]:
    """One checkpoint of a (fake) Γ-VAE training at ``step``, pruned as the engine prunes."""
    torch.manual_seed(step)
    weights = GammaVAE(_settings().model_config()).state_dict()
    state = {"format": "echo-synth-checkpoint", "step": step, "model": weights, "ema": weights,
             "optimizer": {}}  # fmt: skip
    save_checkpoint(state, checkpoint_path(run, step), keep=keep)
    return weights


@pytest.fixture
def vae_run(tmp_path) -> Path:
    run = tmp_path / "runs" / "vae-l64"
    run.mkdir(parents=True)
    config = {"kind": "vae", **settings_dict(_settings()), "steps": 4}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "training_patients.json").write_text(json.dumps({"patients": ["p1", "p2"]}))
    (run / "latent_stats.json").write_text(json.dumps({"sigma_data": 0.3}))
    (run / "metrics.jsonl").write_text('{"step": 4}\n')
    return run


def _dependency(run: Path) -> tuple[Dependency, dict]:
    weights = _save(run, 2)
    weights = _save(run, 4)
    loaded = load_vae_run(run, CPU)  # what a diffusion run loads: the newest checkpoint
    assert loaded.checkpoint == checkpoint_path(run, 4).resolve()
    return Dependency("vae", loaded.run, loaded.checkpoint, loaded.sha256), weights


def test_lengthening_the_vae_run_prunes_its_checkpoint_but_the_dependant_keeps_it(
    vae_run, tmp_path
):
    dependency, weights = _dependency(vae_run)
    dependant = tmp_path / "runs" / "edm-l64"
    dependant.mkdir()
    frozen = freeze_dependency(dependant, dependency)
    assert frozen.how == "link" and os.stat(frozen.checkpoint).st_nlink == 2  # costs no space
    assert frozen.folder == (dependant / "vae").resolve()
    assert frozen.source_run == vae_run.resolve()
    assert frozen.source_checkpoint == checkpoint_path(vae_run, 4).resolve()
    assert sorted(p.name for p in frozen.folder.iterdir()) == [
        "checkpoints", "config.yaml", "latent_stats.json", "source.json", "training_patients.json"
    ]  # fmt: skip

    for step in (6, 8, 10):  # train-vae --steps 10 on the same run: keep 2
        _save(vae_run, step)
    assert [p.name for p in list_checkpoints(vae_run / "checkpoints")] == [
        "checkpoint-00000008.pt", "checkpoint-00000010.pt"
    ]  # fmt: skip
    assert not checkpoint_path(vae_run, 4).exists()

    again = frozen_dependency(dependant, "vae")
    loaded = load_vae_run(again.folder, CPU, again.checkpoint, dependency.sha256)
    assert loaded.sha256 == dependency.sha256
    for name, value in loaded.model.state_dict().items():
        assert torch.equal(value, weights[name]), name
    # the source Γ-VAE run may even go: the dependant's copy is a run folder of its own
    shutil.rmtree(vae_run)
    assert load_vae_run(again.folder, CPU, again.checkpoint, dependency.sha256).sha256


def test_freezing_again_on_resume_changes_nothing_and_another_checkpoint_replaces_it(
    vae_run, tmp_path
):
    dependency, _ = _dependency(vae_run)
    dependant = tmp_path / "dep"
    dependant.mkdir()
    first = freeze_dependency(dependant, dependency)
    inode = os.stat(first.checkpoint).st_ino
    assert freeze_dependency(dependant, dependency) == first
    assert os.stat(first.checkpoint).st_ino == inode
    _save(vae_run, 6)
    newer = Dependency("vae", vae_run, checkpoint_path(vae_run, 6),
                       file_sha256(checkpoint_path(vae_run, 6)))  # fmt: skip
    replaced = freeze_dependency(dependant, newer)
    assert replaced.checkpoint.name == "checkpoint-00000006.pt"
    assert [p.name for p in (dependant / "vae" / "checkpoints").iterdir()] == [
        "checkpoint-00000006.pt"
    ]
    assert not [p for p in dependant.iterdir() if p.name.startswith(".")]  # no leftovers


def test_a_copy_where_hard_links_are_impossible(vae_run, tmp_path, monkeypatch):
    dependency, _ = _dependency(vae_run)

    def no_link(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    frozen = freeze_dependency(tmp_path / "dep", dependency)
    assert frozen.how == "copy" and os.stat(frozen.checkpoint).st_nlink == 1
    assert file_sha256(frozen.checkpoint) == dependency.sha256


def test_a_checkpoint_pruned_or_changed_before_it_was_frozen_is_one_clear_error(vae_run, tmp_path):
    dependency, _ = _dependency(vae_run)
    changed = Dependency("vae", vae_run, dependency.checkpoint, "0" * 64)
    with pytest.raises(EchoSynthError, match="changed since it was chosen"):
        freeze_dependency(tmp_path / "dep", changed)
    assert frozen_dependency(tmp_path / "dep", "vae") is None
    for step in (6, 8):
        _save(vae_run, step)
    with pytest.raises(EchoSynthError, match="no longer exists .pruned or deleted"):
        freeze_dependency(tmp_path / "dep", dependency)
    assert not (tmp_path / "dep" / "vae").exists()


def test_link_or_copy_of_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        link_or_copy(tmp_path / "missing.pt", tmp_path / "out" / "x.pt")


def test_recorded_checkpoint_paths_are_absolute_and_old_relative_ones_are_found(
    vae_run, tmp_path, monkeypatch
):
    """Runs recorded the Γ-VAE checkpoint relative to the directory they were trained in;
    from another directory it is found in the Γ-VAE run's own checkpoints/."""
    _save(vae_run, 4)
    monkeypatch.chdir(tmp_path)
    recorded = Path("runs/vae-l64/checkpoints/checkpoint-00000004.pt")  # as older runs wrote
    loaded = load_vae_run(Path("runs/vae-l64"), CPU, recorded)
    assert loaded.checkpoint.is_absolute() and loaded.run.is_absolute()  # recorded from now on
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert not recorded.exists()
    again = load_vae_run(vae_run.resolve(), CPU, recorded, loaded.sha256)
    assert again.checkpoint == loaded.checkpoint
    assert find_checkpoint(recorded, vae_run) == vae_run / "checkpoints" / recorded.name
    gone = Path("runs/vae-l64/checkpoints/checkpoint-00000099.pt")
    assert find_checkpoint(gone, vae_run) == gone
    with pytest.raises(EchoSynthError, match="no longer exists"):
        load_vae_run(vae_run, CPU, gone)


def test_train_vae_lengthened_after_a_dependant_froze_its_checkpoint(phantom_store, tmp_path):
    """The reproduction with the real engine: train-vae, a dependant freezes its newest
    checkpoint (as train-diffusion does), train-vae --steps 4 prunes it in the Γ-VAE run."""
    from typer.testing import CliRunner

    from edmcli.cli import app

    run = tmp_path / "vae"
    args = ["train-vae", "--data", str(phantom_store), "--latent", "64", "--run", str(run),
            "--preset", "tiny", "--batch", "4", "--base-channels", "8", "--checkpoint-every",
            "1", "--device", "cpu"]  # fmt: skip
    runner = CliRunner()
    assert runner.invoke(app, [*args, "--steps", "2"]).exit_code == 0
    loaded = load_vae_run(run, CPU)
    dependency = Dependency("vae", loaded.run, loaded.checkpoint, loaded.sha256)
    frozen = freeze_dependency(tmp_path / "edm-l64", dependency)
    longer = runner.invoke(app, [*args, "--steps", "4"])
    assert longer.exit_code == 0, longer.output
    assert not loaded.checkpoint.exists()  # pruned: keep_checkpoints 2 of 1..4
    again = load_vae_run(frozen.folder, CPU, frozen.checkpoint, loaded.sha256)
    for name, value in again.model.state_dict().items():
        assert torch.equal(value, loaded.model.state_dict()[name]), name
