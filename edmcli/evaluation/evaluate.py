"""Evaluation stage: is a (synthetic) dataset good for training? (paper sections III.C–D)

Each ``--train`` value trains one segmenter and/or one view classifier (``--task``) on the train
split of that store (``a.zarr,b.zarr``: one run on the union of several stores), picks the best
validation checkpoint and scores it on the *test* split of the ``--test`` store, which must be
real and held out. Runs live in ``OUT/runs/<task>-<stores>-<hash>/`` and resume when the same
command is run again; ``OUT/report.json``, ``OUT/report.md`` and ``OUT/plots/*.png`` are
rewritten at the end of every call.

* Real-trained reference: a train store whose provenance is not ``synthetic`` (typically the
  test store itself: its train split) is a *real* run; the first real run is the reference line
  of the report and of the gap (synthetic − real, paired patient-level bootstrap).
* Checkpoint choice (:func:`~edmcli.evaluation.train_specs.choose_validation`): by default the
  best checkpoint on real validation images; or on the synthetic store's held-out val split; or
  the last one. What chose each run's checkpoint is in the report.
* Held-out check: the test split's patients must not appear in the train split of any train
  store, in the validation split used, nor among the patients the generator of a synthetic
  store was trained or validated on (its provenance ``generator_patients``, and the
  ``training_patients.json`` of its ``run`` folder when that exists). A synthetic store that
  records neither is refused: the check cannot be made.
* Image sizes: stores whose images differ from the networks' input size (``--size``, preset
  ``paper`` 256, ``tiny`` 64) are resampled with a notice; test predictions are resampled back
  and scored at the test store's resolution (HD in its pixels, and in mm from its spacing).
* ``--fidelity``: each synthetic spec is also judged in seconds by the real-trained reference
  networks (label fidelity, classifier accuracy on synthetic images, FD / KID / PRDC in their
  feature spaces, diversity: :mod:`edmcli.evaluation.fidelity`), and with ≥ 3 synthetic specs
  each metric's rank correlation with the downstream mean Dice and accuracy is reported.
"""

from __future__ import annotations

import datetime as _dt
import time
from pathlib import Path
from typing import Any

import torch

from edmcli.console import console
from edmcli.data.store import DatasetStore
from edmcli.data.store_format import code_version
from edmcli.errors import EchoSynthError
from edmcli.evaluation.correlation import correlation_table
from edmcli.evaluation.downstream import (
    DownstreamSettings,
    count_train,
    load_split,
    make_task,
    test_run,
    views_present,
)
from edmcli.evaluation.fidelity import quality_section
from edmcli.evaluation.report import write_report
from edmcli.evaluation.report.data import build_report
from edmcli.evaluation.report.markdown import print_summary
from edmcli.evaluation.run_length import (
    RunLength,
    run_length,
    steps_per_epoch,
    stop_reason,
    stopping_config,
)
from edmcli.evaluation.train_specs import (
    SYNTHETIC,
    TrainSpec,
    check_held_out,
    choose_validation,
    parse_train_spec,
    store_paths,
)
from edmcli.runs.distributed import (
    DistEnv,
    broadcast_flag,
    init_distributed,
    shutdown_distributed,
)
from edmcli.runs.folder import prepare_run_dir
from edmcli.runs.lock import run_lock
from edmcli.settings import known_settings, resolve
from edmcli.training.engine import TrainConfig, Trainer
from edmcli.training.run import train_config_dict


# --------------------------------------------------------------------------- the stage
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


def evaluate(
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
) -> dict[str, Any] | None:
    """Train, test and report (the body of ``echo-synth evaluate``): ``overrides`` are settings of
    :data:`edmcli.settings.PRESETS` ``["seg"]``/``["cls"]`` (None: the preset decides). Returns
    the report on the main process (None on the other ranks of a ``torchrun`` launch).

    ``fidelity``: also judge each synthetic ``--train`` spec with the real-trained reference
    networks, without training (:mod:`edmcli.evaluation.fidelity`): a ``quality`` section in the
    report, and with ≥ 3 synthetic specs the rank correlation of each metric with the
    downstream numbers. It needs a real ``--train`` store (the reference runs)."""
    overrides = dict(overrides or {})
    _check_options(train, bootstrap_iterations, bootstrap_fraction)
    test_store, test_patients = _check_test_store(test)
    _check_label_values(test, train)
    specs = _parse_specs(train, fidelity)

    env = init_distributed(device)
    try:
        plans = _plan_runs(
            specs, tasks, Path(out), preset, overrides, test_store, test_patients,
            checkpoint=checkpoint, val=val, precision=precision, seed=seed,
            world_size=env.world_size,
        )  # fmt: skip
        notes = _size_notices(specs, test_store, plans)
        if env.is_main:
            Path(out).mkdir(parents=True, exist_ok=True)
            for note in notes:
                console.print(f"note: {note}", highlight=False)
        started = time.perf_counter()
        for plan in plans:
            _train(plan, preset, env)
        if not env.is_main:
            return None
        test_data = _load_test_data(test_store, tasks)
        results = [_test(plan, test_data, env.device) for plan in plans]
        quality = quality_section(plans, test_data, env.device, seed) if fidelity else None
        report = build_report(
            results,
            test_store=test_store,
            test_data=test_data,
            settings=_report_settings(
                preset, tasks, overrides, seed, env, precision, bootstrap_iterations,
                checkpoint, val, bootstrap_fraction, fidelity,
            ),
            notes=notes,
            wall_s=time.perf_counter() - started,
        )  # fmt: skip
        if quality is not None:
            quality["correlation"] = correlation_table(quality, report, bootstrap_iterations, seed)
            report["quality"] = quality
        _write(report, Path(out), test_data, results)
        return report
    finally:
        shutdown_distributed()


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
) -> list[dict[str, Any]]:
    """One plan per task and ``--train`` spec (task, spec, settings, train config, run folder,
    what chooses the tested checkpoint, run length), every check made before any training."""
    plans: list[dict[str, Any]] = []
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
            n_train = count_train(spec.stores, task)
            batch_size = int(values["batch"])
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
            plans.append(
                {"task": task, "spec": spec, "settings": settings, "config": config,
                 "n_train": n_train, "run_dir": out / "runs" / f"{task}-{spec.slug}",
                 "checkpoint_chosen_by": chosen_by, "length": length}
            )  # fmt: skip
    return plans


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


def _train(plan: dict[str, Any], preset: str, env: DistEnv) -> None:
    """Train (or resume) one planned run under its lock; its steps, epochs, stop reason and
    wall time go into ``plan``."""
    settings, config, run_dir = plan["settings"], plan["config"], plan["run_dir"]
    resolved = {"kind": f"downstream-{settings.task}", "preset": preset,
                **settings.as_dict(), **train_config_dict(config)}  # fmt: skip
    agree = lambda refused: broadcast_flag(refused, env)  # noqa: E731
    with run_lock(run_dir, enabled=env.is_main, agree=agree):  # one writer per run
        resumed = prepare_run_dir(run_dir, resolved, env.is_main)
        if env.is_main:
            console.print(
                f"{'resuming' if resumed else 'training'} {settings.task} on "
                f"{plan['spec'].label} ({plan['n_train']} images, {plan['spec'].kind}) in "
                f"{run_dir}: batch {config.batch} on {env.device}, "
                f"{_length_text(config, plan['length'])}; "
                f"tested: {plan['checkpoint_chosen_by']}",
                highlight=False,
            )
        t0 = time.perf_counter()
        result = Trainer(make_task(settings), config, run_dir, env).fit()
        plan["train_wall_s"] = time.perf_counter() - t0
        plan["steps_done"] = result.steps
        plan["resumed_from"] = result.resumed_from
        plan["epochs_done"] = result.epochs
        plan["stop_reason"] = stop_reason(result.stop_reason, result.steps, plan["length"])
        if env.is_main:
            console.print(
                f"{settings.task} on {plan['spec'].label}: {result.steps} steps "
                f"({result.epochs:.1f} epochs), stopped by {plan['stop_reason']}",
                highlight=False,
            )


def _load_test_data(test_store: str, tasks: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """The test split per task; the classifier's holds only the images of a known view."""
    test_data = {task: load_split(test_store, "test") for task in tasks}
    if "cls" in test_data:
        data = test_data["cls"]
        test_data["cls"] = data.select(data.views >= 0)
    return test_data


def _test(
    plan: dict[str, Any], test_data: dict[str, Any], device: torch.device
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(plan, its test scores): the run's chosen checkpoint on its task's test split; the wall
    time goes into ``plan``."""
    t0 = time.perf_counter()
    scored = test_run(plan["settings"], plan["run_dir"], test_data[plan["task"]], device)
    plan["test_wall_s"] = time.perf_counter() - t0
    return plan, scored


def _report_settings(
    preset: str,
    tasks: list[str] | tuple[str, ...],
    overrides: dict[str, Any],
    seed: int,
    env: DistEnv,
    precision: str,
    bootstrap_iterations: int,
    checkpoint: str,
    val: Path | None,
    bootstrap_fraction: float,
    fidelity: bool,
) -> dict[str, Any]:
    """The settings section of the report (the call's options, code version, creation time)."""
    return {
        "preset": preset, "tasks": list(tasks), "overrides": {
            k: v for k, v in overrides.items() if v is not None},
        "seed": seed, "device": str(env.device), "world_size": env.world_size,
        "precision": precision, "bootstrap_iterations": bootstrap_iterations,
        "checkpoint": checkpoint, "val": None if val is None else str(val),
        "bootstrap_fraction": bootstrap_fraction, "bootstrap_confidence": 0.95,
        "fidelity": fidelity, "code_version": code_version(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }  # fmt: skip


def _write(
    report: dict[str, Any],
    out: Path,
    test_data: dict[str, Any],
    results: list[tuple[dict[str, Any], dict[str, Any]]],
) -> None:
    """``report.json``, ``report.md`` and the plots under ``out``, and the summary on the
    terminal."""
    write_report(report, out, test_data, results)
    print_summary(report)
    console.print(
        f"report: {out / 'report.md'} (numbers: {out / 'report.json'}, plots: {out / 'plots'})",
        highlight=False,
    )


def _length_text(config: TrainConfig, length: RunLength) -> str:
    """``400 steps (80 epochs)``, or ``at most 400 steps (80 epochs), fewer when 6 validations
    in a row bring no improvement`` with early stopping."""
    text = f"{config.steps} steps ({config.steps / length.steps_per_epoch:.3g} epochs)"
    if config.patience:
        text = (
            f"at most {text}, fewer when {config.patience} validations in a row bring no "
            "improvement"
        )
    return text


def _size_notices(specs: list[TrainSpec], test_store: str, plans: list[dict]) -> list[str]:
    """One notice per store whose images the networks see resampled."""
    sizes = sorted({p["settings"].size for p in plans})
    notes = []
    seen: set[str] = set()
    stores = [s for spec in specs for s in spec.stores] + [p["settings"].val_store for p in plans]
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
