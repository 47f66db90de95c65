"""``plan_sample``: every refusal of ``echo-synth sample`` before any network is loaded, the
defaults it resolves, and that planning writes nothing. Hand-made run folders (a config.yaml, an
empty checkpoint file): planning never opens the checkpoint, so these tests take milliseconds."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from plan_stores import fake_diffusion_run as make_run

from edmcli.data.store import DatasetStore
from edmcli.errors import EchoSynthError
from edmcli.models.registry import get_spec
from edmcli.sampling.sample import open_output
from edmcli.sampling.sample_plan import HOLDOUT_STREAM, SamplingPlan, plan_sample

VAE_BYTES = b"the weights of a gamma-VAE"
VAE_SHA = hashlib.sha256(VAE_BYTES).hexdigest()


def make_latent_run(root: Path, name: str, *, data: Path, vae_kind: str = "vae",
                    vae_checkpoint: bool = True, vae_patients: bool = True,
                    sha: str = VAE_SHA) -> Path:  # fmt: skip
    """A latent diffusion run that records (no frozen copy) a Γ-VAE run ``NAME-vae``."""
    vae = make_run(root, f"{name}-vae", data=data, kind=vae_kind, latent=64, patients=vae_patients)
    file = vae / "checkpoints" / "checkpoint-00000004.pt"
    file.write_bytes(VAE_BYTES)
    if not vae_checkpoint:
        file.unlink()
    return make_run(root, name, data=data, vae_run=str(vae), vae_checkpoint=str(file),
                    vae_sha256=sha)  # fmt: skip


def snapshot(root: Path) -> list[tuple[str, int, int]]:
    """Every file and folder under ``root`` with its size and modification time."""
    return sorted(
        (str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
    )


@pytest.fixture
def world(phantom_store, tmp_path, monkeypatch):
    """A map-only and a view-conditional EDM-L64 run on the 32² phantom store; cwd = tmp."""
    monkeypatch.chdir(tmp_path)
    runs = tmp_path / "runs"
    make_run(runs, data=phantom_store)
    make_run(runs, "edm-l64-view", data=phantom_store, class_cond="view")
    return tmp_path


def _base(world: Path, **changes):
    args = {"run": world / "runs" / "edm-l64", "nfe": 5, "out": world / "o.zarr",
            "device": "cpu", "compile": False}  # fmt: skip
    args.update(changes)
    return args


def _copy_store(phantom_store: Path, world: Path, name: str) -> Path:
    copy = world / name
    shutil.copytree(phantom_store, copy)
    return copy


def _relabelled(phantom_store, world):
    store = _copy_store(phantom_store, world, "bad-ids.zarr")
    labels = zarr.open_group(str(store), mode="r+")["labels"]
    block = labels[0]
    block[5, 5] = 8
    labels[0] = block
    return store


def _no_convention(phantom_store, world):
    store = _copy_store(phantom_store, world, "other-convention.zarr")
    group = zarr.open_group(str(store), mode="r+")
    info = dict(group.attrs["echo_synth"])
    info["label_names"] = {**info["label_names"], "4": "background"}
    group.attrs["echo_synth"] = info
    return store


def _without_vae_run(world, phantom_store):
    run = make_latent_run(world / "runs", "l", data=phantom_store)
    shutil.rmtree(world / "runs" / "l-vae")
    return run


def _moved_store_run(world, phantom_store):
    """A run whose training store was moved after training."""
    store = _copy_store(phantom_store, world, "moving.zarr")
    run = make_run(world / "runs", "moved", data=store)
    store.rename(world / "moved.zarr")
    return run


def _folder_with_a_file(world):
    (world / "o.zarr").mkdir()
    (world / "o.zarr" / "notes.txt").write_text("keep")


# (id, setup(world, phantom_store) -> changes of the base arguments, expected fragment)
REFUSALS = [
    ("k 0", lambda w, s: {"k": 0}, "k, batch and chunk must each be at least 1"),
    ("batch 0", lambda w, s: {"batch": 0}, "k, batch and chunk must each be at least 1"),
    ("chunk 0", lambda w, s: {"chunk": 0}, "k, batch and chunk must each be at least 1"),
    ("holdout 1", lambda w, s: {"holdout": 1.0}, "holdout 1.0 must be in [0, 1)"),
    ("negative holdout", lambda w, s: {"holdout": -0.1}, "holdout -0.1 must be in [0, 1)"),
    ("unknown schedule", lambda w, s: {"schedule": "cosine"}, "schedule 'cosine' is unknown"),
    ("negative churn", lambda w, s: {"churn": -5.0}, "churn -5.0 must be at least 0"),
    ("neither model nor run", lambda w, s: {"run": None},
     "name the model (--model NAME) or the run (--run DIR)"),
    ("unknown model", lambda w, s: {"model": "edm-l32"}, "model 'edm-l32' does not exist"),
    ("no run under the runs root", lambda w, s: {"model": "edm", "run": None, "runs_root": w},
     "no trained edm run at"),
    ("missing run folder", lambda w, s: {"run": w / "nowhere"}, "no trained run at"),
    ("a dataset store named by --run", lambda w, s: {"run": s},
     "is a dataset store, not a run folder"),
    ("a Γ-VAE run named by --run", lambda w, s: {"run": make_run(w / "runs", "vae", data=s,
                                                                  kind="vae")},
     "is not a diffusion run (it is a 'vae' run)"),
    ("a run of an unknown model", lambda w, s: {"run": make_run(w / "runs", "x", data=s,
                                                                 model="edm-l32")},
     "model 'edm-l32' does not exist"),
    ("unknown solver", lambda w, s: {"solver": "rk4"}, "solver 'rk4' is unknown"),
    ("unknown class conditioning in the run", lambda w, s: {
        "run": make_run(w / "runs", "odd", data=s, class_cond="views")}, "--class-cond 'views'"),
    ("negative guidance", lambda w, s: {"run": w / "runs" / "edm-l64-view", "guidance": -1.0},
     "--guidance -1.0 must be a number from 0 to 100"),
    ("infinite guidance", lambda w, s: {"run": w / "runs" / "edm-l64-view",
                                        "guidance": math.inf}, "must be a number from 0 to 100"),
    ("huge guidance", lambda w, s: {"run": w / "runs" / "edm-l64-view", "guidance": 1e30},
     "--guidance 1e+30 must be a number from 0 to 100"),
    ("guidance for a map-only run", lambda w, s: {"guidance": 2.0},
     "--guidance needs a model trained with classes"),
    ("NFE 0", lambda w, s: {"nfe": 0}, "NFE (network evaluations) must be an integer >= 1"),
    ("even Heun NFE", lambda w, s: {"nfe": 6}, "use 5 (3 steps) or 7 (4 steps)"),
    ("DDIM past 1000 steps", lambda w, s: {"solver": "ddim", "nfe": 2000},
     "ddim takes at most 1000 steps"),
    ("guided NFE out of reach", lambda w, s: {"run": w / "runs" / "edm-l64-view",
                                              "guidance": 2.0, "nfe": 16},
     "cannot spend exactly 16 NFE; use 14 or 18"),
    ("guided NFE past the steps", lambda w, s: {"run": w / "runs" / "edm-l64-view",
                                                "guidance": 2.0, "solver": "ddim", "nfe": 4000},
     "NFE 4000 with guidance 2.0 is 2000 denoiser calls"),
    ("not a device", lambda w, s: {"device": "gpu"}, "--device 'gpu' is not a device"),
    ("unsupported device", lambda w, s: {"device": "meta"}, "--device 'meta' is not supported"),
    ("a run of another model", lambda w, s: {"model": "edm"}, "is a edm-l64 run, not edm"),
    ("a Γ-VAE run named with its model", lambda w, s: {
        "model": "edm-l64", "run": make_run(w / "runs", "vae", data=s, kind="vae")},
     "is not a diffusion run (it is a 'vae' run)"),
    ("a run without a checkpoint", lambda w, s: {
        "run": make_run(w / "runs", "new", data=s, checkpoint=False)},
     "has no checkpoint yet; train it first"),
    ("missing label store", lambda w, s: {"labels": w / "none.zarr"}, "none.zarr does not exist"),
    ("the run's training store moved", lambda w, s: {
        "run": _moved_store_run(w, s), "labels": None},
     "the training store of run"),
    ("label store of another convention", lambda w, s: {"labels": _no_convention(s, w)},
     "does not use the label convention"),
    ("label values past 4", lambda w, s: {"labels": _relabelled(s, w)},
     "has label values [8] outside 0..4"),
    ("no maps in the splits", lambda w, s: {"splits": "test2"},
     "has no label maps in ['test2']"),
    ("n 0", lambda w, s: {"n": 0}, "--n must be at least 1"),
    ("maps of another size", lambda w, s: {
        "run": make_run(w / "runs", "big", data=s, image_size=64)},
     "holds 32² maps but the edm-l64 run was trained on 64² images"),
    ("batch not dividing the chunk", lambda w, s: {"batch": 3, "chunk": 8},
     "--batch 3 must divide --chunk 8"),
    ("a run without its training patients", lambda w, s: {
        "run": make_run(w / "runs", "old", data=s, patients=False)},
     "does not record its training patients"),
    ("an output name without room for its lock", lambda w, s: {"out": w / ("b" * 250)},
     "it may be at most 242 bytes"),
    ("output of another command", lambda w, s: _folder_with_a_file(w) or {},
     "o.zarr exists and was not written by this exact sample command; pass --overwrite"),
    ("overwrite of a folder that is not a store", lambda w, s: _folder_with_a_file(w) or {
        "overwrite": True}, "--overwrite refuses to delete"),
    ("a missing Γ-VAE run", lambda w, s: {"run": _without_vae_run(w, s)},
     "is not a training run (no config.yaml)"),
    ("a Γ-VAE run that is not one", lambda w, s: {
        "run": make_latent_run(w / "runs", "l", data=s, vae_kind="diffusion")},
     "is not a Γ-VAE run (it is a 'diffusion' run)"),
    ("a Γ-VAE checkpoint gone", lambda w, s: {
        "run": make_latent_run(w / "runs", "l", data=s, vae_checkpoint=False)},
     "checkpoint-00000004.pt no longer exists"),
    ("a Γ-VAE checkpoint changed", lambda w, s: {
        "run": make_latent_run(w / "runs", "l", data=s, sha="0" * 64)},
     "changed since the diffusion model was trained (its hash differs)"),
    ("a Γ-VAE run without its training patients", lambda w, s: {
        "run": make_latent_run(w / "runs", "l", data=s, vae_patients=False)},
     "l-vae does not record its training patients"),
    # an output may never be an input (issue 25: --overwrite deleted the label store it read)
    ("output is the label store", lambda w, s: {
        "labels": _copy_store(s, w, "copyA.zarr"), "out": w / "copyA.zarr", "overwrite": True},
     "copyA.zarr is the label store this command reads"),
    ("output is the run's training store", lambda w, s: {"out": s, "overwrite": True},
     "is the label store this command reads"),
    ("output is a link to the label store", lambda w, s: {
        "labels": _copy_store(s, w, "copyB.zarr"), "overwrite": True,
        "out": (w / "link.zarr").symlink_to(w / "copyB.zarr") or w / "link.zarr"},
     "link.zarr is the label store this command reads (/"),
    ("output inside the run", lambda w, s: {"out": w / "runs" / "edm-l64" / "s.zarr"},
     "lies inside the diffusion run this command reads"),
    ("output holding the label store", lambda w, s: {
        "labels": _copy_store(s, w, "copyC.zarr"), "out": w, "overwrite": True},
     "holds the label store this command reads"),
    ("holdout of every patient", lambda w, s: {"holdout": 0.95, "splits": "train,val"},
     "holdout 0.95 would hold back all 9 source patients"),
]  # fmt: skip


@pytest.mark.parametrize("name, setup, expected", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_every_refusal_is_planned_and_writes_nothing(name, setup, expected, world,
                                                     phantom_store):  # fmt: skip
    changes = setup(world, phantom_store)
    before = snapshot(world)
    with pytest.raises(EchoSynthError, match=re.escape(expected)):
        plan_sample(**_base(world, **changes))
    assert snapshot(world) == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_a_gpu_is_refused(world):
    with pytest.raises(EchoSynthError, match="no GPU is available"):
        plan_sample(**_base(world, device="cuda"))


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"k": 0, "churn": -1.0}, "k, batch and chunk"),  # options before the run
        ({"churn": -1.0, "model": "edm-l32"}, "churn -1.0"),
        ({"model": "edm", "nfe": 6}, "use 5 (3 steps) or 7"),  # NFE before the run's model
        ({"n": 0, "batch": 3, "chunk": 8}, "--n must be at least 1"),  # the maps, then batches
        ({"holdout": 0.95, "batch": 3, "chunk": 8}, "--batch 3 must divide"),
    ],
)
def test_two_refusals_come_in_the_commands_order(changes, expected, world):
    with pytest.raises(EchoSynthError, match=re.escape(expected)):
        plan_sample(**_base(world, **changes))


def test_an_existing_output_is_checked_before_the_holdout(world):
    _folder_with_a_file(world)
    with pytest.raises(EchoSynthError, match="exists and was not written"):
        plan_sample(**_base(world, holdout=0.95))


def _started_store(world, plan: SamplingPlan, sha: str = "0" * 64):
    """The output store as run leaves it after this plan's command started it."""
    identity = {**plan.request.content(plan.run_dir.resolve()), "checkpoint_sha256": sha}
    open_output(
        plan.out, plan.count, 32, plan.request.chunk, {"source": "synthetic"}, identity, False
    )


def test_a_store_this_command_started_is_left_to_run(world):
    """The checkpoint's hash decides between resuming and refusing, after loading: planning
    accepts the store whatever the hash; another seed is refused at once."""
    plan = plan_sample(**_base(world, n=8, chunk=4, batch=4))
    _started_store(world, plan, sha="f" * 64)
    before = snapshot(world)
    assert plan_sample(**_base(world, n=8, chunk=4, batch=4)) == plan
    assert (
        plan_sample(**_base(world, n=8, chunk=4, batch=2)).request.batch == 2
    )  # no content change
    with pytest.raises(EchoSynthError, match="was not written by this exact sample command"):
        plan_sample(**_base(world, n=8, chunk=4, batch=4, seed=3))
    assert (
        plan_sample(**_base(world, n=8, chunk=4, batch=4, seed=3, overwrite=True)).request.seed == 3
    )
    assert snapshot(world) == before


def test_defaults_are_resolved(world, phantom_store):
    spec = get_spec("edm-l64")
    before = snapshot(world)
    plan = plan_sample(run=world / "runs" / "edm-l64", device="cpu")
    assert snapshot(world) == before  # nothing written, not even the default output's folder
    real = DatasetStore(phantom_store)
    sources = real.indices(["train"])  # the val patients stay unseen (evaluate's checkpoints)
    request = plan.request
    assert (request.model, request.solver, request.nfe) == ("edm-l64", spec.solver, spec.nfe)
    assert plan.step_plan.nfe == spec.nfe and plan.step_plan.steps == (spec.nfe + 1) // 2
    assert plan.request.schedule is None and plan.schedule_used == spec.schedule
    assert plan.out == Path("synthetic") / f"edm-l64-nfe{spec.nfe}.zarr"
    assert request.label_store == str(phantom_store) and request.splits == ["train"]
    assert plan.sources == tuple(sources.tolist()) and plan.count == 5 * len(sources)
    assert plan.class_cond is None and plan.request.guidance is None and plan.held_out == ()
    assert plan.device_used == "cpu" and plan.image_size == 32
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.request.nfe = 3  # type: ignore[misc]
    lines = plan.describe()
    assert lines and all(isinstance(line, str) and line for line in lines)
    assert any("edm-l64" in line for line in lines) and any(str(plan.out) in line for line in lines)


def test_guidance_doubles_the_default_nfe_of_a_class_run(world):
    spec = get_spec("edm-l64")
    conditional = plan_sample(run=world / "runs" / "edm-l64-view", device="cpu")
    assert conditional.class_cond == "view" and conditional.request.guidance == 1.0
    assert conditional.request.nfe == spec.nfe
    guided = plan_sample(run=world / "runs" / "edm-l64-view", device="cpu", guidance=2.0)
    assert (
        guided.request.nfe == 2 * spec.nfe and guided.step_plan.steps == conditional.step_plan.steps
    )
    assert any("guidance 2" in line for line in guided.describe())


def test_held_out_patients_are_the_seeded_draw(world, phantom_store):
    plan = plan_sample(**_base(world, holdout=0.25, seed=4, splits="train,val"))
    patients = np.array(DatasetStore(phantom_store).patients(["train", "val"]), dtype=str)
    rng = np.random.default_rng([4, HOLDOUT_STREAM])
    expected = np.sort(rng.choice(patients, size=round(0.25 * len(patients)), replace=False))
    assert plan.held_out == tuple(expected.tolist()) and len(plan.held_out) == 2
    again = plan_sample(**_base(world, holdout=0.25, seed=4, splits="train,val"))
    assert again == plan  # the same every time


def test_a_latent_run_plans_its_own_or_its_recorded_vae(world, phantom_store):
    """The run's frozen Γ-VAE copy when its hash is the recorded one (the recorded run may be
    gone), else the recorded run: as loading will choose."""
    run = make_latent_run(world / "runs", "l", data=phantom_store)
    recorded = world / "runs" / "l-vae"
    assert plan_sample(**_base(world, run=run)).vae_run == recorded
    frozen = run / "vae"
    shutil.copytree(recorded, frozen)
    source = {"run": str(recorded), "checkpoint": str(recorded / "checkpoints" /
              "checkpoint-00000004.pt"), "sha256": VAE_SHA}  # fmt: skip
    (frozen / "source.json").write_text(json.dumps(source))
    shutil.rmtree(recorded)
    plan = plan_sample(**_base(world, run=run))
    assert plan.vae_run == frozen.resolve()
    assert any("decoded by the Γ-VAE of" in line for line in plan.describe())
