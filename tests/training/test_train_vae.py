from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from edmcli.cli import app
from edmcli.runs.checkpoint import latest_checkpoint, load_checkpoint

runner = CliRunner()
TINY = [
    "--latent", "64", "--preset", "tiny", "--batch", "4", "--base-channels", "8",
    "--checkpoint-every", "4", "--log-every", "4", "--grid-every", "8", "--device", "cpu",
]  # fmt: skip


def _cli(args, env_extra=None, torchrun=0):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    launcher = [sys.executable, "-m", "edmcli"]
    if torchrun:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc-per-node={torchrun}", "-m", "edmcli"]  # fmt: skip
    return subprocess.run(launcher + args, env=env, capture_output=True, text=True, timeout=300)


def _weights(run):
    state = load_checkpoint(latest_checkpoint(run))
    return state["step"], state["model"], state["ema"]


@pytest.mark.slow
def test_tiny_vae_trains_reports_and_resumes_identically_after_sigkill(phantom_store, tmp_path):
    args = ["train-vae", "--data", str(phantom_store), "--steps", "20", *TINY]
    full = _cli(args + ["--run", str(tmp_path / "full")])
    assert full.returncode == 0, full.stderr
    summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert summary["steps"] == 20 and summary["val masked PSNR (dB)"] > 0
    assert (tmp_path / "full" / "comparison.png").is_file()
    assert (tmp_path / "full" / "grids" / "recon-00000008.png").is_file()

    drill = {"ECHO_SYNTH_FAULT_KILL": "train-step:10"}
    killed = _cli(args + ["--run", str(tmp_path / "cut")], drill)
    assert killed.returncode == -9
    assert latest_checkpoint(tmp_path / "cut").name == "checkpoint-00000008.pt"
    resumed = _cli(args + ["--run", str(tmp_path / "cut")])
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout
    step_a, model_a, ema_a = _weights(tmp_path / "full")
    step_b, model_b, ema_b = _weights(tmp_path / "cut")
    assert step_a == step_b == 20
    for name in model_a:
        assert torch.equal(model_a[name], model_b[name]), name
        assert torch.equal(ema_a[name], ema_b[name]), name


@pytest.mark.slow
def test_two_process_gloo_run(phantom_store, tmp_path):
    run = tmp_path / "ddp"
    result = _cli(
        ["train-vae", "--data", str(phantom_store), "--steps", "6", "--run-dir", str(run), *TINY],
        torchrun=2,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # rank 0 alone reports: the header on stdout, the metric lines with progress on stderr
    assert result.stdout.count("training Γ-VAE L64") == 1
    assert result.stderr.count("GammaVAETask 6/6:") == 1
    step, model, _ = _weights(run)
    assert step == 6
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [4, 6]


def _error(args):
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    return " ".join(result.output.split())


def test_bad_inputs(phantom_store, tmp_path):
    run = ["--run", str(tmp_path / "r")]
    assert "not a dataset store" in _error(["train-vae", "--data", str(tmp_path), *TINY, *run])
    bad_latent = [a if a != "64" else "96" for a in TINY]
    assert "--latent 96 is not a Γ-VAE size" in _error(
        ["train-vae", "--data", str(phantom_store), *bad_latent, *run]
    )
    assert "unknown; choose from alex, vgg, none, lpips" in _error(
        ["train-vae", "--data", str(phantom_store), *TINY, *run, "--perceptual", "resnet"]
    )


def test_latent_must_divide_image_size(tmp_path, monkeypatch):
    from edmcli.data import prepare_plan
    from edmcli.data.prepare import prepare_phantom

    monkeypatch.setattr(prepare_plan, "SIZE_MULTIPLE", 2)  # a store of another tool's size
    store = tmp_path / "s18.zarr"
    prepare_phantom(store, 4, 18, 0, (0.5, 0.25, 0.25))
    message = _error(["train-vae", "--data", str(store), *TINY, "--run", str(tmp_path / "r")])
    assert "image size 18 is not divisible by 4" in message


def test_incomplete_store(phantom_store, tmp_path):
    import shutil

    import zarr

    copy = tmp_path / "copy.zarr"
    shutil.copytree(phantom_store, copy)
    group = zarr.open_group(str(copy), mode="r+")
    group.attrs["echo_synth"] = {**group.attrs["echo_synth"], "complete": False}
    assert "is incomplete" in _error(["train-vae", "--data", str(copy), *TINY])


def test_missing_lpips_weights_name_the_file(phantom_store, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    message = _error(
        [
            "train-vae",
            "--data",
            str(phantom_store),
            *TINY,
            "--run",
            str(tmp_path / "r"),
            "--perceptual",
            "alex",
        ]  # fmt: skip
    )
    assert "alexnet-owt-7be5be79.pth" in message and str(tmp_path / "torch") in message
    assert "--perceptual none" in message


def test_resume_with_incompatible_config(phantom_store, tmp_path):
    run = ["--run", str(tmp_path / "r"), "--data", str(phantom_store)]
    first = runner.invoke(app, ["train-vae", *run, *TINY, "--steps", "2"])
    assert first.exit_code == 0, first.output
    message = _error(["train-vae", *run, *TINY, "--steps", "4", "--lr", "0.5"])
    assert "was started with lr=0.002 but this command asks for lr=0.5" in message


def test_corrupt_checkpoint_on_resume(phantom_store, tmp_path):
    run = ["--run", str(tmp_path / "r"), "--data", str(phantom_store)]
    assert runner.invoke(app, ["train-vae", *run, *TINY, "--steps", "2"]).exit_code == 0
    ckpt = latest_checkpoint(tmp_path / "r")
    ckpt.write_bytes(b"garbage")
    assert "checkpoint-00000002.pt is corrupt" in _error(["train-vae", *run, *TINY, "--steps", "4"])
    assert ckpt.read_bytes() == b"garbage"


@pytest.mark.parametrize("direction", ["prior-first"])
def test_kl_direction_option_reaches_the_loss(phantom_store, tmp_path, direction):
    run = ["--run", str(tmp_path / "r"), "--data", str(phantom_store)]
    result = runner.invoke(app, ["train-vae", *run, *TINY, "--steps", "1",
                                 "--kl-direction", direction])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "kl_direction: prior-first" in (tmp_path / "r" / "config.yaml").read_text()


@pytest.mark.slow
def test_l128_latent_follows_the_image(phantom_store, tmp_path):
    """The tiny preset's latent weight keeps the L128 latent positively tied to the image; the
    old weight (1.0) leaves it untied (on the calibrated phantom: ≈ 0.07) or inverted (on the old
    high-contrast phantom: < 0; multiplicative Gamma noise makes small z the precise code)."""
    from edmcli.training.vae import train_vae

    def correlation(run, **extra):
        summary = train_vae(phantom_store, 128, run=tmp_path / run, preset="tiny", device="cpu",
                            steps=150, base_channels=8, **extra)  # fmt: skip
        return summary["latent-image correlation"]

    assert correlation("now") > 0.8
    assert correlation("old", w_latent=1.0) < 0.3


def test_latent_statistics_are_recorded_and_measured(phantom_store, tmp_path):
    import json

    import numpy as np

    from edmcli.data.dataset import EchoDataset
    from edmcli.data.labels import sector_mask
    from edmcli.models.gamma_vae import GammaVAE
    from edmcli.runs.vae_run import load_latent_stats, load_vae_run
    from edmcli.training.vae import latent_statistics

    run = tmp_path / "vae"
    result = runner.invoke(app, ["train-vae", "--data", str(phantom_store), "--run", str(run),
                                 "--steps", "4", *TINY])  # fmt: skip
    assert result.exit_code == 0, result.output
    stats = load_latent_stats(run)
    assert stats == json.loads((run / "latent_stats.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["train latent std in the sector (σ_data)"] == stats["sigma_data"]
    vae = load_vae_run(run, torch.device("cpu")).model
    assert isinstance(vae, GammaVAE)
    data = EchoDataset(phantom_store, splits="train")
    items = [data[i] for i in range(len(data))]
    image = torch.stack([it["image"] for it in items])
    labels = torch.stack([it["labels"] for it in items])
    with torch.no_grad():
        latent = vae.encode(image, sector_mask(labels))
    inside = latent[sector_mask(labels, vae.latent_size).bool()].double().numpy()
    np.testing.assert_allclose(stats["sigma_data"], inside.std(), rtol=1e-6)
    np.testing.assert_allclose(stats["mean"], inside.mean(), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(stats["std_all"], latent.double().numpy().std(), rtol=1e-6)
    loader = torch.utils.data.DataLoader(data, batch_size=5)  # batching does not matter
    again = latent_statistics(vae, loader, torch.device("cpu"))
    np.testing.assert_allclose(again["sigma_data"], stats["sigma_data"], rtol=1e-6)
