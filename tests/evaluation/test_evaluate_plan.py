"""``plan_evaluate``: every refusal of ``echo-synth evaluate`` before any training, the runs and
settings it resolves, and that planning writes nothing (no network is built: milliseconds)."""

from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from edmcli.data.prepare import prepare_phantom
from edmcli.data.store import DatasetStore
from edmcli.errors import EchoSynthError
from edmcli.evaluation.evaluate_plan import EvaluationPlan, plan_evaluate
from edmcli.evaluation.train_specs import parse_train_spec

FAST = {"size": 32, "steps": 3, "batch": 4, "validate_every": 3}


def snapshot(root: Path) -> list[tuple[str, int, int]]:
    """Every file and folder under ``root`` with its size and modification time."""
    return sorted(
        (str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
    )


def _copy_with(real: Path, root: Path, name: str, field: str, old, new) -> Path:
    """A copy of ``real`` whose per-sample ``field`` has ``old`` replaced by ``new``."""
    copy = root / name
    shutil.copytree(real, copy)
    group = zarr.open_group(str(copy), mode="r+")
    values = np.asarray(group[field][:])
    group[field][:] = np.where(values == old, new, values)
    return copy


def _synthetic(root: Path, real: Path, name: str = "syn.zarr", split_ratio=(1.0, 0.0, 0.0),
               **provenance) -> Path:  # fmt: skip
    """A small phantom store posing as ``sample`` output from the label maps of ``real``."""
    path = root / name
    prepare_phantom(path, n_patients=3, size=32, seed=50, split_ratio=split_ratio)
    group = zarr.open_group(str(path), mode="r+")
    info = dict(group.attrs["echo_synth"])
    info["provenance"] = {
        "source": "synthetic", "model": "edm-l64", "nfe": 50, "solver": "heun",
        "generator_patients": DatasetStore(real).patients(["train", "val"]), **provenance,
    }  # fmt: skip
    group.attrs["echo_synth"] = info
    return path


def _bad_label(real: Path, root: Path) -> Path:
    copy = root / "bad-label.zarr"
    shutil.copytree(real, copy)
    labels = zarr.open_group(str(copy), mode="r+")["labels"]
    block = labels[5]
    block[3, 3] = 7
    labels[5] = block
    return copy


def _no_val(root: Path) -> Path:
    path = root / "no-val.zarr"
    prepare_phantom(path, n_patients=4, size=32, seed=13, split_ratio=(0.75, 0.0, 0.25))
    return path


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    return tmp_path


def _args(real: Path, root: Path, **changes):
    args = {"train": [str(real)], "test": real, "out": root / "e", "preset": "tiny",
            "overrides": dict(FAST), "device": "cpu"}  # fmt: skip
    args.update(changes)
    return args


def _from_maps(real: Path, root: Path, name: str, splits: list[str], **provenance) -> Path:
    """A copy of ``real`` posing as ``sample --splits`` output: the rows of ``splits`` become
    training rows (as ``sample`` writes them), the others stay as they were."""
    copy = root / name
    shutil.copytree(real, copy)
    group = zarr.open_group(str(copy), mode="r+")
    split = np.asarray(group["split"][:])
    group["split"][:] = np.where(np.isin(split, splits), "train", split)
    info = dict(group.attrs["echo_synth"])
    info["provenance"] = {
        "source": "synthetic", "model": "edm-l64", "nfe": 35, "solver": "heun",
        "label_splits": splits, "checkpoint_sha256": "ab" * 32,
        "generator_patients": DatasetStore(real).patients(["train", "val"]), **provenance,
    }  # fmt: skip
    group.attrs["echo_synth"] = info
    return copy


def _leaky(real, root):
    """A synthetic store whose generator saw a test patient."""
    test_patient = DatasetStore(real).patients("test")[0]
    train_val = DatasetStore(real).patients(["train", "val"])
    return _synthetic(root, real, "leaky.zarr", generator_patients=[*train_val, test_patient])


# (id, setup(real store, root) -> changes of the base arguments, expected fragment)
REFUSALS = [
    ("no --train", lambda s, r: {"train": []}, "--train is required"),
    ("bootstrap 0", lambda s, r: {"bootstrap_iterations": 0}, "--bootstrap 0 must be at least 1"),
    ("bootstrap fraction 0", lambda s, r: {"bootstrap_fraction": 0.0},
     "--bootstrap-fraction 0.0 must be in (0, 1]"),
    ("bootstrap fraction past 1", lambda s, r: {"bootstrap_fraction": 1.5},
     "--bootstrap-fraction 1.5 must be in (0, 1]"),
    ("missing test store", lambda s, r: {"test": r / "none.zarr"}, "none.zarr does not exist"),
    ("test store that is a folder", lambda s, r: {"test": r}, "is not a dataset store"),
    ("synthetic test store", lambda s, r: {"test": _synthetic(r, s)},
     "is a synthetic store; test on real images"),
    ("test store without a test split", lambda s, r: {
        "test": _copy_with(s, r, "nt.zarr", "split", "test", "train")},
     "has no samples in its test split"),
    ("label value past 4", lambda s, r: {"train": [str(_bad_label(s, r))]},
     "has label values [7] outside the convention 0..4"),
    ("train store missing", lambda s, r: {"train": [str(r / "none.zarr")]}, "does not exist"),
    ("train value naming no store", lambda s, r: {"train": [","]}, "--train ',' names no store"),
    ("train store without a train split", lambda s, r: {
        "train": [str(_copy_with(s, r, "nt.zarr", "split", "train", "val"))]},
     "has no samples in its train split"),
    ("synthetic store without its generator's patients", lambda s, r: {
        "train": [str(_synthetic(r, s, generator_patients=[]))]},
     "does not record the patients its generator was trained on"),
    ("the same store twice", lambda s, r: {"train": [str(s), str(s)]},
     "the same --train store(s) are given twice"),
    ("fidelity without a real store", lambda s, r: {"train": [str(_synthetic(r, s))],
                                                    "fidelity": True},
     "--fidelity judges synthetic images with the real-trained networks"),
    ("not a device", lambda s, r: {"device": "gpu"}, "--device 'gpu' is not a device"),
    ("unknown preset", lambda s, r: {"preset": "huge"}, "preset 'huge' is unknown"),
    ("test split with one view", lambda s, r: {
        "test": _copy_with(s, r, "a4c.zarr", "view", "A2C", "A4C")},
     "has no A2C images in its test split"),
    ("train split with one view", lambda s, r: {
        "train": [str(_copy_with(s, r, "a4c.zarr", "view", "A2C", "A4C"))]},
     "has no A2C images in its train split"),
    ("unknown checkpoint choice", lambda s, r: {"checkpoint": "best"},
     "checkpoint choice 'best' is unknown"),
    ("synthetic choice without a synthetic val split", lambda s, r: {
        "train": [str(_synthetic(r, s))], "checkpoint": "synthetic"}, "sample --holdout"),
    ("synthetic --val", lambda s, r: {"val": _synthetic(r, s)},
     "is a synthetic store; give real validation images"),
    ("--val without a val split", lambda s, r: {"val": _no_val(r)},
     "has no images in its val split"),
    ("no real val split anywhere", lambda s, r: (lambda p: {"train": [str(p)], "test": p})(
        _no_val(r)), "no real store has a val split"),
    ("train split sharing test patients", lambda s, r: {
        "train": [str(_copy_with(s, r, "copy.zarr", "split", "test", "train"))]},
     "shares 3 patient(s) with the train split of"),
    ("generator that saw a test patient", lambda s, r: {"train": [str(_leaky(s, r))]},
     "with the patients the generator of leaky was trained on"),
    ("checkpoint chosen on the val patients of a store sampled from their maps",
     lambda s, r: {"train": [str(s), str(_from_maps(s, r, "tv.zarr", ["train", "val"]))]},
     "are among the run's training rows (synthetic store"),
    ("checkpoint chosen on a --val store whose val patients a store trained on",
     lambda s, r: {"train": [str(_from_maps(s, r, "tv.zarr", ["train", "val"]))], "val": s},
     "sample the store with --splits train"),
    ("a probe store as --train", lambda s, r: {
        "train": [str(s), str(_from_maps(s, r, "probe.zarr", ["test"]))]},
     "was sampled from test label maps: a probe store"),
    ("a probe without --fidelity", lambda s, r: {
        "train": [str(s), str(_from_maps(s, r, "t.zarr", ["train"]))],
        "probes": [_from_maps(s, r, "probe.zarr", ["test"])]}, "add --fidelity"),
    ("a real store as a probe", lambda s, r: {
        "train": [str(s), str(_from_maps(s, r, "t.zarr", ["train"]))], "probes": [s],
        "fidelity": True}, "is not a synthetic store"),
    ("a probe of another generator", lambda s, r: {
        "train": [str(s), str(_from_maps(s, r, "t.zarr", ["train"]))], "fidelity": True,
        "probes": [_from_maps(s, r, "probe.zarr", ["test"], nfe=9)]},
     "that no synthetic --train store shares"),
    ("batch larger than the train split", lambda s, r: {"overrides": {**FAST, "batch": 64}},
     "batch 64 is larger than the 24 training images"),
    ("zero steps", lambda s, r: {"overrides": {**FAST, "steps": 0}}, "steps 0 must be positive"),
    ("size not a multiple of 8", lambda s, r: {"overrides": {**FAST, "size": 20}},
     "--size 20 must be a multiple of 8"),
    ("ema decay 2", lambda s, r: {"overrides": {**FAST, "ema_decay": 2.0}},
     "ema_decay 2.0 must be in [0, 1)"),
    ("patience 0", lambda s, r: {"overrides": {**FAST, "patience": 0}},
     "patience 0 must be at least 1"),
    ("negative workers", lambda s, r: {"overrides": {**FAST, "num_workers": -1}},
     "num_workers -1 must be at least 0"),
    ("precision fp8", lambda s, r: {"precision": "fp8"}, "precision 'fp8'"),
]  # fmt: skip


@pytest.mark.parametrize("name, setup, expected", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_every_refusal_is_planned_and_writes_nothing(name, setup, expected, phantom_store, root):
    changes = setup(phantom_store, root)
    before = snapshot(root)
    with pytest.raises(EchoSynthError, match=re.escape(expected)):
        plan_evaluate(**_args(phantom_store, root, **changes))
    assert snapshot(root) == before
    assert not (root / "e").exists()


def test_a_batch_that_the_processes_cannot_share_is_refused(phantom_store, root, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")  # as torchrun sets it: planned before joining a group
    with pytest.raises(EchoSynthError, match="batch 4 must be a positive multiple of the 3"):
        plan_evaluate(**_args(phantom_store, root))


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"bootstrap_iterations": 0, "test": "SYNTHETIC"}, "--bootstrap 0"),
        ({"test": "SYNTHETIC", "train": ["BAD_LABEL"]}, "is a synthetic store; test on real"),
        ({"train": ["BAD_LABEL", "BAD_LABEL"]}, "label values [7]"),
        ({"train": ["REAL", "REAL"], "device": "gpu"}, "given twice"),
        ({"device": "gpu", "overrides": {**FAST, "batch": 64}}, "--device 'gpu'"),
        ({"preset": "huge", "test": "A4C"}, "preset 'huge' is unknown"),
    ],
)
def test_two_refusals_come_in_the_commands_order(changes, expected, phantom_store, root):
    stores = {"REAL": str(phantom_store)}
    changes = dict(changes)
    for key, value in list(changes.items()):
        if value == "SYNTHETIC":
            changes[key] = _synthetic(root, phantom_store)
        elif value == "A4C":
            changes[key] = _copy_with(phantom_store, root, "a4c.zarr", "view", "A2C", "A4C")
        elif isinstance(value, list):
            if "BAD_LABEL" in value and "BAD_LABEL" not in stores:
                stores["BAD_LABEL"] = str(_bad_label(phantom_store, root))
            changes[key] = [stores.get(v, v) for v in value]
    with pytest.raises(EchoSynthError, match=re.escape(expected)):
        plan_evaluate(**_args(phantom_store, root, **changes))


def test_the_plan_holds_every_run_and_writes_nothing(phantom_store, root):
    synthetic = _synthetic(root, phantom_store)
    before = snapshot(root)
    plan = plan_evaluate(**_args(phantom_store, root, train=[str(phantom_store), str(synthetic)]))
    assert snapshot(root) == before and not (root / "e").exists()
    assert isinstance(plan, EvaluationPlan)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.seed = 1  # type: ignore[misc]
    assert [(r.task, r.spec.kind) for r in plan.runs] == [
        ("seg", "real"), ("seg", "synthetic"), ("cls", "real"), ("cls", "synthetic")]  # fmt: skip
    real = parse_train_spec(str(phantom_store))
    first = plan.runs[0]
    assert first.run_dir == root / "e" / "runs" / f"seg-{real.slug}"
    assert first.n_train == 24 and first.config.steps == 3 and first.config.batch == 4
    assert first.settings.size == 32 and first.settings.val_store == str(phantom_store.resolve())
    assert "real images" in first.checkpoint_chosen_by
    assert plan.test_store == str(phantom_store.resolve())
    assert plan.test_patients == frozenset(DatasetStore(phantom_store).patients("test"))
    assert plan.notes == () and plan.world_size == 1 and plan.device_used == "cpu"
    assert list(first.record()) == ["task", "spec", "settings", "config", "n_train", "run_dir",
                                    "checkpoint_chosen_by", "length"]  # fmt: skip
    assert first.record() is not first.record()  # a fresh dict per run for the steps to fill
    lines = plan.describe()
    assert len(lines) >= 1 + len(plan.runs) and all(isinstance(line, str) for line in lines)
    assert any("seg on syn" in line for line in lines)


def test_the_presets_settings_and_resampling_notices(phantom_store, root):
    other = root / "p40.zarr"
    prepare_phantom(other, n_patients=4, size=40, seed=7, split_ratio=(0.5, 0.25, 0.25))
    plan = plan_evaluate(**_args(phantom_store, root, train=[str(other)], tasks=("seg",),
                                 overrides={"steps": 3, "batch": 4}))  # fmt: skip
    (run,) = plan.runs
    assert run.settings.size == 64  # the tiny preset's network size
    assert any("p40.zarr has 40×40 images; they are resampled to 64×64" in n for n in plan.notes)
    assert any("test store" in n and "scored back at 32×32" in n for n in plan.notes)
    assert any(note in line for note in plan.notes for line in plan.describe())


def test_stores_from_the_train_maps_are_chosen_on_unseen_val_patients(phantom_store, root):
    """The demo's and the study's protocol: sampled from the train maps, every run is chosen on
    the real val patients, whom no run has seen; the probe is matched to its generator."""
    store = _from_maps(phantom_store, root, "t.zarr", ["train"])
    probe = _from_maps(phantom_store, root, "probe.zarr", ["test"])
    plan = plan_evaluate(**_args(phantom_store, root, train=[str(phantom_store), str(store)],
                                 fidelity=True, probes=[probe]))  # fmt: skip
    val = set(DatasetStore(phantom_store).patients("val"))
    for run in plan.runs:
        assert run.settings.val_split == "val"
        assert set(DatasetStore(run.settings.val_store).patients("val")) == val
        assert val.isdisjoint(DatasetStore(run.spec.stores[0]).patients("train"))
    assert dict(plan.probes) == {parse_train_spec(str(store)).slug: str(probe.resolve())}


def test_the_papers_protocol_chooses_on_the_stores_own_held_out_patients(phantom_store, root):
    """sample --splits train,val --holdout F with --checkpoint synthetic: the val rows are whole
    held-out source patients, which the training rows do not contain."""
    store = _from_maps(phantom_store, root, "tv.zarr", ["train", "val"], holdout=0.25)
    group = zarr.open_group(str(store), mode="r+")
    patients, split = np.asarray(group["patient"][:]), np.asarray(group["split"][:])
    held = np.unique(patients[split == "train"])[:2]
    group["split"][:] = np.where(np.isin(patients, held), "val", split)
    plan = plan_evaluate(**_args(phantom_store, root, train=[str(store)], checkpoint="synthetic"))
    assert {r.settings.val_store for r in plan.runs} == {str(store.resolve())}
