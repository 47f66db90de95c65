"""Classifier-free guidance end to end: the seeded class dropout of training, a class-conditional
run through the CLI, guided sampling with honest NFE, and the store's provenance."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from edmcli.cli import app
from edmcli.data.prepare import prepare_phantom
from edmcli.data.store import DatasetStore
from edmcli.errors import EchoSynthError
from edmcli.runs.checkpoint import latest_checkpoint, load_checkpoint
from edmcli.sampling.sample import source_classes
from edmcli.sampling.sample_plan import guided_plan
from edmcli.training.diffusion import class_drop_mask

runner = CliRunner()
TRAIN = ["--model", "edm", "--preset", "tiny", "--batch", "4", "--model-channels", "16",
         "--device", "cpu", "--log-every", "2", "--checkpoint-every", "2", "--grid-every", "0",
         "--validate-every", "0"]  # fmt: skip


def _invoke(args, code=0):
    result = runner.invoke(app, args)
    assert result.exit_code == code, result.output
    return " ".join(result.output.split())


@pytest.fixture(scope="module")
def store16(tmp_path_factory):
    out = tmp_path_factory.mktemp("d") / "p16.zarr"
    prepare_phantom(out, n_patients=6, size=16, seed=5, split_ratio=(0.5, 0.25, 0.25))
    return out


def test_drop_rate_is_p_over_many_draws():
    rows = np.arange(20_000)
    rate = float(class_drop_mask(seed=0, step=3, indices=rows, p=0.1).float().mean())
    # binomial std sqrt(0.1 · 0.9 / 20000) = 0.0021: 0.01 is about 5 std
    assert abs(rate - 0.1) < 0.01
    over_steps = torch.stack([class_drop_mask(1, s, range(200), 0.1) for s in range(100)])
    assert abs(float(over_steps.float().mean()) - 0.1) < 0.01
    # no sample is dropped at every step, nor never (each row's draws are independent over steps)
    per_row = over_steps.float().mean(dim=0)
    assert 0 < float(per_row.min()) and float(per_row.max()) < 0.5
    assert not class_drop_mask(0, 0, rows[:100], 0.0).any()
    assert class_drop_mask(0, 0, rows[:100], 1.0).all()


def test_drop_mask_is_a_function_of_seed_step_and_row():
    rows = [17, 3, 250, 9, 41, 8, 1000, 12]
    mask = class_drop_mask(7, 11, rows, 0.5)
    assert torch.equal(mask, class_drop_mask(7, 11, rows, 0.5))  # deterministic
    # any split of the batch (micro-batches, ranks) and any order give each row the same draw
    split = torch.cat(
        [class_drop_mask(7, 11, rows[:3], 0.5), class_drop_mask(7, 11, rows[3:], 0.5)]
    )
    assert torch.equal(split, mask)
    assert torch.equal(class_drop_mask(7, 11, rows[::-1], 0.5), mask.flip(0))
    many = list(range(64))
    base = class_drop_mask(7, 11, many, 0.5)
    assert not torch.equal(base, class_drop_mask(7, 12, many, 0.5))  # another step
    assert not torch.equal(base, class_drop_mask(8, 11, many, 0.5))  # another seed


def test_guided_plan_counts_both_branches():
    assert guided_plan("heun", 19, None).steps == 10
    assert guided_plan("heun", 19, 1.0).steps == 10  # the conditional branch alone: 1 per call
    guided = guided_plan("heun", 18, 2.0)
    assert (guided.steps, guided.nfe) == (5, 18)  # 5 Heun steps = 9 calls × 2
    assert "9 denoiser calls × 2" in guided.note
    assert guided_plan("euler", 10, 0.5).steps == 5
    with pytest.raises(EchoSynthError, match="use 14 or 18"):
        guided_plan("heun", 16, 2.0)
    with pytest.raises(EchoSynthError, match="use 10 or 12"):
        guided_plan("euler", 11, 3.0)


def test_each_sample_gets_the_class_of_its_source_map():
    columns = {
        "view": np.array(["A2C", "A4C", "A4C", ""]),
        "phase": np.array(["ED", "ES", "ED", "ES"]),
    }
    sources = np.array([1, 1, 0, 3, 2])
    assert source_classes(None, columns, sources) is None
    assert source_classes("view", columns, sources).tolist() == [1, 1, 0, 2, 1]
    assert source_classes("view-phase", columns, sources).tolist() == [3, 3, 0, 4, 2]


@pytest.mark.slow
def test_class_conditional_run_and_guided_sampling_through_the_cli(store16, tmp_path):
    run = tmp_path / "edm-view"
    _invoke(["train-diffusion", "--data", str(store16), "--run", str(run), "--steps", "4",
             "--class-cond", "view", *TRAIN])  # fmt: skip
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["class_cond"] == "view" and config["class_dropout"] == 0.1
    assert config["unet"]["num_classes"] == 2
    state = load_checkpoint(latest_checkpoint(run))
    assert state["ema"]["net.map_class.weight"].shape[0] == 3  # A2C, A4C, null
    metrics = [yaml.safe_load(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(0.0 <= m["null_class"] <= 1.0 for m in metrics if "null_class" in m)

    out = tmp_path / "guided.zarr"
    message = _invoke(["sample", "--run", str(run), "--n", "6", "--nfe", "6", "--guidance", "2",
                       "--chunk", "6", "--batch", "3", "--no-compile", "--device", "cpu",
                       "--out", str(out)])  # fmt: skip
    assert "2 steps = 3 denoiser calls × 2" in message and "= 6 NFE" in message
    store = DatasetStore(out)
    prov = store.info["provenance"]
    assert prov["class_cond"] == "view" and prov["guidance"] == 2.0
    assert prov["nfe"] == 6 and prov["steps"] == 2
    assert prov["network_evaluations_per_denoiser_call"] == 2
    # every synthetic row carries its source map's view (the class it was generated with)
    source = DatasetStore(store16)
    np.testing.assert_array_equal(
        store.column("view"), source.column("view")[store.column("source_index")]
    )

    default = tmp_path / "conditional.zarr"
    _invoke(["sample", "--run", str(run), "--n", "3", "--nfe", "3", "--chunk", "3", "--batch",
             "3", "--no-compile", "--device", "cpu", "--out", str(default)])  # fmt: skip
    assert DatasetStore(default).info["provenance"]["guidance"] == 1.0

    plain = tmp_path / "edm"
    _invoke(["train-diffusion", "--data", str(store16), "--run", str(plain), "--steps", "2",
             *TRAIN])  # fmt: skip
    plain_config = yaml.safe_load((plain / "config.yaml").read_text())
    assert plain_config["class_cond"] is None and "num_classes" not in plain_config["unet"]
    message = _invoke(["sample", "--run", str(plain), "--guidance", "2", "--no-compile",
                       "--device", "cpu", "--out", str(tmp_path / "x.zarr")], code=2)  # fmt: skip
    assert "--guidance needs a model trained with classes" in message
    message = _invoke(["train-diffusion", "--data", str(store16), "--run", str(tmp_path / "bad"),
                       "--class-cond", "colour", *TRAIN], code=2)  # fmt: skip
    assert "--class-cond 'colour' is unknown; choose from none, view, view-phase" in message


@pytest.mark.slow
def test_class_conditional_resume_is_exact(store16, tmp_path):
    args = ["--data", str(store16), "--class-cond", "view-phase", *TRAIN]
    _invoke(["train-diffusion", "--run", str(tmp_path / "a"), "--steps", "4", *args])
    _invoke(["train-diffusion", "--run", str(tmp_path / "b"), "--steps", "2", *args])
    _invoke(["train-diffusion", "--run", str(tmp_path / "b"), "--steps", "4", *args])  # resumes
    a = load_checkpoint(latest_checkpoint(tmp_path / "a"))
    b = load_checkpoint(latest_checkpoint(tmp_path / "b"))
    assert a["step"] == b["step"] == 4
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name


def test_preview_grids_of_a_class_conditional_run_use_the_images_classes(store16, tmp_path):
    """Before: the preview callback got no classes, so a class-conditional run's grids showed
    the null class (unconditional samples), not what sample writes by default."""
    from edmcli.data.dataset import EchoDataset
    from edmcli.training.diffusion import train_diffusion

    seen = []

    def preview(net, labels, settings, vae, class_labels=None):
        seen.append(class_labels)
        return torch.zeros(len(labels), 1, *labels.shape[-2:])

    train_diffusion("edm", store16, run=tmp_path / "edm-view", preset="tiny", device="cpu",
                    preview=preview, class_cond="view", steps=2, batch=4, model_channels=16,
                    grid_every=2, validate_every=0, log_every=2, checkpoint_every=2)  # fmt: skip
    assert seen
    split = DatasetStore(store16).monitoring_split()
    data = EchoDataset(store16, splits=split)
    views = torch.tensor([data[i]["view"] for i in range(min(8, len(data)))])
    for classes in seen:
        assert classes is not None and torch.equal(classes.cpu(), views)  # A2C 0, A4C 1: no null
