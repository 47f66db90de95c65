"""``echo-synth evaluate`` end to end on the 32² phantom fixture, and its refusals."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import zarr
from fake_reports import fake_report, fake_run
from typer.testing import CliRunner

from edmcli.cli import app
from edmcli.data.prepare import prepare_phantom
from edmcli.data.store import DatasetStore
from edmcli.errors import EchoSynthError
from edmcli.evaluation.downstream import (
    build_segmenter,
    build_view_classifier,
    segmenter_layout,
)
from edmcli.evaluation.report import write_report
from edmcli.evaluation.report.plots import nfe_series, plot_vs_nfe
from edmcli.evaluation.train_specs import choose_validation, parse_train_spec
from edmcli.runs.folder import record_training_patients

runner = CliRunner()
FAST = [
    "--preset", "tiny", "--size", "32", "--steps", "3", "--batch", "4", "--validate-every", "3",
    "--bootstrap", "100", "--device", "cpu",
]  # fmt: skip
PNG = b"\x89PNG"


@pytest.fixture(autouse=True)
def _one_thread():
    """EfficientNet's many small ops make OpenMP barriers crawl when the 2 cores are shared
    (one thread: 0.4 s per step; two under load: up to 30 s), so these tests use one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _fake_synthetic(path, real, nfe=50, model="edm-l64", **provenance):
    """A phantom store (other seed, no val/test split) posing as ``sample`` output from label
    maps of ``real``; the generator learnt from the real store's train + val patients."""
    prepare_phantom(path, n_patients=3, size=32, seed=nfe, split_ratio=(1.0, 0.0, 0.0))
    group = zarr.open_group(str(path), mode="r+")
    info = dict(group.attrs["echo_synth"])
    info["provenance"] = {
        "source": "synthetic", "model": model, "nfe": nfe, "solver": "heun",
        "run": str(path.parent / "no-such-run"),
        "generator_patients": DatasetStore(real).patients(["train", "val"]),
        "label_store": str(real), **provenance,
    }  # fmt: skip
    group.attrs["echo_synth"] = info
    return path


def _invoke(args):
    return runner.invoke(app, ["evaluate", *[str(a) for a in args]])


def _error(args) -> str:
    result = _invoke(args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    return lines[0]


@pytest.mark.slow
def test_real_and_synthetic_runs_report_and_resume(phantom_store, tmp_path):
    synthetic = _fake_synthetic(tmp_path / "syn.zarr", phantom_store)
    out = tmp_path / "eval"
    args = ["--train", phantom_store, "--train", synthetic, "--test", phantom_store,
            "--out", out, *FAST]  # fmt: skip
    first = _invoke(args)
    assert first.exit_code == 0, first.output
    assert "tested: the best checkpoint on real images: the val split of" in first.output
    report = json.loads((out / "report.json").read_text())
    runs = {(r["task"], r["kind"]): r for r in report["runs"]}
    assert sorted(runs) == [("cls", "real"), ("cls", "synthetic"), ("seg", "real"),
                            ("seg", "synthetic")]  # fmt: skip
    n_test = len(DatasetStore(phantom_store).indices("test"))
    for (task, _kind), r in runs.items():
        assert r["steps"] == 3 and r["best_step"] == 3
        metric = "dice_mean" if task == "seg" else "accuracy"
        est = r["metrics"][metric]
        boot = est["patient_bootstrap"]
        assert 0.0 <= boot["ci_low"] <= est["value"] <= boot["ci_high"] <= 1.0
        assert est["n"] == n_test and boot["iterations"] == 100
        assert est["paper_subsets"]["iterations"] == 100
        assert len(r["per_image"][metric if task == "seg" else "correct"]) == n_test
    seg_real, seg_syn = runs[("seg", "real")], runs[("seg", "synthetic")]
    assert report["references"]["seg"] == seg_real["name"]
    assert seg_syn["validation"]["store"] == str(phantom_store.resolve())
    assert seg_syn["model"] == "edm-l64" and seg_syn["nfe"] == 50
    assert seg_syn["train_stores"][0]["provenance"]["source"] == "synthetic"
    gap = seg_syn["gap_to_reference"]["dice_mean"]["value"]
    dice = [np.mean(r["per_image"]["dice_mean"]) for r in (seg_syn, seg_real)]
    assert gap == pytest.approx(dice[0] - dice[1])
    assert "hd_lv_mm" in seg_real["metrics"]  # the phantom has a pixel spacing
    assert np.sum(runs[("cls", "real")]["confusion_matrix"]) == n_test
    assert report["test"]["patients"] == DatasetStore(phantom_store).patients("test")
    assert report["settings"]["preset"] == "tiny" and report["settings"]["seed"] == 0
    for name in ("dice", "accuracy", "examples_seg", "examples_cls"):
        assert (out / "plots" / f"{name}.png").read_bytes()[:4] == PNG
    md = (out / "report.md").read_text()
    assert "| training data | kind |" in md and "reference" in md and "edm-l64" in md
    predictions = np.load(out / "runs" / seg_real["name"] / "test_predictions.npz")
    assert predictions["labels"].shape == (n_test, 32, 32)

    again = _invoke(args)  # rerun: resumes finished runs, trains nothing, same numbers
    assert again.exit_code == 0, again.output
    assert again.output.count("resuming") == 4
    second = json.loads((out / "report.json").read_text())
    for a, b in zip(report["runs"], second["runs"], strict=True):
        assert a["metrics"] == b["metrics"] and b["resumed_from"] == 3


def test_other_image_sizes_are_resampled_with_a_notice(phantom_store, tmp_path):
    other = tmp_path / "p40.zarr"
    prepare_phantom(other, n_patients=4, size=40, seed=7, split_ratio=(0.5, 0.25, 0.25))
    result = _invoke(["--train", other, "--test", phantom_store, "--out", tmp_path / "e",
                      "--task", "seg", *FAST])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "has 40×40 images; they are resampled to 32×32" in " ".join(result.output.split())
    report = json.loads((tmp_path / "e" / "report.json").read_text())
    assert report["runs"][0]["train_stores"][0]["image_size"] == [40, 40]
    assert report["references"]["seg"] == report["runs"][0]["name"]


def test_test_split_overlapping_the_generator_is_refused(phantom_store, tmp_path):
    test_patient = DatasetStore(phantom_store).patients("test")[0]
    leaky = _fake_synthetic(tmp_path / "leaky.zarr", phantom_store)
    group = zarr.open_group(str(leaky), mode="r+")
    info = dict(group.attrs["echo_synth"])
    info["provenance"]["generator_patients"].append(test_patient)
    group.attrs["echo_synth"] = info
    line = _error(["--train", leaky, "--test", phantom_store, "--out", tmp_path / "e", *FAST])
    assert "shares 1 patient(s) with the patients the generator of leaky was trained on" in line
    assert test_patient in line and "held out" in line


def test_generator_run_record_is_checked(phantom_store, tmp_path):
    # the diffusion run's record, and its Γ-VAE run's (before: only the diffusion run's)
    for key in ("run", "vae_run"):
        run = tmp_path / f"{key}-folder"
        run.mkdir()
        record_training_patients(run, phantom_store, splits=("train", "val", "test"))
        store = _fake_synthetic(tmp_path / f"{key}.zarr", phantom_store, **{key: str(run)})
        line = _error(["--train", store, "--test", phantom_store, "--out", tmp_path / "e", *FAST])
        assert "shares 3 patient(s) with the patients the generator" in line
    unrecorded = _fake_synthetic(tmp_path / "u.zarr", phantom_store, generator_patients=[])
    line = _error(["--train", unrecorded, "--test", phantom_store, "--out", tmp_path / "e", *FAST])
    assert "does not record the patients its generator was trained on" in line


def test_a_real_train_store_sharing_test_patients_is_refused(phantom_store, tmp_path):
    copy = tmp_path / "copy.zarr"
    shutil.copytree(phantom_store, copy)
    group = zarr.open_group(str(copy), mode="r+")
    group["split"][:] = np.where(group["split"][:] == "test", "train", group["split"][:])
    line = _error(["--train", copy, "--test", phantom_store, "--out", tmp_path / "e", *FAST])
    assert "shares 3 patient(s) with the train split of" in line


def _copy_with(phantom_store, tmp_path, name, field, old, new):
    copy = tmp_path / name
    shutil.copytree(phantom_store, copy)
    group = zarr.open_group(str(copy), mode="r+")
    values = np.asarray(group[field][:])
    group[field][:] = np.where(values == old, new, values) if old else np.full_like(values, new)
    return copy


def test_classification_needs_both_views(phantom_store, tmp_path):
    a4c_only = _copy_with(phantom_store, tmp_path, "a4c.zarr", "view", "A2C", "A4C")
    args = ["--out", tmp_path / "e", "--task", "cls", *FAST]
    line = _error(["--train", a4c_only, "--test", phantom_store, *args])
    assert f"--train {a4c_only.resolve()} has no A2C images in its train split" in line
    line = _error(["--train", phantom_store, "--test", a4c_only, *args])
    assert "--test" in line and "has no A2C images in its test split" in line
    # Segmentation does not care about views.
    seg = _invoke(["--train", a4c_only, "--test", a4c_only, *args, "--task", "seg", "--steps", "1"])
    assert seg.exit_code == 0, seg.output


def test_empty_splits_and_bad_stores(phantom_store, tmp_path):
    no_test = tmp_path / "no-test.zarr"
    prepare_phantom(no_test, n_patients=3, size=32, seed=11, split_ratio=(1.0, 0.0, 0.0))
    args = ["--out", tmp_path / "e", *FAST]
    assert "has no samples in its test split" in _error(
        ["--train", phantom_store, "--test", no_test, *args]
    )
    no_train = _copy_with(phantom_store, tmp_path, "no-train.zarr", "split", "train", "val")
    assert "has no samples in its train split" in _error(
        ["--train", no_train, "--test", phantom_store, *args]
    )
    assert "not a dataset store" in _error(["--train", tmp_path, "--test", phantom_store, *args])
    synthetic_test = _fake_synthetic(tmp_path / "syn.zarr", phantom_store)
    assert "is a synthetic store; test on real images" in _error(
        ["--train", phantom_store, "--test", synthetic_test, *args]
    )
    assert "batch 64 is larger than the 24 training images" in _error(
        ["--train", phantom_store, "--test", phantom_store, *args, "--batch", "64"]
    )
    ok = ["--train", phantom_store, "--test", phantom_store, *args]
    refused = runner.invoke(app, ["evaluate", *[str(a) for a in ok], "--precision", "fp8"])
    assert refused.exit_code == 2 and "'fp8' is not one of" in refused.output
    assert "--bootstrap 0 must be at least 1" in _error([*ok, "--bootstrap", "0"])
    assert "--size 20 must be a multiple of 8" in _error([*ok, "--size", "20"])
    assert not (tmp_path / "e").exists()  # refused before anything was written


def test_checkpoint_choice_defaults_to_real_validation_images(phantom_store, tmp_path):
    synthetic_path = _fake_synthetic(tmp_path / "syn.zarr", phantom_store)
    # a synthetic store WITH a val split (sample --holdout): still not used by default
    held = tmp_path / "held.zarr"
    prepare_phantom(held, n_patients=4, size=32, seed=21, split_ratio=(0.5, 0.5, 0.0))
    group = zarr.open_group(str(held), mode="r+")
    info = dict(group.attrs["echo_synth"])
    info["provenance"] = dict(
        zarr.open_group(str(synthetic_path)).attrs["echo_synth"]["provenance"]
    )
    group.attrs["echo_synth"] = info
    synthetic, holdout = parse_train_spec(str(synthetic_path)), parse_train_spec(str(held))
    real = parse_train_spec(str(phantom_store))
    test = str(phantom_store)
    store, split, how = choose_validation(real, [real], test, "seg")
    assert (store, split) == (real.stores[0], "val") and "real images" in how
    store, _, how = choose_validation(holdout, [holdout, real], test, "seg")
    assert store == real.stores[0] and "real images" in how  # before: the synthetic val split
    store, _, how = choose_validation(synthetic, [synthetic], test, "cls")
    assert store == test and "real images" in how
    store, _, how = choose_validation(holdout, [holdout, real], test, "seg", "synthetic")
    assert store == holdout.stores[0] and "val split of" in how
    with pytest.raises(EchoSynthError, match="sample --holdout"):
        choose_validation(synthetic, [synthetic], test, "seg", "synthetic")
    assert choose_validation(synthetic, [synthetic], test, "seg", "last")[:2] == (None, None)
    store, _, _ = choose_validation(synthetic, [synthetic], test, "seg", "real", str(phantom_store))
    assert store == real.stores[0]
    with pytest.raises(EchoSynthError, match="is a synthetic store"):
        choose_validation(synthetic, [synthetic], test, "seg", "real", str(synthetic_path))
    no_val = tmp_path / "no-val.zarr"
    prepare_phantom(no_val, n_patients=4, size=32, seed=13, split_ratio=(0.75, 0.0, 0.25))
    with pytest.raises(EchoSynthError, match="no real store has a val split"):
        choose_validation(synthetic, [synthetic], str(no_val), "seg")


def test_last_checkpoint_is_tested_without_validation(phantom_store, tmp_path):
    out = tmp_path / "eval"
    result = _invoke(["--train", phantom_store, "--test", phantom_store, "--out", out,
                      "--task", "seg", "--checkpoint", "last", *FAST])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "tested: the last checkpoint (no validation)" in result.output
    run = next((out / "runs").iterdir())
    assert not (run / "checkpoints" / "best.pt").exists()
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["checkpoint"] == "last"


def test_network_layouts_follow_the_image_size():
    assert segmenter_layout(32) == ([3, 3, 3], [1, 2, 2])
    assert segmenter_layout(64)[1] == [1, 2, 2, 2]
    assert segmenter_layout(256)[1] == [1, 2, 2, 2, 2, 2]  # 8² at the bottom, nnU-Net's rule
    assert segmenter_layout(48)[1] == [1, 2, 2]  # 48 → 24 → 12
    net = build_segmenter(32, base_filters=4, max_filters=8, deep_supervision=True)
    x = torch.rand(2, 1, 32, 32)
    assert net.train()(x).shape == (2, 2, 4, 32, 32)  # main output + 1 head, 4 classes
    assert net.eval()(x).shape == (2, 4, 32, 32)
    classifier = build_view_classifier().eval()
    assert classifier.features[0][0].in_channels == 1
    assert classifier(x).shape == (2, 2)


def _run(name, task, kind, model=None, nfe=None, **metrics):
    return fake_run(name, task, kind, model, nfe, **metrics)


def test_fig3_plots_against_nfe(tmp_path):
    runs = [_run("seg-real", "seg", "real", dice_mean=0.9, hd_lv_mm=5.0),
            _run("cls-real", "cls", "real", accuracy=0.95, balanced_accuracy=0.95)]  # fmt: skip
    for model, base in (("edm-l64", 0.8), ("ve", 0.7)):
        for nfe in (50, 10, 100):
            slug = f"{model}-{nfe}"
            runs.append(_run(f"seg-{slug}", "seg", "synthetic", model, nfe,
                             dice_mean=base + nfe / 1000, hd_lv_mm=9.0 - nfe / 50))  # fmt: skip
            runs.append(_run(f"cls-{slug}", "cls", "synthetic", model, nfe,
                             accuracy=base, balanced_accuracy=base))  # fmt: skip
    report = fake_report(runs)
    series = nfe_series(report, "seg", "dice_mean")
    assert [n for n, _, _ in series["edm-l64"]] == [10, 50, 100]
    assert series["ve"][0][1] == pytest.approx(0.71)
    written = write_report(report, tmp_path)
    names = sorted(p.name for p in written)
    assert names == ["accuracy.png", "dice.png", "report.json", "report.md", "vs_nfe.png"]
    assert (tmp_path / "plots" / "vs_nfe.png").read_bytes()[:4] == PNG
    assert json.loads((tmp_path / "report.json").read_text())["plots"][-1] == "plots/vs_nfe.png"
    assert plot_vs_nfe({**report, "runs": runs[:3]}, tmp_path / "none.png") is None


def test_a_downstream_run_in_use_is_refused(phantom_store, tmp_path):
    from edmcli.runs.lock import run_lock
    from edmcli.runs.output_folder import mark_output_folder

    out = tmp_path / "eval"
    mark_output_folder(out, "evaluation")  # as the other process's evaluate did
    run_dir = out / "runs" / f"seg-{parse_train_spec(str(phantom_store)).slug}"
    with run_lock(run_dir):
        line = _error(["--train", phantom_store, "--test", phantom_store, "--out", out,
                       "--task", "seg", *FAST])  # fmt: skip
    assert "is in use by process" in line
    assert not (run_dir / "config.yaml").exists()
