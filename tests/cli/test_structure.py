"""The package's shape: imports point one way (DESIGN: cli → pipelines → stages → runs, models,
data → kernels), and every package folder is installed."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "edmcli"

# layer of a module → the layers it must never import
FORBIDDEN = {
    "kernels": {"edmcli"},
    "base": {"cli", "pipeline", "training", "sampling", "evaluation", "bench", "runs", "models",
             "data"},
    "data": {"cli", "pipeline", "training", "sampling", "evaluation", "bench", "runs", "models"},
    "models": {"cli", "pipeline", "training", "sampling", "evaluation", "bench", "runs"},
    "runs": {"cli", "pipeline", "training", "sampling", "evaluation", "bench"},
    "training": {"cli", "pipeline", "sampling", "evaluation", "bench"},
    "sampling": {"cli", "pipeline", "training", "evaluation", "bench"},
    "evaluation": {"cli", "pipeline", "sampling", "bench"},
    "bench": {"cli", "pipeline", "training", "evaluation"},
    "pipeline": {"cli"},
    "cli": set(),
}  # fmt: skip
BASE = {"errors", "console", "config", "faults", "settings", "threads", "__init__", "__main__"}
PIPELINES = {"demo", "study", "study_checks"}


def layer_of(module: str) -> str:
    """``edmcli.sampling.sample`` → ``sampling``; ``echo_synth_kernels.x`` → ``kernels``."""
    parts = module.split(".")
    if parts[0] == "echo_synth_kernels":
        return "kernels"
    if parts[0] != "edmcli" or len(parts) == 1:
        return "base"
    head = parts[1]
    if head in ("cli", "__main__"):
        return "cli"
    if head in PIPELINES:
        return "pipeline"
    if head in BASE:
        return "base"
    return head


def imported_modules(path: Path, module: str) -> set[str]:
    """Every module ``path`` imports, at any depth (function-level imports count)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                found.add(".".join(base + ([node.module] if node.module else [])))
            elif node.module:
                found.add(node.module)
    return found


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        yield path, ".".join(rel.parts)
    for path in sorted((ROOT / "kernels").glob("*.py")):
        yield path, "echo_synth_kernels." + path.stem


def violations(import_map: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, imports in import_map.items():
        mine = layer_of(module)
        for target in imports:
            if target.split(".")[0] not in ("edmcli", "echo_synth_kernels", "kernels"):
                continue
            if target.split(".")[0] == "kernels":
                bad.append(f"{module} imports {target} (install name: echo_synth_kernels)")
                continue
            theirs = (
                "edmcli"
                if mine == "kernels" and target.startswith("edmcli")
                else (layer_of(target))
            )
            if theirs in FORBIDDEN[mine]:
                bad.append(f"{module} ({mine}) imports {target} ({theirs})")
    return bad


def test_imports_point_one_way():
    import_map = {module: imported_modules(path, module) for path, module in modules()}
    assert len(import_map) > 40
    assert violations(import_map) == []


@pytest.mark.parametrize(
    "module, target",
    [
        ("edmcli.training.diffusion", "edmcli.sampling.preview"),
        ("edmcli.sampling.sample", "edmcli.training.engine"),
        ("edmcli.models.unet", "edmcli.runs.checkpoint"),
        ("edmcli.data.store", "edmcli.models.registry"),
        ("echo_synth_kernels.spade_norm_op", "edmcli.errors"),
        ("edmcli.runs.folder", "edmcli.training.engine"),
        ("edmcli.models.spade", "kernels"),
    ],
)
def test_the_check_catches_a_wrong_import(module, target):
    assert violations({module: {target}}), f"{module} → {target} should be refused"


def test_every_package_folder_is_installed():
    listed = set(re.findall(r'"(edmcli[\w.]*)"', (ROOT / "pyproject.toml").read_text()))
    folders = {".".join(p.parent.relative_to(ROOT).parts) for p in PACKAGE.rglob("__init__.py")}
    assert folders <= listed, f"add {sorted(folders - listed)} to [tool.setuptools] packages"


STAGES = [
    ("edmcli.data.prepare", "prepare", "edmcli.data.prepare_plan", "plan_prepare"),
    ("edmcli.training.vae", "train_vae", "edmcli.training.vae_plan", "plan_train_vae"),
    ("edmcli.training.diffusion", "train_diffusion", "edmcli.training.diffusion_plan",
     "plan_train_diffusion"),
    ("edmcli.sampling.sample", "sample", "edmcli.sampling.sample_plan", "plan_sample"),
    ("edmcli.evaluation.evaluate", "evaluate", "edmcli.evaluation.evaluate_plan",
     "plan_evaluate"),
    ("edmcli.bench.bench", "bench", "edmcli.bench.bench_plan", "plan_bench"),
]  # fmt: skip


@pytest.mark.parametrize("stage_module, stage, plan_module, plan", STAGES)
def test_every_stage_takes_exactly_its_plans_options(stage_module, stage, plan_module, plan):
    """A stage function is ``run_*(plan_*(...))``: both spell the same options (names, kinds,
    defaults), so a new option cannot reach one and not the other."""
    import importlib
    import inspect

    def options(module, name):
        signature = inspect.signature(getattr(importlib.import_module(module), name))
        return [(p.name, p.kind, p.default) for p in signature.parameters.values()]

    stage_options = [o for o in options(stage_module, stage) if o[0] != "log"]
    plan_options = [o for o in options(plan_module, plan) if o[0] != "log"]
    assert stage_options == plan_options
