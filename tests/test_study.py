"""``echo-synth study``: the config is checked before any work, and a shortened phantom study
runs end to end, then skips every finished stage on a rerun."""

from __future__ import annotations

import json
import shutil

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
        ({**BASE, "distill": {"nfe": [3]}}, "distill.nfe must list NFEs a student is made for"),
        (
            {**BASE, "sample": {"nfe": [3], "frontier": {"heun": [0]}}},
            "sample.frontier maps a solver to a list of NFEs",
        ),
        ({**BASE, "distill": {"sigmas": [1]}}, "distill: unknown setting 'sigmas'"),
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
    # every stage but distill (no distill section: test_a_frontier_and_students_from_one_config)
    assert {key.split(" ")[0] for key in stages} == {*STAGES, "probe"} - {"distill"}
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


@pytest.mark.parametrize("name", ["study-phantom.yaml", "study-paper.yaml", "study-few-step.yaml"])
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


def test_a_yaml_syntax_error_is_one_line_with_its_line_and_column(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [edm-l64]\nsample:\n  nfe: [3\n")
    result = runner.invoke(app, ["study", str(bad)])
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert errors == [line for line in result.output.splitlines() if line.strip()][-1:]
    assert "bad.yaml is not valid YAML (line 4, column 1: expected ',' or ']'" in errors[0]
    assert "<unicode string>" not in result.output and "^" not in result.output


TINY = {"device": "cpu", "models": ["edm-l64"], "train": {"preset": "tiny"},
        "data": {"source": "phantom", "size": 64, "n_patients": 10, "split_ratio": "5:1:4"},
        "sample": {"nfe": [3]}, "evaluate": {"preset": "tiny", "tasks": ["seg"]},
        "bench": {"preset": "tiny", "nfe": [1]}}  # fmt: skip


@pytest.mark.parametrize(
    ("section", "values", "message"),
    [
        ("train", {"vae": {"stepz": 4}}, r"train\.vae: unknown setting 'stepz'"),
        ("train", {"diffusion": {"lrr": 0.1}}, r"train\.diffusion: unknown setting 'lrr'"),
        ("train", {"vae": [4]}, r"train\.vae must be a mapping"),
        ("evaluate", {"overrides": {"stepz": 4}}, r"evaluate\.overrides: unknown setting"),
    ],
)
def test_unknown_keys_inside_a_section_are_refused_before_any_work(
    tmp_path, section, values, message
):
    out = tmp_path / "out"
    path = _write(tmp_path, **{**TINY, "out": str(out), section: {**TINY[section], **values}})
    with pytest.raises(EchoSynthError, match=message):
        load_config(path)
    with pytest.raises(EchoSynthError, match=message):
        run_study(path, dry_run=True)
    assert not out.exists()


@pytest.mark.parametrize(
    ("section", "values", "message"),
    [
        ("evaluate", {"tasks": ["segg"]}, r"evaluate: task 'segg' is unknown; choose from seg"),
        ("evaluate", {"checkpoint": "best"}, r"evaluate: checkpoint 'best' is unknown"),
        ("evaluate", {"overrides": {"lr": -1.0}}, r"evaluate: lr -1.0 must be positive"),
        ("evaluate", {"fidelity": "yes"}, r"evaluate\.fidelity must be true or false"),
        ("sample", {"solver": "eulerr"}, r"sample: solver 'eulerr' is unknown"),
        ("sample", {"nfe": [4]}, r"sample\.nfe \(edm-l64\): Heun .* NFE 4 is not reachable"),
        ("sample", {"splits": "train,vall"}, r"sample: split 'vall' is unknown"),
        ("sample", {"k": "5"}, r"sample\.k must be an integer, got '5'"),
        ("sample", {"guidance": 2.0}, r"sample\.guidance needs a model trained with classes"),
        ("train", {"diffusion": {"class_cond": "vue"}}, r"--class-cond 'vue' is unknown"),
        ("train", {"diffusion": {"latent_norm": "z"}}, r"--latent-norm 'z': choose from none"),
        ("train", {"vae": {"lr": "1e-3"}}, r"train\.vae\.lr must be a number, got '1e-3'"),
        ("train", {"diffusion": {"batch": 16, "batch_gpu": 5}}, r"batch_gpu 5 must divide"),
        ("train", {"precision": "fp64"}, r"train\.precision: precision 'fp64' is unknown"),
        ("data", {"n_patients": 0}, r"data: --n-patients must be at least 1"),
        ("bench", {"dtype": "fp8"}, r"bench: --dtype 'fp8'"),
    ],
)
def test_every_stage_option_is_checked_before_any_stage_runs(
    tmp_path, monkeypatch, section, values, message
):
    import edmcli.data.prepare

    def prepare_ran(*args, **kwargs):
        raise AssertionError("prepare ran before the study file was checked")

    monkeypatch.setattr(edmcli.data.prepare, "prepare", prepare_ran)
    out = tmp_path / "out"
    config = {**TINY, "out": str(out), section: {**TINY[section], **values}}
    with pytest.raises(EchoSynthError, match=message):
        run_study(_write(tmp_path, **config), dry_run=True)
    with pytest.raises(EchoSynthError, match=message):
        run_study(_write(tmp_path, **config))  # not after prepare: before it
    assert not out.exists()


@pytest.fixture
def fake_stages(monkeypatch):
    """The stages after prepare as recorders (a study's bookkeeping in milliseconds); set
    ``refuse[name]`` to an exception that stage raises."""
    import edmcli.evaluation.evaluate
    import edmcli.sampling.sample
    import edmcli.training.diffusion
    import edmcli.training.distill
    import edmcli.training.vae

    calls, refuse = [], {}

    def fake(name):
        def run(*args, **kwargs):
            calls.append((name, kwargs.get("out") or kwargs.get("run")))
            if name in refuse:
                raise refuse[name](kwargs)

        return run

    for module, name in [(edmcli.training.vae, "train_vae"),
                         (edmcli.training.diffusion, "train_diffusion"),
                         (edmcli.training.distill, "distill"),
                         (edmcli.sampling.sample, "sample"),
                         (edmcli.evaluation.evaluate, "evaluate")]:  # fmt: skip
        monkeypatch.setattr(module, name, fake(name))
    return calls, refuse


def _small_study(tmp_path, **data):
    """A pixel-model study on a phantom store of three patients (prepared for real)."""
    return {"out": str(tmp_path / "out"), "device": "cpu", "models": ["edm"],
            "data": {"source": "phantom", "size": 32, "n_patients": 3, "split_ratio": "1:1:1",
                     **data},
            "train": {"preset": "tiny"}, "sample": {"nfe": [3], "k": 1},
            "evaluate": {"preset": "tiny", "tasks": ["seg"]}}  # fmt: skip


def test_changed_data_settings_never_reuse_the_store_of_the_earlier_ones(tmp_path, fake_stages):
    out = tmp_path / "out"
    config = _small_study(tmp_path)
    record = run_study(_write(tmp_path, **config))
    assert "evaluate" in record["stages"]
    before = (out / "study.json").read_text()
    store = out / "phantom32.zarr"
    assert len(DatasetStore(store).patients("train")) == 1

    changed = _small_study(tmp_path, n_patients=4)
    for dry_run in (True, False):
        with pytest.raises(EchoSynthError) as refused:
            run_study(_write(tmp_path, **changed), dry_run=dry_run)
        message = str(refused.value)
        assert "data.n_patients is 4 (was 3)" in message and "put it back" in message
        assert "set out to a new folder" in message and "--overwrite" not in message
    with pytest.raises(EchoSynthError, match="data.n_patients is 4"):
        run_study(_write(tmp_path, **changed), only=["sample"])  # whatever stages are asked for
    assert (out / "study.json").read_text() == before

    # a default given is the setting left out: nothing changed, every stage stays done
    same = _small_study(tmp_path, keep_aspect=False, image_glob="images/*.png")
    result = runner.invoke(app, ["study", str(_write(tmp_path, **same))])
    assert result.exit_code == 0, result.output
    assert result.output.count("done, skipped") == len(record["stages"]) - 1  # but prepare


def test_a_store_nothing_was_made_from_may_be_deleted_and_prepared_again(tmp_path, fake_stages):
    out = tmp_path / "out"
    run_study(_write(tmp_path, **_small_study(tmp_path)), only=["prepare"])
    path = _write(tmp_path, **_small_study(tmp_path, n_patients=4))
    with pytest.raises(EchoSynthError, match=f"delete {out / 'phantom32.zarr'} to prepare it"):
        run_study(path, only=["prepare"])
    shutil.rmtree(out / "phantom32.zarr")
    record = run_study(path, only=["prepare"])
    assert record["stages"]["prepare"]["settings"]["n_patients"] == 4
    assert len(DatasetStore(out / "phantom32.zarr").patients()) == 4


def test_refusals_advise_what_a_study_can_do_not_the_commands_options(tmp_path, fake_stages):
    from edmcli.sampling.sample_plan import output_exists_error

    calls, refuse = fake_stages
    out = tmp_path / "out"
    run_study(_write(tmp_path, **_small_study(tmp_path)))
    config = _small_study(tmp_path)
    config["sample"]["k"] = 2  # the store of k 1 exists: the sample command refuses it
    refuse["sample"] = lambda kwargs: output_exists_error(kwargs["out"])
    result = runner.invoke(app, ["study", str(_write(tmp_path, **config))])
    assert result.exit_code == 2
    assert "--overwrite" not in result.output
    assert "sample.k is 2 (was 1)" in result.output
    assert f"{out / 'synthetic' / 'edm-nfe3.zarr'} was sampled with the earlier" in result.output
    assert "put it back, or set out to a new folder" in result.output

    config["sample"]["k"] = 1
    config["train"] = {"preset": "tiny", "diffusion": {"lr": 0.5}}
    refuse["train_diffusion"] = lambda kwargs: EchoSynthError(
        f"run {kwargs['run']} was started with lr=0.001 but this command asks for lr=0.5; "
        "resume with the same settings or use another --run"
    )
    result = runner.invoke(app, ["study", str(_write(tmp_path, **config))])
    assert result.exit_code == 2
    assert "--run" not in result.output
    assert "study: train-diffusion edm: run" in result.output
    assert "resume with the same settings or set out to a new folder" in result.output


def test_latent_settings_reach_only_the_latent_models(tmp_path, fake_stages):
    """``train.diffusion.latent_norm`` normalises the latent models' latents; a pixel model of
    the same study trains without it instead of being refused."""
    calls, _ = fake_stages
    config = _small_study(tmp_path)
    config["train"] = {"preset": "tiny", "diffusion": {"latent_norm": "centred"}}
    run_study(_write(tmp_path, **config), dry_run=True)  # the pixel model is not refused
    record = run_study(_write(tmp_path, **config), only=["prepare", "train-diffusion"])
    settings = record["stages"]["train-diffusion edm"]["settings"]
    assert "latent_norm" not in settings


def test_a_generator_recipe_fills_the_settings_the_file_leaves_out(tmp_path, fake_stages):
    """``generator: faithful`` sets the recipe's train-vae, train-diffusion and sample settings
    (edmcli.settings.GENERATORS) under the file's own; an unknown recipe is refused up front."""
    config = {**_small_study(tmp_path), "models": ["edm-l64"], "generator": "faithful"}
    config["train"] = {"preset": "tiny", "vae": {"latent_channels": 2}}
    record = run_study(
        _write(tmp_path, **config), only=["prepare", "train-vae", "train-diffusion", "sample"]
    )
    stages = record["stages"]
    vae = stages["train-vae l64"]["settings"]
    assert vae["latent_channels"] == 2 and vae["w_spectrum"] == 0.1  # the file's own, the recipe's
    assert "latent_norm" not in stages["train-diffusion edm-l64"]["settings"]
    sample = next(v for k, v in stages.items() if k.startswith("sample"))
    assert sample["settings"]["transforms"] is False
    with pytest.raises(EchoSynthError, match="generator 'best' is unknown; choose from paper"):
        run_study(_write(tmp_path, **{**config, "generator": "best"}), dry_run=True)


def test_a_frontier_and_students_from_one_config(tmp_path, fake_stages):
    """``sample.frontier`` adds stores of other solvers, ``distill`` a student per EDM-family
    model sampled at its NFEs, and the bench's curve covers every NFE; a study without an
    EDM-family model or with a guidance scale for the students is refused before any work."""
    from edmcli.study import study_nfes

    calls, _ = fake_stages
    config = _small_study(tmp_path)
    config["sample"] = {"nfe": [3], "k": 1, "frontier": {"dpmpp_3m": [2, 4]}}
    config["distill"] = {"steps": 2, "nfe": [1, 2]}
    record = run_study(_write(tmp_path, **config),
                       only=["prepare", "train-diffusion", "distill", "sample"])  # fmt: skip
    out = tmp_path / "out"
    assert ("distill", out / "runs" / "edm-student") in calls
    written = {c[1].name for c in calls if c[0] == "sample"}
    assert {"edm-nfe3.zarr", "edm-dpmpp_3m-nfe2.zarr", "edm-dpmpp_3m-nfe4.zarr",
            "edm-student-nfe1.zarr", "edm-student-nfe2.zarr"} <= written  # fmt: skip
    assert record["stages"]["sample edm-dpmpp_3m nfe 4"]["settings"]["solver"] == "dpmpp_3m"
    assert study_nfes(load_config(_write(tmp_path, **config))) == [1, 2, 3, 4]
    with pytest.raises(EchoSynthError, match="distill tunes EDM-family models"):
        run_study(_write(tmp_path, **{**config, "models": ["sdm"]}), dry_run=True)
    with pytest.raises(EchoSynthError, match="frontier: solver .rk4. is unknown"):
        bad = {**config, "sample": {"nfe": [3], "k": 1, "frontier": {"rk4": [2]}}}
        run_study(_write(tmp_path, **bad), dry_run=True)
