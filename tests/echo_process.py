"""``echo-synth`` as a real process (signals, exit codes), for the tests of several folders."""

from __future__ import annotations

import os
import signal
import subprocess
import sys


def echo_synth(args, fault=None, ignore_sigint=False):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ECHO_SYNTH_PLAIN_PROGRESS": "1"}
    env.pop("ECHO_SYNTH_FAULT_KILL", None)
    if fault:
        env["ECHO_SYNTH_FAULT_KILL"] = fault
    ignore = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignore_sigint else None
    command = [sys.executable, "-m", "edmcli", *map(str, args)]
    return subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=300, preexec_fn=ignore
    )


def assert_stopped(done, name):
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 130, done.stderr
    assert "Traceback" not in done.stderr
    assert lines[-1] == f"error: interrupted by {name}; rerun the same command to continue"


def assert_resume_is_exact(args, root, kill_after: int, steps: int) -> None:
    """``echo-synth ARGS --run root/a`` uninterrupted, and ``--run root/b`` killed (SIGKILL)
    after optimiser step ``kill_after`` and rerun: the two runs' last checkpoints are both at
    ``steps`` and hold the same EMA weights, bit for bit."""
    import torch

    from edmcli.runs.checkpoint import latest_checkpoint, load_checkpoint

    full = echo_synth([*args, "--run", root / "a"])
    assert full.returncode == 0, full.stderr
    killed = echo_synth([*args, "--run", root / "b"], fault=f"train-step:{kill_after}")
    assert killed.returncode == -9
    resumed = echo_synth([*args, "--run", root / "b"])
    assert resumed.returncode == 0, resumed.stderr
    a = load_checkpoint(latest_checkpoint(root / "a"))
    b = load_checkpoint(latest_checkpoint(root / "b"))
    assert a["step"] == b["step"] == steps
    for name, tensor in a["ema"].items():
        assert torch.equal(tensor, b["ema"][name]), name
