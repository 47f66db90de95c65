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
* Validation check: the split that chooses a run's checkpoint must hold none of the patients
  whose images or label maps the run trains on (a store sampled from the val maps, ``sample
  --splits train,val``, is refused with the real val split;
  :func:`~edmcli.evaluation.train_specs.check_validation_unseen`).
* Image sizes: stores whose images differ from the networks' input size (``--size``, preset
  ``paper`` 256, ``tiny`` 64) are resampled with a notice; test predictions are resampled back
  and scored at the test store's resolution (HD in its pixels, and in mm from its spacing).
* ``--fidelity``: each synthetic spec is also judged in seconds by the real-trained reference
  networks (label fidelity, classifier accuracy on synthetic images, FD / KID / PRDC in their
  feature spaces, diversity: :mod:`edmcli.evaluation.fidelity`), and with ≥ 3 synthetic specs
  each metric's rank correlation with the downstream mean Dice and accuracy is reported.

:func:`evaluate` is :func:`run_evaluate` of :func:`~edmcli.evaluation.evaluate_plan.plan_evaluate`:
the plan makes every check and settles every run's settings without writing anything; the run
trains, tests and reports.
"""

from __future__ import annotations

import datetime as _dt
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch

from edmcli.console import console
from edmcli.data.store_format import code_version
from edmcli.evaluation.correlation import correlation_table
from edmcli.evaluation.downstream import load_split, make_task, test_run
from edmcli.evaluation.evaluate_plan import EvaluationPlan, plan_evaluate
from edmcli.evaluation.fidelity import METRICS, quality_section
from edmcli.evaluation.report import write_report
from edmcli.evaluation.report.data import build_report
from edmcli.evaluation.report.markdown import print_summary
from edmcli.evaluation.run_length import RunLength, stop_reason
from edmcli.evaluation.run_pool import train_runs
from edmcli.runs.distributed import (
    DistEnv,
    broadcast_flag,
    init_distributed,
    shutdown_distributed,
)
from edmcli.runs.folder import prepare_run_dir
from edmcli.runs.lock import run_lock
from edmcli.runs.output_folder import mark_output_folder
from edmcli.training.engine import TrainConfig, Trainer, autocast_dtype
from edmcli.training.run import train_config_dict

__all__ = [
    "evaluate",
    "run_evaluate",
]


# --------------------------------------------------------------------------- the stage
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
    jobs: int = 1,
    probes: list[Path] | tuple[Path, ...] = (),
) -> dict[str, Any] | None:
    """Train, test and report (the body of ``echo-synth evaluate``): ``overrides`` are settings of
    :data:`edmcli.settings.PRESETS` ``["seg"]``/``["cls"]`` (None: the preset decides). Returns
    the report on the main process (None on the other ranks of a ``torchrun`` launch).

    ``fidelity``: also judge each synthetic ``--train`` spec with the real-trained reference
    networks, without training (:mod:`edmcli.evaluation.fidelity`): a ``quality`` section in the
    report, and with ≥ 3 synthetic specs the rank correlation of each metric with the
    downstream numbers. It needs a real ``--train`` store (the reference runs).

    ``jobs``: runs trained at once on a CPU (:mod:`edmcli.evaluation.run_pool`).

    ``probes``: synthetic stores that ``fidelity`` judges label fidelity and classifier accuracy
    on, never trained on, each sampled by the generator of one synthetic ``--train`` store with
    its settings from label maps the reference networks never saw
    (:func:`~edmcli.evaluation.train_specs.match_probes`)."""
    return run_evaluate(plan_evaluate(
        train, test, out, preset=preset, tasks=tasks, overrides=overrides, device=device,
        seed=seed, precision=precision, bootstrap_iterations=bootstrap_iterations,
        bootstrap_fraction=bootstrap_fraction, checkpoint=checkpoint, val=val, fidelity=fidelity,
        jobs=jobs, probes=probes,
    ))  # fmt: skip


def run_evaluate(plan: EvaluationPlan) -> dict[str, Any] | None:
    """Train, test and report ``plan`` (:func:`~edmcli.evaluation.evaluate_plan.plan_evaluate`):
    each planned run trained (or resumed) under its lock, tested on the test split, then the
    report written under ``plan.out``. Returns the report on the main process (None on the other
    ranks of a ``torchrun`` launch)."""
    out, overrides = plan.out, dict(plan.overrides)
    env = init_distributed(plan.device)
    try:
        runs = [run.record() for run in plan.runs]
        notes = list(plan.notes)
        if env.is_main:
            mark_output_folder(out, "evaluation")
            for note in notes:
                console.print(f"note: {note}", highlight=False)
        started = time.perf_counter()
        train_runs(runs, partial(_train, preset=plan.preset, env=env), plan.jobs,
                   torch.get_num_threads())  # fmt: skip
        if not env.is_main:
            return None
        test_data = _load_test_data(plan.test_store, plan.tasks)
        results = [_test(run, test_data, env.device) for run in runs]
        quality = (
            quality_section(
                runs,
                test_data,
                env.device,
                plan.seed,
                probes=dict(plan.probes),
                grid_dir=Path(out) / "plots",
            )  # fmt: skip
            if plan.fidelity
            else None
        )
        report = build_report(
            results,
            test_store=plan.test_store,
            test_data=test_data,
            settings=_report_settings(
                plan.preset, plan.tasks, overrides, plan.seed, env, plan.precision,
                plan.bootstrap_iterations, plan.checkpoint, plan.val, plan.bootstrap_fraction,
                plan.fidelity, plan.jobs, dict(plan.probes),
            ),
            notes=notes,
            wall_s=time.perf_counter() - started,
        )  # fmt: skip
        if quality is not None:
            quality["correlation"] = correlation_table(
                quality, report, plan.bootstrap_iterations, plan.seed
            )
            report["quality"] = quality
        _write(report, Path(out), test_data, results)
        if quality is not None:
            write_cards(quality, Path(out) / "report.md")
        return report
    finally:
        shutdown_distributed()


def write_cards(quality: dict[str, Any], report: Path) -> None:
    """Rewrite the card (``DATASET.md``) of every judged synthetic store with its quality
    summary and memorisation check; a store that cannot be written to keeps its card (a note)."""
    from edmcli.data.card import write_card

    for entry in quality["stores"]:
        summary = {METRICS[key][0] if key in METRICS else key: value
                   for key, value in entry["summary"].items()}  # fmt: skip
        verdicts = {"quality": {"report": str(report), "label": entry["label"],
                                "summary": summary}}  # fmt: skip
        if entry.get("memorisation"):
            verdicts["memorisation"] = entry["memorisation"]
        for store in entry["stores"]:
            try:
                write_card(Path(store), **verdicts)
            except OSError as err:
                console.print(f"note: the card of {store} was not updated ({err})",
                              highlight=False)  # fmt: skip


def _train(run: dict[str, Any], preset: str, env: DistEnv) -> None:
    """Train (or resume) one planned run (:meth:`PlannedRun.record`) under its lock; its steps,
    epochs, stop reason and wall time go into ``run``."""
    settings, config, run_dir = run["settings"], run["config"], run["run_dir"]
    resolved = {"kind": f"downstream-{settings.task}", "preset": preset,
                **settings.as_dict(), **train_config_dict(config)}  # fmt: skip
    agree = lambda refused: broadcast_flag(refused, env)  # noqa: E731
    with run_lock(run_dir, enabled=env.is_main, agree=agree):  # one writer per run
        resumed = prepare_run_dir(run_dir, resolved, env.is_main)
        if env.is_main:
            console.print(
                f"{'resuming' if resumed else 'training'} {settings.task} on "
                f"{run['spec'].label} ({run['n_train']} images, {run['spec'].kind}) in "
                f"{run_dir}: batch {config.batch} on {env.device}, "
                f"{_length_text(config, run['length'])}; "
                f"tested: {run['checkpoint_chosen_by']}",
                highlight=False,
            )
        t0 = time.perf_counter()
        task = make_task(settings)
        task.description = f"{settings.task} on {run['spec'].label}"
        result = Trainer(task, config, run_dir, env).fit()
        run["train_wall_s"] = time.perf_counter() - t0
        run["steps_done"] = result.steps
        run["resumed_from"] = result.resumed_from
        run["epochs_done"] = result.epochs
        run["stop_reason"] = stop_reason(result.stop_reason, result.steps, run["length"])
        if env.is_main:
            console.print(
                f"{settings.task} on {run['spec'].label}: {result.steps} steps "
                f"({result.epochs:.1f} epochs), stopped by {run['stop_reason']}",
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
    run: dict[str, Any], test_data: dict[str, Any], device: torch.device
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(run, its test scores): the run's chosen checkpoint on its task's test split; the wall
    time goes into ``run``."""
    t0 = time.perf_counter()
    scored = test_run(run["settings"], run["run_dir"], test_data[run["task"]], device)
    run["test_wall_s"] = time.perf_counter() - t0
    return run, scored


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
    jobs: int,
    probes: dict[str, str],
) -> dict[str, Any]:
    """The settings section of the report (the call's options, what ``precision`` became on this
    device, threads, code version, creation time)."""
    amp = autocast_dtype(precision, env.device, cpu_auto_bf16=True)  # the downstream tasks
    return {
        "preset": preset, "tasks": list(tasks), "overrides": {
            k: v for k, v in overrides.items() if v is not None},
        "seed": seed, "device": str(env.device), "world_size": env.world_size,
        "precision": precision, "bootstrap_iterations": bootstrap_iterations,
        "checkpoint": checkpoint, "val": None if val is None else str(val),
        "bootstrap_fraction": bootstrap_fraction, "bootstrap_confidence": 0.95,
        "fidelity": fidelity, "training_dtype": "fp32" if amp is None else str(amp)[6:],
        "probes": probes, "jobs": jobs, "threads": torch.get_num_threads(),
        "code_version": code_version(),
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
