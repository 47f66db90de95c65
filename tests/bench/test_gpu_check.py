"""``benchmarks/gpu_check.sh --dry-run``: the plumbing of the script a first GPU run depends on
(issue 26) — every stage present with its command, the files it names present, every embedded
Python script compiling, and one ``gpu_check.json`` that leads with what only a GPU can prove."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STAGES = ["install", "env", "kernel_tests", "kernels_cuda", "fallback", "memory", "bench_eager",
          "bench_compiled", "spade_norm", "training"]  # fmt: skip


def test_the_dry_run_checks_every_stage_and_writes_one_json(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"],
                          env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["dry_run"] and report["all_ok"], report["stages"]
    assert [s["stage"] for s in report["stages"]] == STAGES
    assert all(s["command"] and not s["missing"] for s in report["stages"])
    assert list(report)[:4] == ["format", "dry_run", "seconds", "all_ok"]
    assert report["proves"][0].startswith("kernels_cuda")
    assert set(report["results"]) >= {"kernels_cuda", "fallback", "memory", "bench_eager"}
    scripts = tmp_path / "out" / ".scripts"
    assert {"env_info.py", "kernels_cuda.py"} <= {p.name for p in scripts.iterdir()}


def test_an_unknown_argument_is_refused():
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--fast"],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2 and "unknown argument --fast" in done.stderr
