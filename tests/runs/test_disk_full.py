"""A full disk (issue 25): a checkpoint that cannot be written leaves no partial file (it kept
the disk full) and ends in one line naming the path; every command names where it was writing."""

from __future__ import annotations

import errno
import shutil
import subprocess
import sys
from collections import namedtuple

import pytest
import torch

from edmcli.cli import main
from edmcli.runs.checkpoint import checkpoint_path, save_checkpoint

Usage = namedtuple("Usage", "total used free")


def _torch_save_fails(state, f):
    """What torch's zip writer does on a full disk: part of the file, then an error that names
    no cause."""
    f.write(b"x" * 4096)
    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 2016320")


def test_a_checkpoint_on_a_full_disk_leaves_no_partial_file(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "save", _torch_save_fails)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(1 << 30, 1 << 30, 0))
    path = checkpoint_path(tmp_path, 7)
    with pytest.raises(OSError) as info:
        save_checkpoint({"step": 7, "model": {}}, path)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
    assert list(path.parent.iterdir()) == []


def test_another_write_failure_keeps_its_traceback_and_still_cleans_up(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "save", _torch_save_fails)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(1 << 40, 0, 1 << 40))
    path = checkpoint_path(tmp_path, 7)
    with pytest.raises(RuntimeError, match="enforce fail"):
        save_checkpoint({"step": 7, "model": {}}, path)
    assert list(path.parent.iterdir()) == []


def test_an_enospc_is_one_line_naming_the_path(tmp_path, monkeypatch, phantom_store, capsys):
    def no_space(state, f):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", no_space)
    run = tmp_path / "r"
    code = main(["train-vae", "--data", str(phantom_store), "--latent", "64", "--preset",
                 "tiny", "--steps", "2", "--run", str(run), "--device", "cpu",
                 "--threads", "1"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: no space left on the device while writing")
    assert str(run / "checkpoints" / "checkpoint-00000002.pt") in err[-1]
    assert not list((run / "checkpoints").glob(".*.tmp"))


def test_an_os_error_without_a_path_names_the_commands_output():
    from edmcli.cli.errors import os_error_message

    message = os_error_message(OSError(errno.ENOSPC, "No space left on device"), "out.zarr")
    assert message.startswith("no space left on the device while writing out.zarr;")


def _tmpfs(folder) -> bool:
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(folder)],
                          capture_output=True)  # fmt: skip
    return done.returncode == 0


@pytest.mark.slow
def test_train_vae_on_a_real_full_disk(tmp_path, phantom_store):
    """A 2 MB tmpfs (where the machine allows mounting one): train-vae's first checkpoint does
    not fit."""
    disk = tmp_path / "small"
    if shutil.which("mount") is None or not _tmpfs(disk):
        pytest.skip("cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN)")
    try:
        run = disk / "vae"
        done = subprocess.run(
            [sys.executable, "-m", "edmcli", "train-vae", "--data", str(phantom_store),
             "--latent", "64", "--preset", "tiny", "--steps", "2", "--run", str(run),
             "--device", "cpu", "--threads", "1"],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr
        assert lines[-1].startswith("error: no space left on the device while writing"), lines
        assert str(run / "checkpoints") in lines[-1]
        assert not list((run / "checkpoints").glob(".*.tmp"))
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
