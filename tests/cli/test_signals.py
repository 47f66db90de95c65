"""SIGTERM and SIGINT stop every command with exit 130 and one line, keep what was written and
let the rerun finish the same result (issue 25: ``prepare``/``sample`` died with 143, and a
``sample`` started with SIGINT ignored ran to the end). Real processes, the signal sent by the
process itself at a fixed point (:mod:`edmcli.faults`)."""

from __future__ import annotations

import numpy as np
from echo_process import assert_stopped, echo_synth

from edmcli.data.store import DatasetStore


def test_prepare_stopped_by_sigterm_exits_130_and_the_rerun_writes_the_same_store(tmp_path):
    args = ["prepare", "--n-patients", "6", "--size", "16", "--threads", "1", "--out"]
    reference = tmp_path / "ref.zarr"
    assert echo_synth([*args, reference]).returncode == 0
    out = tmp_path / "out.zarr"
    assert_stopped(echo_synth([*args, out], fault="prepare-sample:5:TERM"), "SIGTERM")
    assert not out.exists()  # prepare writes a temporary store, renamed once complete
    assert echo_synth([*args, out]).returncode == 0
    a, b = DatasetStore(reference), DatasetStore(out)
    np.testing.assert_array_equal(a.images[:], b.images[:])
    np.testing.assert_array_equal(a.labels[:], b.labels[:])
