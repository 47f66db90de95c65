"""``plan_bench``: every refusal of ``echo-synth bench`` before any network is built, the scales
and settings it resolves, and that planning writes nothing (milliseconds)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from edmcli.bench.bench_plan import DEFAULT_NFES, plan_bench
from edmcli.errors import EchoSynthError
from edmcli.models.registry import model_names, paper_reference


def snapshot(root: Path) -> list[tuple[str, int, int]]:
    """Every file and folder under ``root`` with its size and modification time."""
    return sorted(
        (str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
    )


def _run(root: Path, name: str = "r", kind: str = "diffusion", model: str = "edm-l64") -> Path:
    """A run folder with only its config.yaml (planning reads nothing else)."""
    run = root / name
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"kind": kind, "model": model}))
    return run


def _report(root: Path, text: str, name: str = "evaluation") -> Path:
    folder = root / name
    folder.mkdir()
    (folder / "report.json").write_text(text)
    return folder


def _file(root: Path) -> Path:
    (root / "f.txt").write_text("keep")
    return root / "f.txt"


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _args(root: Path, **changes):
    args = {"models": ["edm-l64"], "preset": "tiny", "nfe": ["1,3"], "batch": 1, "repeats": 1,
            "device": "cpu", "out": root / "b"}  # fmt: skip
    args.update(changes)
    return args


# (id, setup(root) -> changes of the base arguments, expected fragment)
REFUSALS = [
    ("unknown preset", lambda r: {"preset": "huge"}, "--preset 'huge': choose from auto, tiny"),
    ("unknown dtype", lambda r: {"dtype": "fp16"}, "--dtype 'fp16': choose from auto, fp32, bf16"),
    ("batch 0", lambda r: {"batch": 0}, "--batch 0 must be at least 1"),
    ("matched batch 0", lambda r: {"matched_batch": 0}, "--matched-batch 0 must be at least 1"),
    ("repeats 0", lambda r: {"repeats": 0}, "--repeats 0 must be at least 1"),
    ("models and runs", lambda r: {"run": [_run(r)]}, "--models and --run: give one or the other"),
    ("unknown model", lambda r: {"models": ["edm,edm-l32"]}, "model 'edm-l32' does not exist"),
    ("NFE not a number", lambda r: {"nfe": ["1,ten"]}, "--nfe 'ten' is not an integer"),
    ("NFE 0", lambda r: {"nfe": [0]}, "--nfe 0 must be at least 1 (network evaluations)"),
    ("missing report", lambda r: {"reports": [r / "missing"]},
     "no report.json there (give an `echo-synth evaluate` --out folder"),
    ("unreadable report", lambda r: {"reports": [_report(r, "{no json")]}, "not readable JSON"),
    ("foreign report", lambda r: {"reports": [_report(r, json.dumps({"format": "other"}))]},
     "not an echo-synth evaluation report"),
    ("output is a file", lambda r: {"out": _file(r)}, "is a file, not a folder"),
    ("not a device", lambda r: {"device": "gpu"}, "--device 'gpu' is not a device"),
    ("unsupported device", lambda r: {"device": "meta"}, "--device 'meta' is not supported"),
    ("missing run", lambda r: {"models": None, "run": [r / "norun"]}, "no trained run at"),
    ("a Γ-VAE run", lambda r: {"models": None, "run": [_run(r, kind="vae")]},
     "is not a diffusion run (it is a 'vae' run)"),
    ("a run of an unknown model", lambda r: {"models": None, "run": [_run(r, model="edm-l32")]},
     "model 'edm-l32' does not exist"),
]  # fmt: skip


@pytest.mark.parametrize("name, setup, expected", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_every_refusal_is_planned_and_writes_nothing(name, setup, expected, root):
    changes = setup(root)
    before = snapshot(root)
    with pytest.raises(EchoSynthError, match=re.escape(expected)):
        plan_bench(**_args(root, **changes))
    assert snapshot(root) == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_a_gpu_is_refused(root):
    with pytest.raises(EchoSynthError, match="no GPU is available"):
        plan_bench(**_args(root, device="cuda"))


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"preset": "huge", "dtype": "fp16"}, "--preset 'huge'"),
        ({"batch": 0, "repeats": 0}, "--batch 0"),
        ({"run": ["RUN"], "nfe": [0]}, "--models and --run"),
        ({"models": ["edm-l32"], "nfe": [0]}, "edm-l32"),
        ({"nfe": [0], "reports": ["MISSING"]}, "--nfe 0"),
        ({"reports": ["MISSING"], "out": "FILE"}, "--reports"),
        ({"out": "FILE", "device": "gpu"}, "is a file"),
        ({"device": "gpu", "models": None, "run": ["MISSING"]}, "--device 'gpu'"),
    ],
)
def test_two_refusals_come_in_the_commands_order(changes, expected, root):
    values = {"RUN": lambda: _run(root), "MISSING": lambda: root / "missing",
              "FILE": lambda: _file(root)}  # fmt: skip
    changes = {
        key: [values[v]() if v in values else v for v in value] if isinstance(value, list)
        else values[value]() if value in values else value
        for key, value in changes.items()
    }  # fmt: skip
    with pytest.raises(EchoSynthError, match=re.escape(expected)):
        plan_bench(**_args(root, **changes))


def test_the_cpu_default_plans_two_scales_and_writes_nothing(root):
    report = {"format": "echo-synth-evaluation", "runs": []}
    reports = _report(root, json.dumps(report))
    before = snapshot(root)
    plan = plan_bench(device="cpu", out=root / "b", nfe=["5,1", 2, "1"], reports=[reports])
    assert snapshot(root) == before and not (root / "b").exists()
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.preset = "tiny"  # type: ignore[misc]
    assert plan.models == tuple(model_names()) and plan.runs == () and plan.nfes == (1, 2, 5)
    assert [s.name for s in plan.scales] == ["paper", "tiny"]
    assert [s.batch for s in plan.scales] == [1, 4] and not plan.scales[0].compile
    assert plan.device == torch.device("cpu") and plan.autocast is None
    assert plan.notes[0] == "weights are random for the presets: speed does not depend on them"
    reference = paper_reference()
    assert f"{reference.name} at {reference.paper_reference_nfe} NFE" in plan.notes[-1]
    assert any("compilation off on the CPU" in note for note in plan.notes)
    assert plan.reports[0]["_path"] == str(reports / "report.json")
    lines = plan.describe()
    assert all(isinstance(line, str) and line for line in lines)
    assert any("NFEs 1, 2, 5" in line for line in lines)
    assert any("frontier.png of 1 reports" in line for line in lines)
    assert plan.matched_batch is None
    assert any("a matched batch (the smallest that fits)" in line for line in lines)
    plan = plan_bench(**_args(root, matched_batch=2))
    assert plan.matched_batch == 2
    assert any("at matched batch 2" in line for line in plan.describe())


def test_runs_dtype_and_defaults(root):
    run = _run(root)
    plan = plan_bench(run=[run], dtype="bf16", device="cpu", out=root / "b", compile=True)
    assert plan.models == () and plan.runs == (run,) and plan.nfes == DEFAULT_NFES
    assert [s.name for s in plan.scales] == ["runs"] and plan.scales[0].compile
    assert plan.autocast == torch.bfloat16
    assert any(str(run) in line for line in plan.describe())
    logged = []
    plan = plan_bench(**_args(root, log=logged.append))
    assert plan.log is not None and plan == plan_bench(**_args(root))  # the log is not the plan
