from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("ECHO_SYNTH_THREADS", "1")  # --threads of in-process CLI runs

import torch  # noqa: E402

# Tiny tensors: one thread is faster and steadier than two competing threads on 2 cores.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def phantom_store(tmp_path_factory) -> Path:
    """A small phantom store (12 patients, 32²) shared by the read-only tests."""
    from edmcli.data.prepare import prepare_phantom

    out = tmp_path_factory.mktemp("stores") / "phantom32.zarr"
    prepare_phantom(out, n_patients=12, size=32, seed=3, split_ratio=(0.5, 0.25, 0.25))
    return out
