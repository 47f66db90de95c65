"""The exclusive writer lock, with real processes: refused at once while held, taken over after
the holder is SIGKILLed (the kernel drops its flock), shared by every spelling of a path."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edmcli.errors import EchoSynthError
from edmcli.runs.lock import (
    LockedError,
    exclusive,
    lock_path,
    read_holder,
    run_lock,
    store_lock,
)

REPO = Path(__file__).resolve().parents[2]
HOLD = """
import sys, time
from edmcli.runs.lock import exclusive
with exclusive(sys.argv[1], sys.argv[2], inside=sys.argv[3] == "inside"):
    print("held", flush=True)
    time.sleep(300)
"""


def hold(target: Path, what: str = "store", inside: bool = False) -> subprocess.Popen:
    """A real process holding the lock of ``target`` (returns once it holds it)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(target), what, "inside" if inside else "next"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    line = proc.stdout.readline()
    if line.strip() != "held":
        proc.kill()
        raise AssertionError(f"the holder did not start: {line!r} {proc.stderr.read()}")
    return proc


def kill(proc: subprocess.Popen) -> None:
    proc.kill()  # SIGKILL: no cleanup runs in the holder
    proc.wait(timeout=30)
    assert proc.returncode == -9


def test_a_second_writer_is_refused_at_once_naming_the_holder_then_takes_a_stale_lock(tmp_path):
    store = tmp_path / "out.zarr"
    holder = hold(store)
    try:
        lock = lock_path(store)
        assert lock == tmp_path / ".out.zarr.lock" and lock.is_file()
        recorded = read_holder(lock)
        assert recorded["pid"] == holder.pid and recorded["host"] == socket.gethostname()
        assert recorded["started"] and recorded["target"] == str(store.resolve())
        t0 = time.monotonic()
        with pytest.raises(LockedError) as info:
            with exclusive(store, "store"):
                raise AssertionError("entered a lock held by another process")
        assert time.monotonic() - t0 < 2.0  # no waiting
        message = str(info.value)
        assert f"process {holder.pid} on {socket.gethostname()}" in message
        assert str(store) in message and "\n" not in message and message.endswith("then rerun")
        assert isinstance(info.value, EchoSynthError) and info.value.holder["pid"] == holder.pid
    finally:
        kill(holder)
    # kill -9 left the file with the dead holder's name: the kernel released the flock.
    assert lock.is_file() and read_holder(lock)["pid"] == holder.pid
    with exclusive(store, "store") as taken:
        assert taken == lock and read_holder(lock)["pid"] == os.getpid()
        second = hold_attempt(store)
        assert second.returncode != 0 and f"process {os.getpid()}" in second.stderr
    assert not lock.exists()  # released normally: the file goes


def hold_attempt(target: Path) -> subprocess.CompletedProcess:
    """Another process trying to take the lock (it must fail at once)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-c", HOLD, str(target), "store", "next"],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip


def test_run_lock_lives_inside_the_run_and_every_spelling_shares_it(tmp_path, monkeypatch):
    run = tmp_path / "runs" / "edm"
    holder = hold(run, "run folder", inside=True)
    try:
        assert (run / ".lock").is_file()
        monkeypatch.chdir(tmp_path)
        with pytest.raises(LockedError, match=f"run folder runs/edm is in use by process "
                                              f"{holder.pid}"):  # fmt: skip
            with run_lock(Path("runs") / "edm"):
                pass
        os.symlink(run, tmp_path / "alias")
        with pytest.raises(LockedError):
            with run_lock(tmp_path / "alias"):
                pass
    finally:
        kill(holder)
    with run_lock(run) as lock:
        assert lock == run.resolve() / ".lock"
    assert not (run / ".lock").exists() and run.is_dir()


def test_replacing_the_store_keeps_its_lock(tmp_path):
    store = tmp_path / "s.zarr"
    store.mkdir()
    with store_lock(store) as lock:
        os.rename(store, tmp_path / "gone")  # what --overwrite / atomic_store_path do
        store.mkdir()
        assert lock.is_file()
        with pytest.raises(LockedError):
            with store_lock(store):
                pass


def test_disabled_lock_takes_nothing_and_agree_spreads_a_refusal(tmp_path):
    store = tmp_path / "s.zarr"
    with exclusive(store, enabled=False) as lock:
        assert lock is None and not lock_path(store).exists()
    calls = []

    def agree(refused: bool) -> bool:  # as broadcast_flag: true when any rank was refused
        calls.append(refused)
        return True

    # rank 0 got the lock but another rank reports a refusal: everyone fails, the lock is freed
    with pytest.raises(LockedError, match="another process of this job was refused"):
        with exclusive(store, agree=agree):
            pass
    assert calls == [False] and not lock_path(store).exists()
    with exclusive(store, agree=lambda refused: refused):
        with pytest.raises(LockedError):  # this rank's own refusal is raised as it is
            with exclusive(store, agree=lambda refused: refused):
                pass


def test_the_same_process_cannot_take_a_lock_twice(tmp_path):
    with exclusive(tmp_path / "x"):
        with pytest.raises(LockedError, match=f"process {os.getpid()}"):
            with exclusive(tmp_path / "x"):
                pass


def test_a_holder_record_that_is_not_json_still_gives_one_sentence(tmp_path):
    import fcntl

    lock = lock_path(tmp_path / "x")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, b"not json")
    try:
        with pytest.raises(LockedError, match="in use by another process"):
            with exclusive(tmp_path / "x"):
                pass
    finally:
        os.close(fd)
    assert lock.read_text() == "not json"  # the refusal leaves the holder's file alone
