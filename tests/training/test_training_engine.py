from __future__ import annotations

import os
import signal

import pytest
import torch
from tiny_nets import Points
from torch import nn

from edmcli.errors import EchoSynthError
from edmcli.runs.checkpoint import (
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from edmcli.runs.distributed import DistEnv
from edmcli.runs.folder import MetricsLog, prepare_run_dir
from edmcli.training.ema import EMA
from edmcli.training.engine import TrainConfig, Trainer, TrainingInterrupted, TrainingTask

CPU = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


class Regression(TrainingTask):
    """y = w·x + b with noise injected from the global RNG (so resume must reseed it)."""

    def __init__(self, nan_at=None, sigterm_at=None):
        self.nan_at, self.sigterm_at = nan_at, sigterm_at

    def build_model(self):
        return nn.Linear(3, 1)

    def train_dataset(self):
        return Points()

    def augmentation(self):
        return lambda item, rng: {**item, "x": item["x"] + float(rng.normal()) * 0.01}

    def loss(self, model, batch, step, epoch):
        pred = model(batch["x"] + 0.01 * torch.randn_like(batch["x"]))[:, 0]
        loss = ((pred - batch["y"]) ** 2).mean()
        if step == self.nan_at:
            loss = loss * float("nan")
        if step == self.sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss, {"mse": loss.detach()}


def _config(**kw):
    base = dict(steps=12, batch=4, lr=0.05, checkpoint_every=5, log_every=2, ema_decay=0.9)
    return TrainConfig(**{**base, **kw})


def test_training_reduces_loss_and_logs(tmp_path):
    import json

    result = Trainer(Regression(), _config(steps=40), tmp_path, CPU).fit()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(2, 41, 2))
    assert result.last_metrics["mse"] < lines[0]["mse"] / 5
    assert latest_checkpoint(tmp_path).name == "checkpoint-00000040.pt"
    assert len(list((tmp_path / "checkpoints").glob("*.pt"))) == 2  # keep_checkpoints


def test_resume_matches_uninterrupted_run(tmp_path):
    full = tmp_path / "full"
    Trainer(Regression(), _config(), full, CPU).fit()
    part = tmp_path / "part"
    Trainer(Regression(), _config(steps=7), part, CPU).fit()  # stops at 7 (checkpoint at 5, 7)
    (part / "checkpoints" / "checkpoint-00000007.pt").unlink()  # as if killed after step 7
    Trainer(Regression(), _config(), part, CPU).fit()
    a = load_checkpoint(latest_checkpoint(full))
    b = load_checkpoint(latest_checkpoint(part))
    for key in ("model", "ema"):
        for name, tensor in a[key].items():
            torch.testing.assert_close(b[key][name], tensor, rtol=0, atol=0)
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in
             (part / "metrics.jsonl").read_text().splitlines()]  # fmt: skip
    assert steps == sorted(set(steps))  # no duplicate log lines after the resume


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    with pytest.raises(EchoSynthError, match="NaN/Inf at step 7.*checkpoint-00000005.pt is kept"):
        Trainer(Regression(nan_at=7), _config(), tmp_path, CPU).fit()
    assert latest_checkpoint(tmp_path).name == "checkpoint-00000005.pt"
    load_checkpoint(latest_checkpoint(tmp_path))  # still loadable


def test_a_run_stopped_on_nan_resumes_with_a_cure_and_only_with_one(tmp_path):
    """Issue 25: after the NaN guard advised a lower learning rate, the corrected command was
    refused on the same run ("started with lr=10.0"): the run folder was poisoned."""
    from edmcli.runs.folder import NAN_STOP_FILE

    settings = {"kind": "toy", "lr": 10.0, "batch": 4}
    assert not prepare_run_dir(tmp_path, settings)
    with pytest.raises(EchoSynthError, match="rerun on this run with a lower --lr"):
        Trainer(Regression(nan_at=7), _config(lr=10.0), tmp_path, CPU).fit()
    assert (tmp_path / NAN_STOP_FILE).is_file()
    with pytest.raises(EchoSynthError, match="stopped on a NaN loss at step 7.*not batch"):
        prepare_run_dir(tmp_path, {**settings, "lr": 0.05, "batch": 8})
    assert prepare_run_dir(tmp_path, {**settings, "lr": 0.05})  # resumes from step 5
    assert not (tmp_path / NAN_STOP_FILE).exists()
    result = Trainer(Regression(), _config(), tmp_path, CPU).fit()
    assert result.steps == 12 and result.resumed_from == 5
    with pytest.raises(EchoSynthError, match="was started with lr=0.05"):
        prepare_run_dir(tmp_path, settings)  # a healthy run keeps its settings


def test_a_run_folder_of_one_kind_is_not_continued_as_another(tmp_path):
    prepare_run_dir(tmp_path, {"kind": "vae", "base_channels": 16})
    save_checkpoint({"step": 1, "model": {}}, checkpoint_path(tmp_path, 1))
    with pytest.raises(EchoSynthError, match="is a Γ-VAE run, not a diffusion run"):
        prepare_run_dir(tmp_path, {"kind": "diffusion", "model": "edm"})


def test_sigterm_writes_a_checkpoint(tmp_path):
    with pytest.raises(TrainingInterrupted, match="interrupted at step 4"):
        Trainer(Regression(sigterm_at=3), _config(), tmp_path, CPU).fit()
    assert latest_checkpoint(tmp_path).name == "checkpoint-00000004.pt"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(
        signal.getsignal(signal.SIGTERM)
    )


def test_corrupt_checkpoint_on_resume(tmp_path):
    Trainer(Regression(), _config(steps=5), tmp_path, CPU).fit()
    ckpt = latest_checkpoint(tmp_path)
    ckpt.write_bytes(ckpt.read_bytes()[:200])
    with pytest.raises(EchoSynthError, match="checkpoint-00000005.pt is corrupt"):
        Trainer(Regression(), _config(), tmp_path, CPU).fit()
    assert ckpt.exists()  # nothing deleted


def test_validation_keeps_the_best_checkpoint(tmp_path):
    scores = {4: 0.5, 8: 0.9, 12: 0.7}

    class Validated(Regression):
        def validate(self, ema_model, step):
            return {"score": scores[step], "mse": 1 - scores[step]}

    result = Trainer(Validated(), _config(validate_every=4), tmp_path, CPU).fit()
    best = load_checkpoint(tmp_path / "checkpoints" / "best.pt")
    assert best["step"] == 8 and best["val"]["score"] == 0.9 and result.best_score == 0.9
    assert '"val/score": 0.7' in (tmp_path / "metrics.jsonl").read_text()


def test_gradient_accumulation_equals_full_batch(tmp_path):
    class Deterministic(Regression):
        def loss(self, model, batch, step, epoch):
            loss = ((model(batch["x"])[:, 0] - batch["y"]) ** 2).mean()
            return loss, {"mse": loss.detach()}

    exact = dict(steps=4, precision="fp32")  # an identity of exact arithmetic
    a = Trainer(Deterministic(), _config(**exact), tmp_path / "a", CPU).fit()
    b = Trainer(Deterministic(), _config(**exact, batch_gpu=2), tmp_path / "b", CPU).fit()
    sa, sb = (load_checkpoint(r.checkpoint)["model"] for r in (a, b))
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-6)


def test_precision_choice_per_device(monkeypatch):
    from edmcli.training import engine

    cpu = torch.device("cpu")
    assert engine.autocast_dtype("fp32", cpu) is None  # the exact path
    assert engine.autocast_dtype("bf16", cpu) is torch.bfloat16  # asked for: honoured on CPU
    with pytest.raises(EchoSynthError, match="fp16 needs a CUDA device"):
        engine.autocast_dtype("fp16", cpu)
    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda: True)
    assert engine.autocast_dtype("auto", cpu, cpu_auto_bf16=True) is torch.bfloat16
    assert engine.autocast_dtype("auto", cpu) is None  # the generators: fp32 on every CPU
    assert engine.autocast_dtype("bf16", cpu) is torch.bfloat16
    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda: False)
    assert engine.autocast_dtype("auto", cpu, cpu_auto_bf16=True) is None  # emulated: fp32
    cuda = torch.device("cuda")
    assert engine.autocast_dtype("auto", cuda) is torch.bfloat16
    assert engine.autocast_dtype("fp16", cuda) is torch.float16


class _Conv(Regression):
    channels_last = True

    def build_model(self):
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(64, 1))

    def loss(self, model, batch, step, epoch):
        seen.append(
            (
                torch.is_autocast_cpu_enabled(),
                model[0].weight.is_contiguous(memory_format=torch.channels_last)
                and not model[0].weight.is_contiguous(),
            )
        )
        out = model(batch["x"][:, :, None, None].expand(-1, -1, 4, 4))[:, 0].float()
        loss = ((out - batch["y"]) ** 2).mean()
        return loss, {"mse": loss.detach()}


seen: list[tuple[bool, bool]] = []


@pytest.mark.parametrize(
    ("precision", "expected"), [("bf16", (True, True)), ("fp32", (False, False))]
)
def test_bf16_on_cpu_autocasts_and_uses_channels_last_where_asked(tmp_path, precision, expected):
    seen.clear()
    result = Trainer(_Conv(), _config(steps=3, precision=precision), tmp_path, CPU).fit()
    assert seen == [expected] * 3
    state = load_checkpoint(result.checkpoint)
    assert all(v.dtype == torch.float32 for v in state["model"].values())  # fp32 weights
    assert all(v.dtype == torch.float32 for v in state["ema"].values())


def test_config_validation():
    with pytest.raises(EchoSynthError, match="batch_gpu 3 must divide"):
        _config(batch_gpu=3).validate(1)
    with pytest.raises(EchoSynthError, match="multiple of the 3 processes"):
        _config().validate(3)
    with pytest.raises(EchoSynthError, match="precision"):
        _config(precision="fp8").validate(1)


def test_run_dir_refuses_incompatible_resume(tmp_path):
    assert prepare_run_dir(tmp_path / "r", {"lr": 1e-3, "steps": 10}) is False
    save_checkpoint({"step": 2, "model": {}}, checkpoint_path(tmp_path / "r", 2))
    assert prepare_run_dir(tmp_path / "r", {"lr": 1e-3, "steps": 20}) is True  # longer: fine
    with pytest.raises(EchoSynthError, match="started with lr=0.001 but this command asks"):
        prepare_run_dir(tmp_path / "r", {"lr": 1e-2, "steps": 20})
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(EchoSynthError, match="not a training run"):
        prepare_run_dir(tmp_path / "other", {"lr": 1})


def test_metrics_log_drops_lines_past_the_resumed_step(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 2}\n{"step": 4}\n{"step": 6}\n{"step": 8, "cut')
    MetricsLog(path, resume_step=4)
    assert path.read_text() == '{"step": 2}\n{"step": 4}\n'


def test_ema_tracks_weights_with_warmup():
    model = nn.Linear(2, 1)
    ema = EMA(model, decay=0.9)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model, step=0)  # warm-up: d = min(0.9, 1/10)
    torch.testing.assert_close(ema.model.weight, 0.1 * start + 0.9)
    for step in range(1, 200):
        ema.update(model, step=step)  # later d = 0.9: converges to the weights
    torch.testing.assert_close(ema.model.weight, model.weight.detach(), atol=1e-6, rtol=0)
    with pytest.raises(ValueError):
        EMA(model, decay=1.0)


def test_ema_update_equals_a_lerp_per_tensor():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Linear(6, 3))
    ema = EMA(model, decay=0.95)
    reference = [p.detach().clone() for p in model.parameters()]
    for step in range(12):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
            model[1].running_mean.add_(1.0)
        ema.update(model, step)
        d = min(0.95, (1.0 + step) / (10.0 + step))
        for r, p in zip(reference, model.parameters(), strict=True):
            r.lerp_(p.detach(), 1.0 - d)
    for r, e in zip(reference, ema.model.parameters(), strict=True):
        assert torch.equal(r, e)  # bit for bit
    assert torch.equal(ema.model[1].running_mean, model[1].running_mean)  # buffers copied
