"""``echo-synth evaluate``, planned: every check and every run's settings, no training.

:func:`plan_evaluate` takes the arguments of :func:`edmcli.evaluation.evaluate.evaluate` and
returns an :class:`EvaluationPlan`: the test store and its patients, the ``--train`` specs, one
:class:`PlannedRun` per task and spec (the task's settings from the preset and the overrides,
the downstream settings, the training-engine config, the run length, what chooses the tested
checkpoint, the run folder) and the resampling notices. Every refusal of the command is raised
here, in the order the command always made them, except those of a run folder that the
training step meets under its lock (:func:`~edmcli.runs.folder.prepare_run_dir`: a run started
with other settings, a folder that is not a run; :func:`~edmcli.runs.lock.run_lock`: a run in
use by another process) and a checkpoint missing at test time.

Planning reads the stores (attributes, columns, label values) and the generator runs'
``training_patients.json``, and writes nothing. It imports torch (the downstream settings, the
training-engine config and the device check do).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any

from edmcli.data.store import DatasetStore
from edmcli.errors import EchoSynthError
from edmcli.evaluation.downstream import DownstreamSettings, count_train, views_present
from edmcli.evaluation.run_length import (
    RunLength,
    run_length,
    steps_per_epoch,
    stopping_config,
)
from edmcli.evaluation.run_pool import check_jobs
from edmcli.evaluation.train_specs import (
    SYNTHETIC,
    TrainSpec,
    check_held_out,
    check_validation_unseen,
    choose_validation,
    match_probes,
    parse_train_spec,
    store_paths,
)
from edmcli.runs.distributed import process_layout, resolve_device
from edmcli.runs.output_folder import check_output_folder
from edmcli.settings import known_settings, resolve
from edmcli.training.engine import TrainConfig

__all__ = [
    "EvaluationPlan",
    "PlannedRun",
    "check_views",
    "plan_evaluate",
    "resolve_task_values",
]


@dataclass(frozen=True)
class PlannedRun:
    """One downstream run: a task trained on one ``--train`` spec."""

    task: str
    spec: TrainSpec
    settings: DownstreamSettings
    config: TrainConfig
    n_train: int
    run_dir: Path
    checkpoint_chosen_by: str
    length: RunLength

    def record(self) -> dict[str, Any]:
        """The run as the training, testing and report steps take it: a fresh dict that they
        fill in (wall times, steps, stop reason)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}  # shallow, unlike asdict


@dataclass(frozen=True)
class EvaluationPlan:
    """Everything an evaluation will do, checked (:func:`plan_evaluate`)."""

    train: tuple[str, ...]
    test: Path
    out: Path
    preset: str
    tasks: tuple[str, ...]
    overrides: MappingProxyType  # the command's settings overrides (None: the preset's)
    device: str  # as asked (``auto``, ``cpu``, ``cuda[:N]``)
    device_used: str  # what it resolves to here
    world_size: int
    seed: int
    precision: str
    bootstrap_iterations: int
    bootstrap_fraction: float
    checkpoint: str
    val: Path | None
    fidelity: bool
    test_store: str  # resolved path of ``test``
    test_patients: frozenset[str]
    specs: tuple[TrainSpec, ...]
    runs: tuple[PlannedRun, ...]
    notes: tuple[str, ...]  # one per store whose images the networks see resampled
    jobs: int = 1  # runs trained at once (evaluation.run_pool)
    probes: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))  # slug → probe

    def describe(self) -> list[str]:
        """Short lines for people (``study --dry-run``)."""
        lines = [
            f"test on the test split of {self.test_store} ({len(self.test_patients)} patients)",
        ]
        for run in self.runs:
            config = run.config
            lines.append(
                f"{run.task} on {run.spec.label} ({run.spec.kind}, {run.n_train} images): "
                f"{'at most ' if config.patience else ''}{config.steps} steps of batch "
                f"{config.batch} at {run.settings.size}², tested: {run.checkpoint_chosen_by}"
            )
        lines.extend(f"note: {note}" for note in self.notes)
        lines.append(
            f"patient bootstrap: {self.bootstrap_iterations} iterations of "
            f"{self.bootstrap_fraction:g} of the test patients"
            + ("; fidelity judged by the real-trained networks" if self.fidelity else "")
        )
        lines.extend(f"probe of {slug}: {store}" for slug, store in self.probes.items())
        lines.append(
            f"→ {self.out} (report.json, report.md, plots/; runs in {self.out / 'runs'}), "
            f"device {self.device_used}, precision {self.precision}, seed {self.seed}"
            + (f", {self.jobs} runs at once" if self.jobs > 1 else "")
        )
        return lines


def plan_evaluate(
    train: list[str],
    test: Path,
    out: Path,
    preset: str = "paper",
    tasks: list[str] | tuple[str, ...] = ("seg", "cls"),
    overrides: dict[str, Any] | None = None,
    device: str = "auto",
    seed: int = 0,
    precision: str = "auto",
    bootstrap_iterations: int = 1000,
    bootstrap_fraction: float = 0.8,
    checkpoint: str = "real",
    val: Path | None = None,
    fidelity: bool = False,
    jobs: int = 1,
    probes: list[Path] | tuple[Path, ...] = (),
) -> EvaluationPlan:
    """The checked plan of :func:`edmcli.evaluation.evaluate.evaluate` with these arguments (see
    there); raises its refusals (module docstring), writes nothing."""
    overrides = dict(overrides or {})
    _check_options(train, bootstrap_iterations, bootstrap_fraction)
    check_output_folder(out, "evaluation")
    test_store, test_patients = _check_test_store(test)
    _check_label_values(test, train)
    specs = _parse_specs(train, fidelity)
    if probes and not fidelity:
        raise EchoSynthError("--probe stores are judged by --fidelity; add --fidelity")
    matched = match_probes([str(p) for p in probes], specs)
    world_size, _rank, local_rank = process_layout()
    device_used = resolve_device(device, local_rank)
    check_jobs(jobs, str(device_used), world_size)
    runs = _plan_runs(
        specs, tasks, Path(out), preset, overrides, test_store, test_patients,
        checkpoint=checkpoint, val=val, precision=precision, seed=seed, world_size=world_size,
    )  # fmt: skip
    notes = _size_notices(specs, test_store, runs)
    return EvaluationPlan(
        train=tuple(train), test=Path(test), out=Path(out), preset=preset, tasks=tuple(tasks),
        overrides=MappingProxyType(overrides), device=device, device_used=str(device_used),
        world_size=world_size, seed=seed, precision=precision,
        bootstrap_iterations=bootstrap_iterations, bootstrap_fraction=bootstrap_fraction,
        checkpoint=checkpoint, val=val, fidelity=fidelity, test_store=test_store,
        test_patients=frozenset(test_patients), specs=tuple(specs), runs=tuple(runs),
        notes=tuple(notes), jobs=jobs, probes=MappingProxyType(matched),
    )  # fmt: skip


def resolve_task_values(preset: str, task: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """Settings of one task (``seg`` or ``cls``): the settings layer's preset row with the
    command's non-None overrides that the task takes (``deep_supervision`` is the segmenter's)."""
    known = known_settings(task)
    return resolve(task, preset, {k: v for k, v in overrides.items() if k in known})


def check_views(store: str, split: str, role: str) -> None:
    """View classification needs both A2C and A4C images in the split."""
    counts = views_present(DatasetStore(store), split)
    missing = [v for v, n in counts.items() if n == 0]
    if missing:
        raise EchoSynthError(
            f"{role} {store} has no {' or '.join(missing)} images in its {split} split; view "
            "classification needs both A2C and A4C (use --task seg)"
        )


def _check_options(train: list[str], bootstrap_iterations: int, bootstrap_fraction: float) -> None:
    """Refuse an empty ``--train`` and bootstrap settings out of range."""
    if not train:
        raise EchoSynthError("--train is required (a dataset store to train on)")
    if bootstrap_iterations < 1:
        raise EchoSynthError(f"--bootstrap {bootstrap_iterations} must be at least 1")
    if not 0.0 < bootstrap_fraction <= 1.0:
        raise EchoSynthError(f"--bootstrap-fraction {bootstrap_fraction} must be in (0, 1]")


def _check_test_store(test: Path) -> tuple[str, set[str]]:
    """(resolved path, patients of its test split) of the ``--test`` store, which must be real
    and hold a test split."""
    test_reader = DatasetStore(test)
    test_store = str(Path(test).resolve())
    if (test_reader.info.get("provenance") or {}).get("source") == SYNTHETIC:
        raise EchoSynthError(f"--test {test} is a synthetic store; test on real images")
    if len(test_reader.indices("test")) == 0:
        raise EchoSynthError(
            f"--test {test} has no samples in its test split; the test store must hold "
            "held-out real patients in split 'test'"
        )
    return test_store, set(test_reader.patients("test"))


def _check_label_values(test: Path, train: list[str]) -> None:
    """Refuse, before any training, a store whose label values are outside the convention."""
    for store in dict.fromkeys([str(test), *(p for t in train for p in store_paths(t))]):
        bad = DatasetStore(store).invalid_label_values()
        if bad:  # before training, not after it
            raise EchoSynthError(
                f"{store} has label values {bad} outside the convention 0..4; rebuild it with "
                "echo-synth prepare"
            )


def _parse_specs(train: list[str], fidelity: bool) -> list[TrainSpec]:
    """The ``--train`` values as :class:`TrainSpec` s: no store twice, and a real one when
    ``fidelity`` needs reference runs."""
    specs = [parse_train_spec(text) for text in train]
    slugs = [s.slug for s in specs]
    if len(set(slugs)) != len(slugs):
        raise EchoSynthError("the same --train store(s) are given twice")
    if fidelity and not any(s.kind == "real" for s in specs):
        raise EchoSynthError(
            "--fidelity judges synthetic images with the real-trained networks: add a real "
            "store with --train (for instance the --test store, whose train split trains them)"
        )
    return specs


def _plan_runs(
    specs: list[TrainSpec],
    tasks: list[str] | tuple[str, ...],
    out: Path,
    preset: str,
    overrides: dict[str, Any],
    test_store: str,
    test_patients: set[str],
    *,
    checkpoint: str,
    val: Path | None,
    precision: str,
    seed: int,
    world_size: int,
) -> list[PlannedRun]:
    """One run per task and ``--train`` spec (task, spec, settings, train config, run folder,
    what chooses the tested checkpoint, run length), every check made before any training."""
    runs: list[PlannedRun] = []
    for task in tasks:
        values = resolve_task_values(preset, task, overrides)
        if task == "cls":
            check_views(test_store, "test", "--test")
        for spec in specs:
            if task == "cls":
                for store in spec.stores:
                    check_views(store, "train", "--train")
            val_store, val_split, chosen_by = choose_validation(
                spec, specs, test_store, task, checkpoint, None if val is None else str(val)
            )
            check_held_out(spec, (val_store, val_split), test_store, test_patients)
            check_validation_unseen(spec, (val_store, val_split))
            n_train = count_train(spec.stores, task)
            batch_size = int(values["batch"])
            if batch_size < 1:
                raise EchoSynthError(f"batch {batch_size} must be at least 1")
            if n_train < batch_size:
                raise EchoSynthError(
                    f"batch {batch_size} is larger than the {n_train} training images of "
                    f"{spec.label}; lower the batch"
                )
            per_epoch = steps_per_epoch(n_train, batch_size)
            length = run_length(values, n_train)  # until convergence, within a cap
            settings = _downstream_settings(task, spec, values, val_store, val_split)
            config = _train_config(values, length, per_epoch, batch_size, precision, seed,
                                   world_size)  # fmt: skip
            runs.append(
                PlannedRun(task=task, spec=spec, settings=settings, config=config,
                           n_train=n_train, run_dir=out / "runs" / f"{task}-{spec.slug}",
                           checkpoint_chosen_by=chosen_by, length=length)
            )  # fmt: skip
    return runs


def _downstream_settings(
    task: str,
    spec: TrainSpec,
    values: dict[str, Any],
    val_store: str | None,
    val_split: str | None,
) -> DownstreamSettings:
    """The checked :class:`~edmcli.evaluation.downstream.DownstreamSettings` of one run."""
    settings = DownstreamSettings(
        task=task,
        train_stores=spec.stores,
        val_store=None if val_store is None else str(Path(val_store).resolve()),
        val_split=val_split,
        checkpoint="last" if val_store is None else "best",
        size=int(values["size"]),
        augment=bool(values["augment"]),
        base_filters=int(values.get("base_filters", 32)),
        max_filters=int(values.get("max_filters", 512)),
        deep_supervision=bool(values.get("deep_supervision", False)),
        eval_batch=int(values["eval_batch"]),
    )
    settings.validate()
    return settings


def _train_config(
    values: dict[str, Any],
    length: RunLength,
    per_epoch: int,
    batch_size: int,
    precision: str,
    seed: int,
    world_size: int,
) -> TrainConfig:
    """The checked training-engine config of one run: ``length`` steps (validation every epoch
    unless the settings say otherwise) and the task's stopping rule."""
    validate_every = values.get("validate_every") or per_epoch
    ema = float(values["ema_decay"])
    if not 0.0 <= ema < 1.0:
        raise EchoSynthError(f"ema_decay {ema} must be in [0, 1)")
    config = TrainConfig(
        steps=length.steps,
        batch=batch_size,
        lr=float(values["lr"]),
        weight_decay=float(values["weight_decay"]),
        warmup_steps=int(values["warmup_steps"]),
        grad_clip=values["grad_clip"],
        ema_decay=ema,
        precision=precision,
        checkpoint_every=int(values["checkpoint_every"]),
        log_every=int(values["log_every"]),
        validate_every=int(validate_every),
        num_workers=int(values["num_workers"]),
        seed=seed,
        **stopping_config(values),
    )
    config.validate(world_size)
    return config


def _size_notices(specs: list[TrainSpec], test_store: str, runs: list[PlannedRun]) -> list[str]:
    """One notice per store whose images the networks see resampled."""
    sizes = sorted({run.settings.size for run in runs})
    notes = []
    seen: set[str] = set()
    stores = [s for spec in specs for s in spec.stores] + [run.settings.val_store for run in runs]
    for store in stores:
        if store is None or store in seen:
            continue
        seen.add(store)
        h, w = DatasetStore(store).image_size
        if any((h, w) != (s, s) for s in sizes):
            target = " and ".join(f"{s}×{s}" for s in sizes)
            notes.append(f"{store} has {h}×{w} images; they are resampled to {target}")
    h, w = DatasetStore(test_store).image_size
    if any((h, w) != (s, s) for s in sizes):
        target = " and ".join(f"{s}×{s}" for s in sizes)
        notes.append(
            f"test store {test_store} has {h}×{w} images; they are resampled to {target} for "
            f"the networks and the predictions are scored back at {h}×{w}"
        )
    return notes
