from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import zarr
from echo_process import assert_stopped, echo_synth
from typer.testing import CliRunner

from edmcli.cli import app
from edmcli.data.prepare import prepare_phantom
from edmcli.data.store import DatasetStore

runner = CliRunner()
FIELDS = ("images", "labels", "patient", "view", "phase", "split", "source_index", "transform",
          "seed", "spacing")  # fmt: skip


def _ok(args):
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def runs(phantom_store, tmp_path_factory):
    """Tiny trained runs: a Γ-VAE L64 + EDM-L64 on the 32² store, and an SDM on 16² data."""
    root = tmp_path_factory.mktemp("runs")
    common = ["--preset", "tiny", "--batch", "4", "--device", "cpu"]
    _ok(["train-vae", "--data", str(phantom_store), "--latent", "64", "--run",
         str(root / "vae"), "--steps", "4", "--base-channels", "8", *common])  # fmt: skip
    _ok(["train-diffusion", "--model", "edm-l64", "--data", str(phantom_store), "--vae",
         str(root / "vae"), "--run", str(root / "edm-l64"), "--steps", "4",
         "--model-channels", "16", "--grid-every", "0", *common])  # fmt: skip
    store16 = root / "p16.zarr"
    prepare_phantom(store16, 4, 16, 2, (0.5, 0.25, 0.25))
    _ok(["train-diffusion", "--model", "sdm", "--data", str(store16), "--run",
         str(root / "sdm"), "--steps", "4", "--model-channels", "16", "--grid-every", "0",
         *common])  # fmt: skip
    return root


def _sample_args(runs, out, *extra):
    return ["sample", "--model", "edm-l64", "--run", str(runs / "edm-l64"), "--n", "20",
            "--nfe", "5", "--chunk", "8", "--batch", "4", "--no-compile", "--device", "cpu",
            "--out", str(out), *extra]  # fmt: skip


def _assert_same(a, b):
    ga, gb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    for name in FIELDS:
        np.testing.assert_array_equal(ga[name][:], gb[name][:], err_msg=name)


def test_sample_writes_a_complete_synthetic_store(runs, phantom_store, tmp_path):
    out = tmp_path / "syn.zarr"
    result = _ok(_sample_args(runs, out))
    assert "heun: 3 steps = 5 NFE" in result.output
    store = DatasetStore(out)
    assert len(store) == 20 and store.image_size == (32, 32)
    prov = store.info["provenance"]
    assert prov["source"] == "synthetic" and prov["model"] == "edm-l64" and prov["nfe"] == 5
    assert prov["churn"] == 0.0 and len(prov["checkpoint_sha256"]) == 64
    real = DatasetStore(phantom_store)
    assert set(prov["generator_patients"]) == set(real.patients(["train", "val"]))
    # sample i: label map i // 5 of the train+val maps, transformation i % 5
    sources = real.indices(["train", "val"])
    np.testing.assert_array_equal(store.column("source_index"), sources[np.arange(20) // 5])
    np.testing.assert_array_equal(store.column("transform"), np.arange(20) % 5)
    assert set(store.column("split")) <= {"train", "val"}
    images, labels = store.images[:], store.labels[:]
    assert np.all(images[:, 0][labels == 0] == 0)  # black outside the sector
    assert images[:, 0][labels == 4].mean() > 0
    # transformed maps differ from their sources but keep the source's sector
    src = real.labels[int(sources[0])]
    assert not np.array_equal(labels[0], src)
    np.testing.assert_array_equal(labels[0] != 0, src != 0)
    assert (tmp_path / "syn-grid.png").is_file() and (tmp_path / "syn-summary.json").is_file()
    assert len(set(store.column("seed").tolist())) == 20


@pytest.mark.slow
def test_resume_after_sigkill_and_two_ranks_give_identical_stores(runs, tmp_path):
    reference = tmp_path / "ref.zarr"
    _ok(_sample_args(runs, reference))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cut = tmp_path / "cut.zarr"
    args = [sys.executable, "-m", "edmcli", *_sample_args(runs, cut)]
    killed = subprocess.run(args, env={**env, "ECHO_SYNTH_FAULT_KILL": "sample-shard:2"},
                            capture_output=True, timeout=300)  # fmt: skip
    assert killed.returncode == -9
    assert zarr.open_group(str(cut), mode="r")["shard_done"][:].tolist() == [True, True, False]
    with pytest.raises(Exception, match="incomplete"):
        DatasetStore(cut)
    resumed = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "sampled now │ 4" in resumed.stdout or "sampled now" in resumed.stdout
    _assert_same(reference, cut)

    ranks = tmp_path / "ranks.zarr"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node=2", "-m", "edmcli", "--"]  # fmt: skip
    result = subprocess.run(launcher + _sample_args(runs, ranks), env=env, capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_same(reference, ranks)


def test_sigint_stops_a_sample_started_with_sigint_ignored_and_the_rerun_resumes(runs, tmp_path):
    """Issue 25: SIGTERM exited 143 without a word, and a sample started with SIGINT ignored
    (``cmd &`` in a script) ran to the end; now both stop with exit 130 after whole shards."""
    reference = tmp_path / "ref.zarr"
    _ok(_sample_args(runs, reference))
    out = tmp_path / "cut.zarr"
    args = _sample_args(runs, out)[:-2] + ["--out", out]
    stopped = echo_synth(args, fault="sample-shard:1:INT", ignore_sigint=True)
    assert_stopped(stopped, "SIGINT")
    assert zarr.open_group(str(out), mode="r")["shard_done"][:].tolist() == [True, False, False]
    assert_stopped(echo_synth(args, fault="sample-shard:1:TERM"), "SIGTERM")
    assert echo_synth(args).returncode == 0
    _assert_same(reference, out)


@pytest.mark.parametrize("broken, expected", [
    (lambda x: x.index_fill(0, torch.tensor([1]), float("nan")), "sample 9 (seed"),
    (lambda x: x.index_fill(0, torch.tensor([0]), 0.5), "is 128 over its sector"),
])  # fmt: skip
def test_a_broken_sample_is_never_written_into_a_complete_store(runs, tmp_path, monkeypatch,
                                                                broken, expected):  # fmt: skip
    """Issue 25: ``--churn nan`` wrote all-black images into a store marked complete."""
    from edmcli.sampling import sample as sample_module

    real = sample_module.generate
    calls = []

    def generate(*args, **kwargs):
        calls.append(1)
        out = real(*args, **kwargs)
        return broken(out) if len(calls) == 3 else out  # the third batch: rows 8–11

    monkeypatch.setattr(sample_module, "generate", generate)
    out = tmp_path / "broken.zarr"
    result = runner.invoke(app, _sample_args(runs, out))
    assert result.exit_code == 2 and expected in result.output, result.output
    assert zarr.open_group(str(out), mode="r")["shard_done"][:].tolist() == [True, False, False]
    with pytest.raises(Exception, match="incomplete"):
        DatasetStore(out)


def test_batch_size_changes_only_floating_point_noise(runs, tmp_path):
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    _ok(_sample_args(runs, a))
    args = _sample_args(runs, b)
    args[args.index("--batch") + 1] = "8"
    _ok(args)
    ia = DatasetStore(a).images[:].astype(int)
    ib = DatasetStore(b).images[:].astype(int)
    assert np.abs(ia - ib).max() <= 1
    np.testing.assert_array_equal(DatasetStore(a).labels[:], DatasetStore(b).labels[:])


def test_cached_spade_equals_uncached(runs, tmp_path):
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    _ok(_sample_args(runs, a, "--n", "4"))
    _ok(_sample_args(runs, b, "--n", "4", "--no-spade-cache"))
    np.testing.assert_array_equal(DatasetStore(a).images[:], DatasetStore(b).images[:])


def test_sdm_ancestral_sampling(runs, tmp_path):
    out = tmp_path / "sdm.zarr"
    result = _ok(["sample", "--model", "sdm", "--run", str(runs / "sdm"), "--n", "3", "--nfe",
                  "10", "--no-compile", "--device", "cpu", "--out", str(out)])  # fmt: skip
    assert "ddpm_ancestral" in result.output
    assert DatasetStore(out).info["provenance"]["steps"] == 10


@pytest.mark.slow
def test_compiled_sampler_matches_eager(runs, tmp_path):
    a, b = tmp_path / "eager.zarr", tmp_path / "compiled.zarr"
    _ok(_sample_args(runs, a, "--n", "4"))
    _ok([x for x in _sample_args(runs, b, "--n", "4") if x != "--no-compile"])
    diff = np.abs(DatasetStore(a).images[:].astype(int) - DatasetStore(b).images[:].astype(int))
    assert diff.max() <= 1


def test_a_compile_failure_falls_back_to_eager_with_one_warning(runs, tmp_path, monkeypatch):
    """Issue 26: a torch.compile failure (raised at the first call, where compiling happens)
    must not end the run: the same store as eager, one warning line naming the cause."""
    from edmcli.sampling import compiled as compiled_module

    def broken_compile(net, **_kwargs):
        def call(*_args, **_kw):
            raise RuntimeError("InductorError: no working C compiler\n(pages of log)")

        return call

    monkeypatch.setattr(compiled_module.torch, "compile", broken_compile)
    a, b = tmp_path / "eager.zarr", tmp_path / "fallback.zarr"
    _ok(_sample_args(runs, a, "--n", "8"))
    result = _ok([x for x in _sample_args(runs, b, "--n", "8") if x != "--no-compile"])
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, result.output
    assert (
        "torch.compile failed (RuntimeError: InductorError: no working C compiler)" in (warnings[0])
    )
    _assert_same(a, b)


def test_the_eager_fallback_raises_the_inputs_errors_and_keeps_attributes():
    from torch import nn

    from edmcli.sampling.compiled import EagerFallback

    class Net(nn.Module):
        sigma_min = 0.002

        def forward(self, x):
            if x.shape[-1] != 3:
                raise ValueError("wrong width")
            return x * 2

    said = []

    def broken(_x):
        raise RuntimeError("BackendCompilerFailed")

    wrapped = EagerFallback(Net(), broken, warn=said.append)
    assert wrapped.sigma_min == 0.002
    with pytest.raises(ValueError, match="wrong width"):
        wrapped(torch.ones(2, 4))  # eager fails too: the inputs' error, compiled kept
    assert said == [] and wrapped.fallback_reason is None
    torch.testing.assert_close(wrapped(torch.ones(2, 3)), torch.full((2, 3), 2.0))
    wrapped(torch.ones(1, 3))
    assert len(said) == 1 and wrapped.fallback_reason == "RuntimeError: BackendCompilerFailed"


def _error(args):
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    return " ".join(result.output.split())


def test_bad_inputs(runs, phantom_store, tmp_path):
    message = _error(["sample", "--model", "edm", "--runs-root", str(tmp_path), "--nfe", "5"])
    assert (
        "no trained edm run at" in message and "echo-synth train-diffusion --model edm" in message
    )
    message = _error(["sample", "--model", "edm", "--run", str(runs / "edm-l64")])
    assert "is a edm-l64 run, not edm" in message
    message = _error(["sample", "--model", "edm-l64", "--run", str(runs / "vae")])
    assert "is not a diffusion run" in message
    base = _sample_args(runs, tmp_path / "o.zarr")
    nfe = base.index("--nfe") + 1
    for value, expected in (("0", "NFE"), ("6", "use 5 (3 steps) or 7 (4 steps)")):
        message = _error(base[:nfe] + [value] + base[nfe + 1 :])
        assert expected in message, message
    message = _error(["sample", "--model", "sdm", "--run", str(runs / "sdm"), "--nfe", "2000",
                      "--no-compile", "--out", str(tmp_path / "s.zarr")])  # fmt: skip
    assert "1000" in message


def test_label_store_with_wrong_ids(runs, phantom_store, tmp_path):
    bad = tmp_path / "bad.zarr"
    shutil.copytree(phantom_store, bad)
    labels = zarr.open_group(str(bad), mode="r+")["labels"]
    block = labels[0]
    block[5, 5] = 8
    labels[0] = block
    message = _error(_sample_args(runs, tmp_path / "o.zarr", "--labels", str(bad)))
    assert "label values [8] outside 0..4" in message


def test_existing_output_with_another_config(runs, tmp_path):
    out = tmp_path / "o.zarr"
    _ok(_sample_args(runs, out, "--n", "4"))
    again = _ok(_sample_args(runs, out, "--n", "4"))  # identical: nothing left to do
    assert json.loads((tmp_path / "o-summary.json").read_text())["sampled now"] == 0
    assert "sampled now" in again.output
    message = _error(_sample_args(runs, out, "--n", "4", "--seed", "3"))
    assert "pass --overwrite" in message
    _ok(_sample_args(runs, out, "--n", "4", "--seed", "3", "--overwrite"))
    assert DatasetStore(out).info["provenance"]["seed"] == 3


def test_every_synthetic_row_trains_and_keeps_its_source_split(runs, phantom_store, tmp_path):
    """Before: the source map's split was copied, so generator-val maps became synthetic val
    rows (fewer training images, and a synthetic checkpoint choice downstream)."""
    out = tmp_path / "all-train.zarr"
    _ok(_sample_args(runs, out, "--n", "36", "--k", "1", "--splits", "train,val"))
    store, real = DatasetStore(out), DatasetStore(phantom_store)
    assert set(store.column("split")) == {"train"}
    np.testing.assert_array_equal(
        store.column("source_split"), real.column("split")[store.column("source_index")]
    )
    assert "val" in set(store.column("source_split"))
    assert store.info["provenance"]["holdout"] == 0.0


def test_holdout_writes_whole_source_patients_as_val(runs, phantom_store, tmp_path):
    out = tmp_path / "holdout.zarr"
    _ok(_sample_args(runs, out, "--n", "60", "--holdout", "0.25"))
    store = DatasetStore(out)
    split, patient = store.column("split"), store.column("patient")
    held = set(patient[split == "val"])
    assert held and held.isdisjoint(set(patient[split == "train"]))
    assert len(held) == round(0.25 * len(set(patient)))
    again = tmp_path / "holdout2.zarr"
    _ok(_sample_args(runs, again, "--n", "60", "--holdout", "0.25"))
    np.testing.assert_array_equal(DatasetStore(again).column("split"), split)  # seeded
    bad = runner.invoke(app, _sample_args(runs, tmp_path / "x.zarr", "--holdout", "1"))
    assert bad.exit_code == 2 and "holdout 1.0 must be in [0, 1)" in bad.output


def test_generator_patients_include_the_vae_runs(runs, tmp_path):
    """The Γ-VAE's patients count as the generator's (before: only the diffusion run's)."""
    record = runs / "edm-l64" / "vae" / "training_patients.json"  # the run's frozen Γ-VAE copy
    saved = record.read_text()
    record.write_text(json.dumps({"patients": ["vae-only-patient"], "splits": ["train"]}))
    try:
        out = tmp_path / "g.zarr"
        _ok(_sample_args(runs, out, "--n", "4"))
        assert "vae-only-patient" in DatasetStore(out).info["provenance"]["generator_patients"]
    finally:
        record.write_text(saved)


def test_a_run_recorded_before_latent_normalisation_samples_the_same(runs, tmp_path):
    """A latent run whose config.yaml predates ``latent_norm`` (no key) samples exactly as the
    same run recording ``latent_norm: null`` (the paper's un-normalised latents)."""
    import yaml

    old = tmp_path / "old-run"
    shutil.copytree(runs / "edm-l64", old)
    config = yaml.safe_load((old / "config.yaml").read_text())
    assert "latent_norm" in config and config["latent_norm"] is None
    del config["latent_norm"]
    (old / "config.yaml").write_text(yaml.safe_dump(config))
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    _ok(_sample_args(runs, a, "--n", "4"))
    args = _sample_args(runs, b, "--n", "4")
    args[args.index("--run") + 1] = str(old)
    _ok(args)
    _assert_same(a, b)


def test_no_transforms_samples_the_label_maps_as_they_are(runs, phantom_store, tmp_path):
    out = tmp_path / "plain.zarr"
    _ok(_sample_args(runs, out, "--n", "6", "--k", "2", "--no-transforms"))
    store = DatasetStore(out)
    assert store.info["provenance"]["label_transforms"] == "none"
    real = DatasetStore(phantom_store)
    sources = store.column("source_index")
    np.testing.assert_array_equal(store.labels[:], real.labels[:][sources])
    transformed = tmp_path / "moved.zarr"
    _ok(_sample_args(runs, transformed, "--n", "6", "--k", "2"))
    moved = DatasetStore(transformed)
    assert moved.info["provenance"]["label_transforms"] == "reference"
    assert not np.array_equal(moved.labels[:], real.labels[:][sources])
    # the same start noise per row: only the maps differ
    np.testing.assert_array_equal(moved.column("seed"), store.column("seed"))


def test_sample_writes_a_dataset_card_with_the_right_hashes(runs, tmp_path):
    from edmcli.data.card import CARD_FILE
    from edmcli.data.store_integrity import array_checksum
    from edmcli.runs.checkpoint import file_sha256

    out = tmp_path / "syn.zarr"
    _ok(_sample_args(runs, out))
    card = (out / CARD_FILE).read_text()
    store = DatasetStore(out)
    prov = store.info["provenance"]
    checkpoint = prov["checkpoint"]
    assert f"| checkpoint SHA-256 | `{file_sha256(checkpoint)}` |" in card
    vae = runs / "edm-l64" / "vae"
    vae_checkpoint = next((vae / "checkpoints").glob("*.pt"))
    assert f"| Γ-VAE checkpoint SHA-256 | `{file_sha256(vae_checkpoint)}` |" in card
    for name in ("images", "labels", "seed", "patient"):  # the bytes on disk, recomputed
        assert f"| {name} | `{array_checksum(out, name)}` |" in card
    assert "heun, 3 steps = NFE 5" in card and "| samples per map (k) | 5 |" in card
    assert "20 images of 32×32" in card and "Not judged yet" in card
    assert "Phantom data generated by echo-synth" in card and "CC BY-NC-SA" not in card
    # export copies the card as it is
    exported = tmp_path / "export"
    _ok(["export", str(out), "--format", "nnunet", "--out", str(exported)])
    assert (exported / CARD_FILE).read_text() == card
    assert json.loads((exported / "dataset.json").read_text())["numTraining"] == 20
