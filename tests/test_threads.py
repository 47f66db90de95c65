"""--threads: torch's thread count, the oversubscription warning, the option on every command."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from edmcli.cli import main
from edmcli.errors import EchoSynthError
from edmcli.threads import available_cores, configure_threads, oversubscription_warning


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_configure_sets_torch_threads_and_defaults_to_the_cores():
    plan = configure_threads(1)
    assert torch.get_num_threads() == 1 and plan.threads == 1
    plan = configure_threads(None, load=0.0)
    assert plan.threads == available_cores() == torch.get_num_threads()
    assert plan.warning is None


def test_zero_threads_refused():
    with pytest.raises(EchoSynthError, match="--threads 0"):
        configure_threads(0)


def test_warning_cases():
    assert "3 threads on 2 cores" in oversubscription_warning(3, 2, None)
    assert oversubscription_warning(2, 2, 0.2) is None  # an idle machine
    busy = oversubscription_warning(2, 2, 1.0)  # another job holds one core
    assert "load of 1.0" in busy and "--threads 1" in busy
    assert oversubscription_warning(1, 2, 1.0) is None  # fits beside it


def test_chosen_threads_ignore_the_load():
    assert configure_threads(1, load=5.0).warning is None  # chosen on purpose


def test_every_command_takes_threads(capsys):
    for command in (
        "prepare",
        "info",
        "train-vae",
        "train-diffusion",
        "sample",
        "evaluate",
        "demo",
    ):
        assert main([command, "--help"]) == 0
        assert "--threads" in capsys.readouterr().out, command


def test_bad_threads_is_one_line(capsys, tmp_path):
    assert main(["info", "--threads", "0", str(tmp_path / "missing.zarr")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --threads 0 must be from 1 to 1024"]


def test_no_color_honoured():
    code = (
        "from edmcli.console import console, err_console; "
        "print(console.no_color, err_console.no_color)"
    )
    env = {**os.environ, "NO_COLOR": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.split() == ["True", "True"]


def test_no_cuda_home_warning_on_a_cpu_machine(tmp_path):
    """torch.compile on the CPU imports torch.utils.cpp_extension, which warns about CUDA_HOME
    on a machine with a CUDA toolkit and no GPU: the CLI silences it (and only it)."""
    import subprocess
    import sys

    code = "import torch.utils.cpp_extension"
    env = {**os.environ, "CUDA_HOME": str(tmp_path), "CUDA_VISIBLE_DEVICES": ""}
    plain = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert "No CUDA runtime is found" in plain.stderr  # the warning this test guards against
    ours = subprocess.run([sys.executable, "-c", f"import edmcli.cli; {code}"], env=env,
                          capture_output=True, text=True)  # fmt: skip
    assert ours.returncode == 0 and ours.stderr == "", ours.stderr
