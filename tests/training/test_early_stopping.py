"""Early stopping and learning-rate schedules of the training engine: the pure rules on scripted
validation sequences and hand-computed values, then the Trainer on a tiny regression task
(stop step, checkpoints, exact resume of in-progress and stopped runs, two gloo ranks)."""

from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch
from tiny_nets import Points
from torch import nn

from edmcli.errors import EchoSynthError
from edmcli.runs.checkpoint import latest_checkpoint, load_checkpoint
from edmcli.runs.distributed import DistEnv, shutdown_distributed
from edmcli.training.engine import (
    StoppingState,
    TrainConfig,
    Trainer,
    TrainingInterrupted,
    TrainingTask,
    lr_factor,
    update_stopping,
)

CPU = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


# --------------------------------------------------------------------------- the pure rules
def test_linear_warmup_then_constant():
    assert [lr_factor(s, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_factor(0, 0) == 1.0
    # the plateau schedule is constant between its cuts (the cuts are the state's lr_scale)
    assert lr_factor(7, 4, "plateau", 10) == 1.0


def test_cosine_after_warmup_at_hand_computed_steps():
    # warm-up 2 steps, then 1 → 0.1 over steps 2..10: t = (step − 2) / 8
    f = [lr_factor(s, 2, "cosine", 10, 0.1) for s in range(11)]
    assert f[0] == 0.5 and f[1] == 1.0  # warm-up
    assert f[2] == 1.0  # t = 0
    assert f[4] == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi / 4)) / 2)  # t = 1/4: 0.8682
    assert f[4] == pytest.approx(0.868198, abs=1e-6)
    assert f[6] == pytest.approx(0.55)  # t = 1/2: halfway between 1 and 0.1
    assert f[8] == pytest.approx(0.1 + 0.9 * (1 - math.sqrt(0.5)) / 2)  # t = 3/4: 0.2318
    assert f[10] == pytest.approx(0.1)  # t = 1
    assert all(a >= b for a, b in zip(f[2:], f[3:], strict=False))  # monotone decay
    assert lr_factor(12, 2, "cosine", 10, 0.1) == pytest.approx(0.1)  # past the end: the floor
    assert lr_factor(5, 0, "cosine", 10) == pytest.approx(0.5 * (1 + math.cos(math.pi / 2)))


def _stop_config(**kw):
    base = dict(steps=100, batch=4, validate_every=1)
    return TrainConfig(**{**base, **kw})


def _run(scores, config, steps=None):
    """Feed scores (at steps 1, 2, … unless given) through update_stopping; all states."""
    state, states = StoppingState(), []
    for k, score in enumerate(scores):
        state = update_stopping(state, score, (steps or range(1, len(scores) + 1))[k], config)
        states.append(state)
    return states


def test_patience_counts_validations_without_a_min_delta_improvement():
    cfg = _stop_config(patience=3, min_delta=0.01)
    #        best  +.005 +.009 +.012: counts  flat  flat  flat → stop  (later: ignored)
    scores = [0.5, 0.505, 0.509, 0.512, 0.5, 0.5, 0.5, 0.99]
    states = _run(scores, cfg)
    assert [s.since_best for s in states] == [0, 1, 2, 0, 1, 2, 3, 3]
    assert [s.best for s in states][:4] == [0.5, 0.5, 0.5, 0.512]  # small gains do not move it
    assert [s.stopped for s in states] == [None] * 6 + ["patience", "patience"]
    assert states[-1] == states[-2]  # a stopped state stays stopped
    # without min_delta every gain counts: never three flat validations in a row here
    assert all(s.stopped is None for s in _run(scores[:4], _stop_config(patience=3)))


def test_no_score_changes_nothing():
    cfg = _stop_config(patience=1)
    state = update_stopping(StoppingState(), 0.7, 1, cfg)
    assert update_stopping(state, None, 2, cfg) == state


def test_validations_before_min_steps_do_not_count():
    cfg = _stop_config(patience=2, min_steps=30, validate_every=10)
    states = _run([0.5, 0.5, 0.5, 0.5], cfg, steps=[10, 20, 30, 40])
    assert [s.since_best for s in states] == [0, 0, 1, 2]
    assert [s.stopped for s in states] == [None, None, None, "patience"]  # 2nd at/after 30
    late = _run([0.5, 0.5, 0.6, 0.6, 0.6], cfg, steps=[10, 20, 30, 40, 50])  # improved at 30
    assert [s.stopped for s in late] == [None, None, None, None, "patience"]


def test_plateau_cuts_the_rate_and_keeps_its_floor():
    cfg = _stop_config(lr_schedule="plateau", plateau_patience=2, plateau_factor=0.5,
                       lr_min_ratio=0.2)  # fmt: skip
    states = _run([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0], cfg)
    assert [s.lr_scale for s in states] == [1, 1, 0.5, 0.5, 0.25, 0.25, 0.2, 0.2, 0.2, 0.2]
    assert [s.since_cut for s in states] == [0, 1, 0, 1, 0, 1, 0, 0, 1, 0]
    assert all(s.stopped is None for s in states)  # no patience: never stops
    default_factor = _run([1.0, 1.0, 1.0], _stop_config(lr_schedule="plateau", plateau_patience=2))
    assert default_factor[-1].lr_scale == pytest.approx(0.1)


def test_plateau_then_stop():
    cfg = _stop_config(lr_schedule="plateau", plateau_patience=2, plateau_factor=0.5, patience=5)
    states = _run([0.3] * 6, cfg)
    assert [s.lr_scale for s in states] == [1, 1, 0.5, 0.5, 0.25, 0.25]
    assert states[-1].stopped == "patience" and states[-2].stopped is None


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"lr_schedule": "step"}, "lr_schedule 'step': choose from constant, cosine, plateau"),
        ({"lr_schedule": "plateau"}, "plateau needs plateau_patience"),
        ({"lr_schedule": "plateau", "plateau_patience": 2, "plateau_factor": 1.5},
         "plateau_factor 1.5 must be in"),
        ({"lr_min_ratio": 2.0}, "lr_min_ratio 2.0 must be in"),
        ({"patience": 0}, "patience 0 must be at least 1"),
        ({"min_delta": -1.0}, "min_delta -1.0 must be at least 0"),
        ({"min_steps": -1}, "min_steps -1 must be at least 0"),
        ({"patience": 3, "validate_every": 0}, "set validate_every"),
    ],
)  # fmt: skip
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(EchoSynthError, match=message):
        _stop_config(**settings).validate(1)


# --------------------------------------------------------------------------- the Trainer
class Scripted(TrainingTask):
    """A noisy regression whose validation score is scripted by step (missing steps score
    0); SIGTERM inside step ``sigterm_at`` (as a scheduler would send one)."""

    def __init__(self, scores=None, sigterm_at=None):
        self.scores, self.sigterm_at = scores or {}, sigterm_at
        self.validated: list[int] = []

    def build_model(self):
        return nn.Linear(3, 1)

    def train_dataset(self):
        return Points()

    def loss(self, model, batch, step, epoch):
        pred = model(batch["x"] + 0.01 * torch.randn_like(batch["x"]))[:, 0]
        loss = ((pred - batch["y"]) ** 2).mean()
        if step == self.sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss, {"mse": loss.detach()}

    def validate(self, ema_model, step):
        self.validated.append(step)
        return {"score": self.scores.get(step, 0.0)}


def _config(**kw):
    base = dict(steps=40, batch=4, lr=0.05, checkpoint_every=5, log_every=2, ema_decay=0.9,
                validate_every=3)  # fmt: skip
    return TrainConfig(**{**base, **kw})


def _log(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_default_schedule_is_the_warmup_alone(tmp_path):
    Trainer(Scripted(), _config(steps=8, warmup_steps=4, validate_every=0), tmp_path, CPU).fit()
    lrs = {r["step"]: r["lr"] for r in _log(tmp_path) if "lr" in r}
    assert lrs == {2: 0.05 * 0.5, 4: 0.05, 6: 0.05, 8: 0.05}  # lr of steps 1, 3, 5, 7 (0-based)


def test_cosine_rates_in_the_log(tmp_path):
    cfg = _config(steps=10, warmup_steps=2, lr_schedule="cosine", lr_min_ratio=0.1)
    Trainer(Scripted(), cfg, tmp_path, CPU).fit()
    lrs = {r["step"]: r["lr"] for r in _log(tmp_path) if "lr" in r}
    for logged, rate in lrs.items():  # the record after step s holds the rate of step s − 1
        assert rate == pytest.approx(0.05 * lr_factor(logged - 1, 2, "cosine", 10, 0.1))
    assert lrs[6] == pytest.approx(0.05 * (0.1 + 0.9 * (1 + math.cos(math.pi * 3 / 8)) / 2))


def test_patience_stops_the_run_and_a_rerun_stays_stopped(tmp_path):
    scores = {3: 0.5, 6: 0.6, 9: 0.6, 12: 0.55, 15: 0.6}  # best at 6; 9, 12, 15 flat
    task = Scripted(scores)
    result = Trainer(task, _config(patience=3), tmp_path, CPU).fit()
    assert (result.steps, result.stop_reason) == (15, "patience")
    assert task.validated == [3, 6, 9, 12, 15]
    assert result.steps_per_epoch == 8 and result.epochs == pytest.approx(15 / 8)
    assert latest_checkpoint(tmp_path).name == "checkpoint-00000015.pt"
    state = load_checkpoint(latest_checkpoint(tmp_path))
    assert state["stopping"] == {"best": 0.6, "since_best": 3, "since_cut": 3, "lr_scale": 1.0,
                                 "stopped": "patience"}  # fmt: skip
    assert load_checkpoint(tmp_path / "checkpoints" / "best.pt")["step"] == 6
    log = _log(tmp_path)
    assert log[-1] == {"step": 15, "stopped": "patience"}
    assert [r["val/since_best"] for r in log if "val/since_best" in r] == [0, 0, 1, 2, 3]

    again = Scripted(scores)
    rerun = Trainer(again, _config(patience=3, steps=80), tmp_path, CPU).fit()  # even if longer
    assert (rerun.steps, rerun.resumed_from, rerun.stop_reason) == (15, 15, "patience")
    assert again.validated == [] and latest_checkpoint(tmp_path).name == "checkpoint-00000015.pt"


def test_an_improving_run_ends_at_its_steps(tmp_path):
    scores = {step: step / 100 for step in range(0, 41, 3)}  # always improving
    result = Trainer(Scripted(scores), _config(patience=2), tmp_path, CPU).fit()
    assert (result.steps, result.stop_reason) == (40, "steps")
    assert result.epochs == pytest.approx(5.0)


def test_the_last_off_cadence_validation_does_not_count(tmp_path):
    # steps 10, validate_every 3: validations at 3, 6, 9 (counted) and 10 (the last, not counted)
    scores = {3: 0.5, 6: 0.5, 9: 0.5, 10: 0.4}
    result = Trainer(Scripted(scores), _config(steps=10, patience=3), tmp_path, CPU).fit()
    assert result.stop_reason == "steps"
    assert load_checkpoint(latest_checkpoint(tmp_path))["stopping"]["since_best"] == 2


PLATEAU = dict(patience=6, lr_schedule="plateau", plateau_patience=2, plateau_factor=0.5,
               min_steps=6)  # fmt: skip
# best 0.5 at 6; flat from 9 on (cuts at 12 and 18), stop at 24
PLATEAU_SCORES = {3: 0.1, 6: 0.5, 9: 0.5, 12: 0.4, 15: 0.5, 18: 0.5, 21: 0.2, 24: 0.5}


def _weights(run):
    state = load_checkpoint(latest_checkpoint(run))
    return state["step"], state["model"], state["ema"], state["stopping"]


def test_plateau_cuts_reach_the_optimiser(tmp_path):
    result = Trainer(Scripted(PLATEAU_SCORES), _config(**PLATEAU), tmp_path, CPU).fit()
    assert (result.steps, result.stop_reason) == (24, "patience")
    lrs = {r["step"]: r["lr"] for r in _log(tmp_path) if "lr" in r}
    assert lrs[12] == 0.05 and lrs[14] == 0.025 and lrs[18] == 0.025 and lrs[20] == 0.0125
    scales = {r["step"]: r["lr_scale"] for r in _log(tmp_path) if "lr_scale" in r}
    assert scales == {3: 1, 6: 1, 9: 1, 12: 0.5, 15: 0.5, 18: 0.25, 21: 0.25, 24: 0.125}


@pytest.mark.parametrize("sigterm_at", [13, 19])  # after the first cut / after the second
def test_resume_of_an_interrupted_run_equals_the_uninterrupted_one(tmp_path, sigterm_at):
    full, cut = tmp_path / "full", tmp_path / "cut"
    Trainer(Scripted(PLATEAU_SCORES), _config(**PLATEAU), full, CPU).fit()
    with pytest.raises(TrainingInterrupted, match=f"interrupted at step {sigterm_at + 1}"):
        Trainer(Scripted(PLATEAU_SCORES, sigterm_at), _config(**PLATEAU), cut, CPU).fit()
    assert latest_checkpoint(cut).name == f"checkpoint-{sigterm_at + 1:08d}.pt"
    resumed = Scripted(PLATEAU_SCORES)
    result = Trainer(resumed, _config(**PLATEAU), cut, CPU).fit()
    assert (result.resumed_from, result.steps, result.stop_reason) == (sigterm_at + 1, 24,
                                                                       "patience")  # fmt: skip
    assert resumed.validated == [s for s in range(3, 25, 3) if s > sigterm_at + 1]
    (step_a, model_a, ema_a, stop_a), (step_b, model_b, ema_b, stop_b) = map(_weights, (full, cut))
    assert step_a == step_b == 24 and stop_a == stop_b
    for name in model_a:  # the lr cuts before the interruption were restored, bit for bit
        assert torch.equal(model_a[name], model_b[name]), name
        assert torch.equal(ema_a[name], ema_b[name]), name
    best = [load_checkpoint(r / "checkpoints" / "best.pt")["step"] for r in (full, cut)]
    assert best == [6, 6]


# --------------------------------------------------------------------------- two ranks
class WeightsSeen(Scripted):
    """Keeps the weights that the last training step started from (on every rank)."""

    def loss(self, model, batch, step, epoch):
        self.seen = [p.detach().flatten().tolist() for p in model.parameters()]
        return super().loss(model, batch, step, epoch)


def _ddp_worker(rank, world, init_file, run_dir, out_dir):
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
    )
    try:
        env = DistEnv(rank=rank, world_size=world, local_rank=0, device=torch.device("cpu"))
        task = WeightsSeen(PLATEAU_SCORES)
        result = Trainer(task, _config(**PLATEAU), run_dir, env).fit()
        record = {"steps": result.steps, "reason": result.stop_reason, "weights": task.seen}
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(record, f)
    finally:
        shutdown_distributed()  # barrier, then destroy: the ranks leave gloo together


@pytest.mark.slow
def test_every_rank_stops_with_the_main_one(tmp_path):
    """Only rank 0 validates; the other rank must take its stop (and its lr cuts), or it would
    wait forever at the next all-reduce."""
    import torch.multiprocessing as mp

    run = tmp_path / "ddp"
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "pg"), str(run), str(tmp_path)), nprocs=2)
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["steps"], r["reason"]) for r in records] == [(24, "patience")] * 2
    # the same lr cuts on both ranks keep their replicas identical (DDP averages gradients only)
    assert records[0]["weights"] == records[1]["weights"]
    scales = {r["step"]: r["lr_scale"] for r in _log(run) if "lr_scale" in r}
    assert scales[24] == 0.125
