"""The plan of ``train-vae``: every refusal before any work (in the stage's order), no file
written and no random number drawn by planning, and the plan is what the stage trains."""

from __future__ import annotations

import pytest
import torch
import yaml
from plan_stores import files, tiny_store

from edmcli.errors import DataError, EchoSynthError
from edmcli.training.vae import run_train_vae
from edmcli.training.vae_plan import plan_train_vae

TINY = {"preset": "tiny", "device": "cpu", "batch": 4, "base_channels": 8, "steps": 2}


def _refusal(data, tmp_path, latent=64, **overrides) -> str:
    before = files(tmp_path)
    with pytest.raises(EchoSynthError) as info:
        plan_train_vae(data, latent, run=tmp_path / "run", **{**TINY, **overrides})
    assert files(tmp_path) == before
    return str(info.value)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"preset": "huge"}, "preset 'huge' is unknown; choose from paper, tiny"),
        ({"depth": 3}, "depth: not a setting of a vae run"),
        ({"latent": 96}, "--latent 96 is not a Γ-VAE size"),
        ({"perceptual": "resnet"}, "unknown; choose from alex, vgg, none, lpips"),
        ({"kl_direction": "sideways"}, "--kl-direction 'sideways': choose from"),
        ({"base_channels": 12}, "Γ-VAE settings:"),
        ({"batch": 0}, "batch 0 must be at least 1"),
        ({"steps": 0}, "steps 0 must be positive"),
        ({"steps": None, "epochs": -1}, "epochs -1 must be positive"),
        ({"steps": None, "epochs": 0.5}, "training needs at least one step (got 0)"),
        ({"device": "tpu"}, "--device 'tpu' is not a device"),
        ({"lr": 0.0}, "lr 0.0 must be positive"),
        ({"ema_decay": 1.0}, "ema_decay 1.0 must be in [0, 1)"),
        ({"num_workers": -1}, "num_workers -1 must be at least 0"),
        ({"weight_decay": -1.0}, "weight_decay and warmup_steps must be at least 0"),
        ({"warmup_steps": -1}, "weight_decay and warmup_steps must be at least 0"),
        ({"grad_clip": 0.0}, "grad_clip 0.0 must be positive"),
        ({"precision": "fp8"}, "precision 'fp8': choose from"),
        ({"batch_gpu": 3}, "batch_gpu 3 must divide the per-process batch 4"),
    ],
)
def test_setting_refusals(phantom_store, tmp_path, overrides, message):
    assert message in _refusal(phantom_store, tmp_path, **overrides)


def test_store_refusals(phantom_store, tmp_path):
    assert "not a dataset store" in _refusal(tmp_path, tmp_path)
    incomplete = tiny_store(tmp_path / "incomplete.zarr", complete=False)
    assert "is incomplete" in _refusal(incomplete, tmp_path)
    wide = tiny_store(tmp_path / "wide.zarr", 16, 32)
    assert "has non-square images (16×32)" in _refusal(wide, tmp_path)
    no_train = tiny_store(tmp_path / "no-train.zarr", splits=("val", "test"))
    assert "has no training split" in _refusal(no_train, tmp_path)
    odd = tiny_store(tmp_path / "s18.zarr", 18, 18)
    assert "image size 18 is not divisible by 4" in _refusal(odd, tmp_path)
    # the store's own refusal is a DataError, as before
    with pytest.raises(DataError):
        plan_train_vae(tmp_path, 64, run=tmp_path / "run", **TINY)


def test_no_gpu_and_the_number_of_processes(phantom_store, tmp_path, monkeypatch):
    if not torch.cuda.is_available():
        assert "asked for CUDA but no GPU is available" in _refusal(
            phantom_store, tmp_path, device="cuda"
        )
    monkeypatch.setenv("WORLD_SIZE", "3")  # under torchrun: the batch splits over 3 processes
    assert "batch 4 must be a positive multiple of the 3 processes" in _refusal(
        phantom_store, tmp_path
    )
    assert plan_train_vae(phantom_store, 64, **{**TINY, "batch": 6}).placement.world_size == 3


def test_missing_lpips_weights_are_refused_by_the_plan(phantom_store, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    message = _refusal(phantom_store, tmp_path, perceptual="alex")
    assert "alexnet-owt-7be5be79.pth" in message and str(tmp_path / "torch") in message
    assert message.endswith("(or train with --perceptual none)")
    # the order stays: the engine's settings are refused first
    assert "lr -1.0 must be positive" in _refusal(
        phantom_store, tmp_path, perceptual="alex", lr=-1.0
    )


def test_refusal_order(phantom_store, tmp_path):
    wide = tiny_store(tmp_path / "wide.zarr", 16, 32)
    assert "preset 'huge'" in _refusal(wide, tmp_path, preset="huge")
    assert "non-square" in _refusal(wide, tmp_path, latent=96, lr=0.0)
    assert "--latent 96" in _refusal(phantom_store, tmp_path, latent=96, batch=0)
    assert "batch 0" in _refusal(phantom_store, tmp_path, batch=0, device="tpu")
    assert "--device 'tpu'" in _refusal(phantom_store, tmp_path, device="tpu", lr=0.0)


def test_plan_resolves_the_defaults(phantom_store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng = torch.get_rng_state()
    plan = plan_train_vae(phantom_store, 128, preset="tiny", device="cpu")
    assert torch.equal(torch.get_rng_state(), rng)  # planning draws no random number
    assert plan.run.as_posix() == "runs/vae-l128" and files(tmp_path) == []
    assert plan.n_train == 24  # 6 train patients × 4 images
    assert plan.steps == 60 * (24 // 16)  # tiny: 60 epochs of batch 16
    assert plan.settings.image_size == 32 and plan.settings.latent_size == 16
    assert plan.settings.data == str(phantom_store.resolve())
    assert plan.resolved["kind"] == "vae" and plan.resolved["steps"] == plan.steps
    assert plan.placement.device_name == "cpu" and plan.placement.resumes_from is None
    text = "\n".join(plan.describe())
    assert "Γ-VAE L128 (32² → 16²)" in text and "60 steps of batch 16" in text


def test_the_stage_trains_what_was_planned(phantom_store, tmp_path):
    run = tmp_path / "run"
    plan = plan_train_vae(phantom_store, 64, run=run, **TINY)
    assert files(tmp_path) == []
    summary = run_train_vae(plan)
    assert summary["steps"] == plan.steps == 2
    assert yaml.safe_load((run / "config.yaml").read_text()) == plan.resolved
    again = plan_train_vae(phantom_store, 64, run=run, **{**TINY, "steps": 3})
    assert again.placement.resumes_from.name == "checkpoint-00000002.pt"
    assert "resumes from checkpoint-00000002.pt" in again.describe()[1]
