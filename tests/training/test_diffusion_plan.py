"""The plan of ``train-diffusion``: every refusal before any work (in the stage's order), the
Γ-VAE run checked and hashed but never loaded, no file written and no random number drawn by
planning, and the plan is what the stage trains."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
import yaml
from plan_stores import fake_vae_run, files, tiny_store

from edmcli.errors import EchoSynthError
from edmcli.runs.folder import Dependency, freeze_dependency
from edmcli.training.diffusion import run_train_diffusion
from edmcli.training.diffusion_plan import plan_train_diffusion

TINY = {"preset": "tiny", "device": "cpu", "batch": 2, "model_channels": 16, "steps": 2}


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """16² and 32² stores of 4 samples (2 train), read-only."""
    root = tmp_path_factory.mktemp("plan-stores")
    return {16: tiny_store(root / "s16.zarr"), 32: tiny_store(root / "s32.zarr", 32, 32)}


def _refusal(tmp_path, model, data, **overrides) -> str:
    before = files(tmp_path)
    with pytest.raises(EchoSynthError) as info:
        plan_train_diffusion(model, data, run=tmp_path / "run", **{**TINY, **overrides})
    assert files(tmp_path) == before
    return str(info.value)


@pytest.mark.parametrize(
    "model, overrides, message",
    [
        ("ddim", {}, "model 'ddim' does not exist; valid: sdm, edm, ve, vp, edm-l128, edm-l64"),
        ("edm", {"preset": "huge"}, "preset 'huge' is unknown; choose from paper, tiny"),
        ("edm", {"depth": 3}, "depth: not a setting of a diffusion run"),
        ("edm", {"class_cond": "age"}, "--class-cond 'age' is unknown; choose from none, view"),
        ("edm", {"class_dropout": 0.2}, "class_dropout needs a class conditioning"),
        ("edm", {"class_cond": "view", "class_dropout": 1.0}, "class_dropout 1.0 must be in"),
        ("sdm", {"noise_schedule": "sq"}, "sdm network settings:"),
        ("edm", {"learn_sigma": True}, "edm network settings:"),
        ("edm", {"dropout": 2.0}, "edm network settings:"),
        ("edm", {"batch": 0}, "batch 0 must be at least 1"),
        ("edm", {"steps": None, "kimg": 0}, "kimg 0 must be positive"),
        ("edm", {"device": "tpu"}, "--device 'tpu' is not a device"),
        ("edm", {"lr": -1.0}, "lr -1.0 must be positive"),
        ("edm", {"ema_decay": 1.5}, "ema_decay 1.5 must be in [0, 1)"),
        ("edm", {"grad_clip": -1.0}, "grad_clip -1.0 must be positive"),
        ("edm", {"num_workers": -2}, "num_workers -2 must be at least 0"),
        ("edm", {"warmup_steps": -1}, "weight_decay and warmup_steps must be at least 0"),
        ("edm", {"precision": "fp8"}, "precision 'fp8': choose from"),
        ("edm", {"batch_gpu": 3, "batch": 4}, "batch_gpu 3 must divide the per-process batch 4"),
    ],
)
def test_setting_refusals(stores, tmp_path, model, overrides, message):
    assert message in _refusal(tmp_path, model, stores[16], **overrides)


def test_store_refusals(stores, tmp_path):
    assert "not a dataset store" in _refusal(tmp_path, "edm", tmp_path)
    incomplete = tiny_store(tmp_path / "incomplete.zarr", complete=False)
    assert "is incomplete" in _refusal(tmp_path, "edm", incomplete)
    wide = tiny_store(tmp_path / "wide.zarr", 16, 32)
    assert "has non-square images (16×32)" in _refusal(tmp_path, "edm", wide)
    names = {"0": "background", "1": "lv", "2": "myo", "3": "la", "4": "other"}
    foreign = tiny_store(tmp_path / "foreign.zarr", attrs={"label_names": names})
    assert "does not use the label convention" in _refusal(tmp_path, "edm", foreign)
    bad = tiny_store(tmp_path / "bad.zarr", label_value=9)
    assert "has label values [9] outside the convention 0..4" in _refusal(tmp_path, "edm", bad)
    unknown = tiny_store(tmp_path / "unknown.zarr", views=["unknown"] * 4)
    message = _refusal(tmp_path, "edm", unknown, class_cond="view")
    assert "--class-cond view needs the view of the training images" in message
    assert "needs the view and phase" in _refusal(tmp_path, "edm", unknown, class_cond="view-phase")


def test_gamma_vae_refusals(stores, tmp_path):
    data = stores[32]
    message = _refusal(tmp_path, "edm-l64", data)
    assert "needs a Γ-VAE run" in message and "train-vae --latent 64" in message
    assert "is not a training run (no config.yaml)" in _refusal(
        tmp_path, "edm-l64", data, vae=tmp_path
    )
    other = fake_vae_run(tmp_path / "other", kind="diffusion")
    assert "is not a Γ-VAE run (it is a 'diffusion' run)" in _refusal(
        tmp_path, "edm-l64", data, vae=other
    )
    untrained = fake_vae_run(tmp_path / "untrained", checkpoint=None)
    assert "has no checkpoint yet; train it first" in _refusal(
        tmp_path, "edm-l64", data, vae=untrained
    )
    l128 = fake_vae_run(tmp_path / "l128", latent=128)
    assert "is an L128 but edm-l64 needs an L64" in _refusal(tmp_path, "edm-l64", data, vae=l128)
    small = fake_vae_run(tmp_path / "small", image_size=16)
    message = _refusal(tmp_path, "edm-l64", data, vae=small)
    assert "was trained on 16² images but" in message and "holds 32² images" in message


def test_frozen_gamma_vae_checkpoint_of_a_resumed_run(stores, tmp_path):
    """A run resumes with its own frozen copy of the Γ-VAE checkpoint: gone or changed, it is
    refused by the plan."""
    vae = fake_vae_run(tmp_path / "vae")
    checkpoint = vae / "checkpoints" / "checkpoint-00000004.pt"
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    frozen = freeze_dependency(tmp_path / "run", Dependency("vae", vae, checkpoint, digest))
    plan = plan_train_diffusion("edm-l64", stores[32], vae=vae, run=tmp_path / "run", **TINY)
    assert plan.vae.run == frozen.folder and plan.settings.vae_sha256 == digest
    assert plan.settings.vae_run == str(vae.resolve())
    assert plan.settings.vae_checkpoint == str(checkpoint.resolve())
    frozen.checkpoint.unlink()  # a hard link: the source checkpoint stays as it was
    frozen.checkpoint.write_bytes(b"another checkpoint")
    message = _refusal(tmp_path, "edm-l64", stores[32], vae=vae)
    assert f"the Γ-VAE checkpoint {frozen.checkpoint} changed since the diffusion" in message
    frozen.checkpoint.unlink()
    message = _refusal(tmp_path, "edm-l64", stores[32], vae=vae)
    assert f"the Γ-VAE checkpoint {frozen.checkpoint} no longer exists" in message


def test_refusal_order(stores, tmp_path):
    wide = tiny_store(tmp_path / "wide.zarr", 16, 32)
    assert "does not exist" in _refusal(tmp_path, "ddim", wide, preset="huge")
    assert "preset 'huge'" in _refusal(tmp_path, "edm", wide, preset="huge", class_cond="age")
    assert "--class-cond 'age'" in _refusal(tmp_path, "edm", wide, class_cond="age")
    assert "non-square" in _refusal(tmp_path, "edm-l64", wide, dropout=2.0)
    assert "needs a Γ-VAE run" in _refusal(tmp_path, "edm-l64", stores[32], dropout=2.0)
    assert "network settings" in _refusal(tmp_path, "edm", stores[16], dropout=2.0, batch=0)
    assert "batch 0" in _refusal(tmp_path, "edm", stores[16], batch=0, device="tpu")
    assert "--device 'tpu'" in _refusal(tmp_path, "edm", stores[16], device="tpu", lr=-1.0)


def test_plan_resolves_the_defaults(stores, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng = torch.get_rng_state()
    plan = plan_train_diffusion("edm", stores[16], preset="paper", device="cpu")
    assert torch.equal(torch.get_rng_state(), rng)  # planning draws no random number
    assert plan.run.as_posix() == "runs/edm" and files(tmp_path) == []
    assert plan.train_config.batch == 24 and plan.steps == round(500_000 / 24)  # 500 kimg
    assert plan.n_train == 2 and plan.settings.net_size == 16 and plan.vae is None
    assert plan.resolved["kind"] == "diffusion" and plan.resolved["steps"] == plan.steps
    assert "edm (paper; 16² pixels)" in plan.describe()[0]


def test_latent_plan_measures_sigma_data_and_hashes_without_loading(stores, tmp_path):
    vae = fake_vae_run(tmp_path / "vae", sigma_data=0.1234567)
    checkpoint = vae / "checkpoints" / "checkpoint-00000004.pt"
    rng = torch.get_rng_state()
    plan = plan_train_diffusion("edm-l64", stores[32], vae=vae, run=tmp_path / "run",
                                class_cond="view", **TINY)  # fmt: skip
    assert torch.equal(torch.get_rng_state(), rng)
    s = plan.settings
    assert s.net_size == 8 and s.vae_run == str(vae.resolve())
    assert s.vae_sha256 == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert s.precond["sigma_data"] == 0.123457 and s.sigma_data_source.startswith("measured")
    assert s.class_cond == "view" and s.class_dropout == 0.1 and s.unet["num_classes"] == 2
    text = "\n".join(plan.describe())
    assert "8² latent; classes: view, dropped with p = 0.1" in text and "σ_data 0.123457" in text
    assert "set" == plan_train_diffusion("edm-l64", stores[32], vae=vae, sigma_data=0.5,
                                         **TINY).settings.sigma_data_source  # fmt: skip
    (vae / "latent_stats.json").unlink()
    assumed = plan_train_diffusion("edm-l64", stores[32], vae=vae, **TINY).settings
    assert assumed.sigma_data_source.startswith("assumed")
    # the checkpoint is garbage: only running the plan loads it, and refuses it before any work
    before = files(tmp_path)
    with pytest.raises(EchoSynthError, match="is corrupt"):
        run_train_diffusion(plan)
    assert files(tmp_path) == before


def test_the_stage_trains_what_was_planned(stores, tmp_path):
    run = tmp_path / "run"
    plan = plan_train_diffusion("edm", stores[16], run=run, **TINY)
    assert files(tmp_path) == []
    summary = run_train_diffusion(plan)
    assert summary["steps"] == plan.steps == 2 and summary["model"] == "edm"
    assert yaml.safe_load((run / "config.yaml").read_text()) == plan.resolved
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == plan.steps


def test_centred_latents_are_planned_from_the_gamma_vae_statistics(stores, tmp_path):
    vae = fake_vae_run(tmp_path / "vae", sigma_data=0.2, latent_mean=-0.3)
    plan = plan_train_diffusion("edm-l64", stores[32], vae=vae, run=tmp_path / "run",
                                latent_norm="centred", **TINY)  # fmt: skip
    s = plan.settings
    assert s.latent_norm == {"shift": -0.3, "scale": pytest.approx(2.5), "outside": "mean"}
    assert s.precond["sigma_data"] == 0.5 and s.sigma_data_source.startswith("centred latents")
    assert s.norm.outside_value == 0.0
    assert plan.resolved["latent_norm"] == s.latent_norm  # recorded: resumes must match it
    other = plan_train_diffusion(
        "edm-l64",
        stores[32],
        vae=vae,
        latent_norm="centred",
        latent_outside="background",
        sigma_data=0.25,
        **TINY,
    ).settings
    assert other.latent_norm["scale"] == pytest.approx(1.25) and other.precond["sigma_data"] == 0.25
    assert other.norm.outside_value == pytest.approx(-0.7 * 1.25)
    paper = plan_train_diffusion("edm-l64", stores[32], vae=vae, latent_norm="none", **TINY)
    assert paper.settings.latent_norm is None and paper.settings.precond["sigma_data"] == 0.2


def test_latent_norm_refusals(stores, tmp_path):
    vae = fake_vae_run(tmp_path / "vae", latent_mean=-0.3)
    message = _refusal(tmp_path, "edm-l64", stores[32], vae=vae, latent_norm="zscore")
    assert "--latent-norm 'zscore': choose from none, centred" in message
    message = _refusal(tmp_path, "edm", stores[16], latent_norm="centred")
    assert "--latent-norm centred normalises Γ-VAE latents; edm is a pixel model" in message
    message = _refusal(tmp_path, "edm-l64", stores[32], vae=vae, latent_outside="background")
    assert "--latent-outside applies to normalised latents" in message
    message = _refusal(tmp_path, "edm-l64", stores[32], vae=vae, latent_norm="centred",
                       latent_outside="edge")  # fmt: skip
    assert "--latent-outside 'edge': choose from mean, background" in message
    old = fake_vae_run(tmp_path / "old", sigma_data=0.2)  # statistics without the mean
    message = _refusal(tmp_path, "edm-l64", stores[32], vae=old, latent_norm="centred")
    assert "needs the mean and std of the Γ-VAE run" in message and "latent_stats.json" in message


def test_noise_level_distribution_is_planned_recorded_and_trained(stores, tmp_path):
    plan = plan_train_diffusion("edm", stores[16], run=tmp_path / "run", p_mean=-0.4, p_std=1.0,
                                **TINY)  # fmt: skip
    assert plan.settings.loss == {"P_mean": -0.4, "P_std": 1.0}
    assert plan.resolved["loss"] == {"P_mean": -0.4, "P_std": 1.0}
    assert "training noise levels: ln σ ~ N(-0.4, 1.0²)" in plan.describe()
    from edmcli.training.diffusion import DiffusionTask

    loss = DiffusionTask(plan.settings, None).loss_fn
    assert (loss.P_mean, loss.P_std, loss.sigma_data) == (-0.4, 1.0, 0.5)
    default = plan_train_diffusion("edm", stores[16], run=tmp_path / "run", **TINY).settings
    assert default.loss == {}
    assert (
        DiffusionTask(default, None).loss_fn.P_mean,
        DiffusionTask(default, None).loss_fn.P_std,
    ) == (-1.2, 1.2)


@pytest.mark.parametrize(
    "model, overrides, message",
    [
        ("sdm", {"p_mean": -0.4}, "--p-mean/--p-std set EDM's training noise levels; sdm draws"),
        ("vp", {"p_std": 1.0}, "vp draws its own (edm, edm-l128, edm-l64 take them)"),
        ("edm", {"p_std": 0.0}, "--p-std 0.0 must be positive"),
        ("edm", {"p_mean": float("inf")}, "--p-mean inf must be a finite number"),
    ],
)
def test_noise_level_refusals(stores, tmp_path, model, overrides, message):
    assert message in _refusal(tmp_path, model, stores[16], **overrides)
