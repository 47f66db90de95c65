"""Downstream runs train until convergence: the run length (epoch cap, step budget), the stop
reason, the presets' early-stopping settings, and a tiny ``evaluate`` that records them."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from edmcli.errors import EchoSynthError
from edmcli.evaluation.evaluate import evaluate
from edmcli.evaluation.run_length import (
    RunLength,
    run_length,
    stop_reason,
    stopping_config,
)
from edmcli.settings import resolve
from edmcli.training.engine import TrainConfig


def test_paper_preset_trains_until_convergence_within_250_epochs():
    for task, batch in (("seg", 16), ("cls", 32)):
        values = resolve(task, "paper", {})
        assert values["lr"] == 1e-4 and values["weight_decay"] == 0.0  # Adam, lr 1e-4
        length = run_length(values, n_train=1600)  # CAMUS-sized: 400 patients × 4 images
        assert length == RunLength(250 * (1600 // batch), 1600 // batch, 250)
        assert stop_reason("steps", length.steps, length) == "cap"
        assert stop_reason("patience", 3000, length) == "patience"
        config = TrainConfig(steps=length.steps, batch=batch, validate_every=1600 // batch,
                             **stopping_config(values))  # fmt: skip
        config.validate(1)  # the engine takes the preset's stopping settings
        assert config.patience > config.plateau_patience  # a cut before every stop
        assert config.lr_schedule == "plateau" and values["warmup_steps"] > 0


def test_tiny_preset_stops_at_its_budget_or_its_cap_whichever_comes_first():
    values = resolve("cls", "tiny", {})
    small = run_length(values, n_train=80)  # the demo's real store: 5 steps per epoch
    assert small == RunLength(min(400, 80 * 5), 5, 80)
    assert stop_reason("steps", small.steps, small) == "cap"
    large = run_length(values, n_train=440)  # its synthetic store: 27 steps per epoch
    assert large == RunLength(400, 27, 80)
    assert stop_reason("steps", 400, large) == "steps"  # the budget, well before 80 epochs
    tiny_store = run_length(values, n_train=32)  # 2 steps per epoch: the cap binds at 160
    assert tiny_store.steps == 160 and stop_reason("steps", 160, tiny_store) == "cap"


def test_a_length_on_the_command_line_replaces_budget_and_cap():
    by_steps = run_length(resolve("seg", "tiny", {"steps": 1000}), n_train=440)
    assert by_steps == RunLength(1000, 27, None)
    assert stop_reason("steps", 1000, by_steps) == "steps"
    by_epochs = run_length(resolve("seg", "tiny", {"epochs": 30}), n_train=440)
    assert by_epochs == RunLength(30 * 27, 27, 30)
    assert stop_reason("steps", 30 * 27, by_epochs) == "cap"
    with pytest.raises(EchoSynthError, match="epochs -2 must be positive"):
        run_length(resolve("seg", "tiny", {"epochs": -2}), n_train=440)


def test_stopping_settings_default_to_off():
    values = {"batch": 4, "steps": 10}
    assert set(stopping_config(values).values()) == {None}
    config = TrainConfig(steps=10, batch=4, **stopping_config(values))
    config.validate(1)  # without validations: no patience, no plateau
    assert stopping_config({"patience": 3.0, "min_delta": "0.01"}) == {
        "lr_schedule": None, "lr_min_ratio": None, "plateau_patience": None,
        "plateau_factor": None, "patience": 3, "min_delta": 0.01, "min_steps": None,
    }  # fmt: skip


@pytest.fixture
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.usefixtures("_one_thread")
def test_evaluate_records_epochs_and_why_each_run_stopped(phantom_store, tmp_path):
    common = {"size": 32, "batch": 4, "validate_every": 2}
    # 24 train images / batch 4 = 6 steps per epoch. A min_delta of 1 (no Dice can gain that
    # much) scripts a flat validation score: best at step 2, flat at 4 and 6 → stops at 6.
    flat = {**common, "steps": 40, "patience": 2, "min_delta": 1.0, "min_steps": 4,
            "plateau_patience": 1}  # fmt: skip
    out = tmp_path / "patience"
    args = dict(preset="tiny", tasks=("seg",), device="cpu", bootstrap_iterations=20)
    report = evaluate([str(phantom_store)], phantom_store, out, overrides=flat, **args)
    (run,) = report["runs"]
    assert (run["steps"], run["epochs"], run["stop_reason"]) == (6, 1.0, "patience")
    assert run["best_step"] in (2, 4, 6) and run["train_config"]["patience"] == 2
    run_dir = out / "runs" / run["name"]
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["patience"] == 2 and config["lr_schedule"] == "plateau"  # the preset's
    log = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert log[-1] == {"step": 6, "stopped": "patience"}
    assert [r["lr_scale"] for r in log if "lr_scale" in r] == [1.0, 0.5, 0.25]
    md = (out / "report.md").read_text()
    best = run["best_step"]
    assert f"(step {best} of 6, 1.0 epochs, stopped by its validation score stopped improving" in md

    again = evaluate([str(phantom_store)], phantom_store, out, overrides=flat, **args)
    (rerun,) = again["runs"]  # a stopped run stays stopped: nothing is trained
    assert (rerun["resumed_from"], rerun["steps"], rerun["stop_reason"]) == (6, 6, "patience")
    assert rerun["metrics"] == run["metrics"]

    capped = {**common, "epochs": 2}  # the tiny preset's patience never runs out in 12 steps
    out = tmp_path / "cap"
    report = evaluate([str(phantom_store)], phantom_store, out, overrides=capped,
                      **{**args, "tasks": ("cls",)})  # fmt: skip
    (run,) = report["runs"]
    assert (run["steps"], run["epochs"], run["stop_reason"]) == (12, 2.0, "cap")
    assert "of 12, 2.0 epochs, stopped by the epoch cap)" in (out / "report.md").read_text()
