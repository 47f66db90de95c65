"""``echo-synth distill``: a student of a trained EDM-family run that trains from the teacher's
weights, records its teacher and levels, samples at the NFEs it was made for, resumes exactly,
and refuses bad input in one line."""

from __future__ import annotations

import pytest
import torch
import yaml
import zarr
from echo_process import assert_resume_is_exact
from typer.testing import CliRunner

from edmcli.cli import app
from edmcli.runs.checkpoint import latest_checkpoint, load_checkpoint

runner = CliRunner()
FAST = ["--batch", "8", "--device", "cpu", "--log-every", "2", "--checkpoint-every", "3",
        "--grid-every", "0", "--validate-every", "3"]  # fmt: skip


@pytest.fixture(scope="module")
def teacher(phantom_store, tmp_path_factory):
    """A tiny view-conditioned EDM-L64 (8 steps) on a tiny Γ-VAE (4 steps)."""
    root = tmp_path_factory.mktemp("teacher")
    vae = root / "vae"
    result = runner.invoke(app, [
        "train-vae", "--data", str(phantom_store), "--latent", "64", "--run", str(vae),
        "--preset", "tiny", "--steps", "4", "--batch", "4", "--base-channels", "8",
        "--device", "cpu",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    run = root / "edm-l64"
    result = runner.invoke(app, [
        "train-diffusion", "--model", "edm-l64", "--data", str(phantom_store), "--vae", str(vae),
        "--run", str(run), "--preset", "tiny", "--steps", "8", "--model-channels", "16",
        "--class-cond", "view", *FAST,
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    return run


def _error(args) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    return " ".join(result.output.split())


def test_a_student_starts_from_its_teacher_records_it_and_samples_its_nfes(teacher, tmp_path):
    from edmcli.runs.diffusion_run import load_diffusion_run
    from edmcli.training.distill import ConsistencyTask
    from edmcli.training.distill_plan import plan_distill

    student = tmp_path / "student"
    plan = plan_distill(teacher, run=student, steps=6, device="cpu")
    task = ConsistencyTask(plan.settings, None, plan.teacher_checkpoint, plan.schedule)
    ema = load_checkpoint(latest_checkpoint(teacher))["ema"]
    for name, tensor in task.build_model().state_dict().items():
        assert torch.equal(tensor, ema[name]), name  # initialised from the teacher
    result = runner.invoke(app, ["distill", "--teacher", str(teacher), "--run", str(student),
                                 "--steps", "6", *FAST])  # fmt: skip
    assert result.exit_code == 0, result.output
    config = yaml.safe_load((student / "config.yaml").read_text())
    record = config["consistency"]
    assert record["method"] == "ect" and set(record["sigmas"]) == {"1", "2", "4"}
    assert record["teacher_sha256"] == plan.teacher_sha256
    assert config["class_cond"] == "view" and config["vae_sha256"]
    assert (student / "teacher" / "config.yaml").is_file()  # the frozen teacher
    loaded = load_diffusion_run("edm-l64", student, torch.device("cpu"))
    assert loaded.step == 6 and loaded.settings.student_levels(1) == [80.0]
    for nfe in (1, 2):
        out = tmp_path / f"nfe{nfe}.zarr"
        sampled = runner.invoke(app, ["sample", "--run", str(student), "--nfe", str(nfe),
                                      "--n", "4", "--no-compile", "--device", "cpu",
                                      "--out", str(out)])  # fmt: skip
        assert sampled.exit_code == 0, sampled.output
        images = zarr.open_group(str(out), mode="r")["images"][:]
        assert images.shape[0] == 4 and images.max() > 0
    base = ["sample", "--run", str(student), "--n", "4", "--no-compile", "--device", "cpu",
            "--out", str(tmp_path / "bad.zarr")]  # fmt: skip
    assert "made for NFE 1, 2, 4, not 3" in _error([*base, "--nfe", "3"])
    assert "solver consistency" in _error([*base, "--nfe", "2", "--solver", "heun"])
    assert "guidance" in _error([*base, "--nfe", "2", "--guidance", "2"])
    teacher_base = ["sample", "--run", str(teacher), "--n", "4", "--no-compile", "--device",
                    "cpu", "--out", str(tmp_path / "t.zarr"),
                    "--solver", "consistency"]  # fmt: skip
    assert "distilled student" in _error(teacher_base)
    assert "already a distilled student" in _error(["distill", "--teacher", str(student),
                                                    "--run", str(tmp_path / "s2")])  # fmt: skip


def test_bad_teachers_are_refused_in_one_line(teacher, tmp_path, phantom_store):
    fake = tmp_path / "sdm-run"
    fake.mkdir()
    (fake / "config.yaml").write_text(yaml.safe_dump({"kind": "diffusion", "model": "sdm",
                                                      "data": str(phantom_store)}))  # fmt: skip
    assert "EDM-family" in _error(["distill", "--teacher", str(fake)])
    empty = tmp_path / "edm-empty"
    empty.mkdir()
    config = yaml.safe_load((teacher / "config.yaml").read_text())
    (empty / "config.yaml").write_text(yaml.safe_dump(config))
    assert "has no checkpoint" in _error(["distill", "--teacher", str(empty)])
    assert "no trained run" in _error(["distill", "--teacher", str(tmp_path / "nothing")])
    corrupt = tmp_path / "edm-corrupt"
    (corrupt / "checkpoints").mkdir(parents=True)
    (corrupt / "config.yaml").write_text(yaml.safe_dump(config))
    (corrupt / "checkpoints" / "checkpoint-00000008.pt").write_bytes(b"not a checkpoint")
    message = _error(["distill", "--teacher", str(corrupt), "--run", str(tmp_path / "s"),
                      "--steps", "2", *FAST])  # fmt: skip
    assert "corrupt" in message and "retrain the teacher" in message
    assert "--method" in _error(["distill", "--teacher", str(teacher), "--method", "cd"])


@pytest.mark.slow
def test_distillation_killed_and_resumed_equals_an_uninterrupted_one(teacher, tmp_path):
    assert_resume_is_exact(["distill", "--teacher", teacher, "--steps", "8", *FAST], tmp_path,
                           kill_after=5, steps=8)  # fmt: skip
