"""``echo-synth study``: the config is checked before any work, and a shortened phantom study
runs end to end, then skips every finished stage on a rerun."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from edmcli.cli import app
from edmcli.data.store import DatasetStore
from edmcli.errors import EchoSynthError
from edmcli.study import STAGES, load_config, run_study

runner = CliRunner()


def _write(tmp_path, **config):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


BASE = {"models": ["edm-l64"], "sample": {"nfe": [3]}}


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({**BASE, "modles": ["edm"]}, "unknown setting 'modles'"),
        ({**BASE, "models": ["edm-l32"]}, "unknown model 'edm-l32'"),
        ({**BASE, "models": []}, "models must be a list"),
        ({**BASE, "sample": {"nfe": [0]}}, "sample.nfe must be a list of integers ≥ 1"),
        ({**BASE, "sample": {"nfe": [5], "steps": 3}}, "sample: unknown setting 'steps'"),
        ({**BASE, "train": ["tiny"]}, "train must be a mapping"),
    ],
)
def test_bad_configs_are_refused_before_any_work(tmp_path, config, message):
    path = _write(tmp_path, out=str(tmp_path / "out"), **config)
    with pytest.raises(EchoSynthError, match=message):
        load_config(path)
    assert not (tmp_path / "out").exists()


def test_cli_says_one_line(tmp_path):
    result = runner.invoke(app, ["study", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2
    assert "missing.yaml does not exist" in result.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [edm\n")
    result = runner.invoke(app, ["study", str(bad)])
    assert result.exit_code == 2 and "not valid YAML" in result.output


def test_defaults_and_unknown_stage(tmp_path):
    config = load_config(_write(tmp_path, **BASE))
    assert (config["out"], config["seed"], config["device"]) == ("study", 0, "auto")
    assert config["bench"] is None  # no bench section: no bench stage
    with pytest.raises(EchoSynthError, match="--only 'plots'"):
        run_study(_write(tmp_path, out=str(tmp_path / "o"), **BASE), only=["plots"])


@pytest.mark.slow
def test_shortened_phantom_study_runs_and_resumes(tmp_path):
    out = tmp_path / "study"
    config = {
        "out": str(out), "device": "cpu", "models": ["edm-l64"],
        "data": {"source": "phantom", "size": 64, "n_patients": 10, "split_ratio": "5:1:4"},
        "train": {"preset": "tiny", "vae": {"steps": 4}, "diffusion": {"steps": 4}},
        "sample": {"nfe": [1, 3], "k": 1},
        "evaluate": {"preset": "tiny", "tasks": ["seg", "cls"], "fidelity": True,
                     "overrides": {"steps": 4}},
        "bench": {"preset": "tiny", "nfe": [1], "repeats": 1, "peer": False},
    }  # fmt: skip
    path = _write(tmp_path, **config)
    record = run_study(path)
    stages = record["stages"]
    assert list(stages) == ["prepare", "train-vae l64", "train-diffusion edm-l64",
                            "sample edm-l64 nfe 1", "probe edm-l64 nfe 1",
                            "sample edm-l64 nfe 3", "probe edm-l64 nfe 3", "evaluate",
                            "bench"]  # fmt: skip
    assert {key.split(" ")[0] for key in stages} == {*STAGES, "probe"}
    report = json.loads((out / "evaluation" / "report.json").read_text())
    assert {r["nfe"] for r in report["runs"] if r["kind"] == "synthetic"} == {1, 3}
    assert len(report["quality"]["stores"]) == 2
    # trained on the train maps only, chosen on unseen val patients, judged on test-map probes
    for nfe in (1, 3):
        prov = DatasetStore(out / "synthetic" / f"edm-l64-nfe{nfe}.zarr").info["provenance"]
        assert prov["label_splits"] == ["train"]
    assert all(s["judged_on"]["store"].endswith("-probe.zarr")
               for s in report["quality"]["stores"])  # fmt: skip
    bench = json.loads((out / "bench" / "bench.json").read_text())
    assert bench["complete"] and bench["settings"]["models"] == ["edm-l64"]

    before = (out / "study.json").read_text()
    result = runner.invoke(app, ["study", str(path)])
    assert result.exit_code == 0, result.output
    assert result.output.count("done, skipped") == len(stages)
    assert (out / "study.json").read_text() == before

    config["sample"]["nfe"] = [1, 3, 5]  # one more NFE: only it, evaluate and bench run again
    record = run_study(_write(tmp_path, **config), only=["sample"])
    assert "sample edm-l64 nfe 5" in record["stages"]
    assert record["stages"]["evaluate"] == stages["evaluate"]  # not rerun (--only sample)


@pytest.mark.parametrize("name", ["study-phantom.yaml", "study-paper.yaml"])
def test_the_example_configs_load(name):
    from pathlib import Path

    config = load_config(Path(__file__).resolve().parents[1] / "examples" / name)
    assert config["models"] and config["sample"]["nfe"] and config["evaluate"]["fidelity"]


def test_dry_run_plans_what_it_can_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    config = {"out": str(out), "device": "cpu", "models": ["edm-l64", "edm"],
              "data": {"source": "phantom", "size": 64, "n_patients": 10, "split_ratio": "5:1:4"},
              "train": {"preset": "tiny"}, "sample": {"nfe": [3]},
              "bench": {"preset": "tiny", "nfe": [1]}}  # fmt: skip
    result = runner.invoke(app, ["study", str(_write(tmp_path, **config)), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "prepare phantom (seed 0)" in result.output  # the prepare plan's own lines
    for key in ("train-vae l64", "train-diffusion edm-l64", "train-diffusion edm"):
        assert f"study: {key}: planned once prepare has run" in result.output
    assert "study: sample edm nfe 3: planned once train-diffusion edm has run" in result.output
    assert "study: bench: planned once evaluate has run" in result.output
    assert not out.exists()


def test_dry_run_plans_stages_whose_inputs_exist_and_refuses_their_bad_settings(tmp_path):
    from plan_stores import tiny_store

    store = tiny_store(tmp_path / "given.zarr", 32, 32)
    out = tmp_path / "out"
    config = {"out": str(out), "device": "cpu", "models": ["edm-l64", "edm"],
              "data": {"store": str(store)}, "train": {"preset": "tiny"},
              "sample": {"nfe": [3]}}  # fmt: skip
    result = runner.invoke(app, ["study", str(_write(tmp_path, **config)), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert f"using {store}" in result.output
    assert "study: train-vae l64: would run" in result.output
    assert "study: train-diffusion edm: would run" in result.output  # a pixel model needs no VAE
    assert "train-diffusion edm-l64: planned once train-vae l64 has run" in result.output
    assert not out.exists()

    config["train"]["diffusion"] = {"batch": 0}  # refused by the plan, before any training
    with pytest.raises(EchoSynthError, match="batch 0"):
        run_study(_write(tmp_path, **config), dry_run=True)
    assert not out.exists()
