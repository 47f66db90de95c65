"""The flow every training stage shares: join the process group, lock the run folder, build the
task, create or check the run folder, freeze the checkpoints of other runs it builds on, record
the training patients, train with the engine, then summarise on the main rank.

The run's lock (``RUN/.lock``, taken by rank 0 for the whole flow) refuses a second writer at
once, so two commands never train one run together. The task is built before ``config.yaml`` is
written (a missing weights file fails first), and a run whose first attempt failed before its
first checkpoint takes the corrected command's settings (:func:`prepare_run_dir`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from edmcli.console import console, print_summary
from edmcli.runs.distributed import (
    DistEnv,
    broadcast_flag,
    init_distributed,
    shutdown_distributed,
)
from edmcli.runs.folder import (
    Dependency,
    freeze_dependency,
    prepare_run_dir,
    record_training_patients,
)
from edmcli.runs.lock import run_lock
from edmcli.training.engine import TrainConfig, Trainer, TrainingTask


def train_config_dict(config: TrainConfig) -> dict[str, Any]:
    """A :class:`TrainConfig` as run-config keys (``seed`` → ``train_seed``)."""
    return {f"train_{k}" if k == "seed" else k: v for k, v in asdict(config).items()}


def train_run(
    *,
    run: Path,
    device: str,
    resolved: dict[str, Any],
    data: str,
    train_config: TrainConfig,
    make_task: Callable[[DistEnv], TrainingTask],
    describe: str,
    report: Callable[[Path, DistEnv], dict[str, Any]],
    title: str,
    head: dict[str, Any] | None = None,
    depends_on: Sequence[Dependency] = (),
) -> dict[str, Any] | None:
    """Train ``make_task(env)`` in ``run`` (resuming it when it exists); returns the summary
    written to ``run/summary.json`` on the main rank, None on the others. ``depends_on``: the
    checkpoints of other runs that this run is built on; each gets a frozen copy in the run
    (:func:`freeze_dependency`) before training starts."""
    env = init_distributed(device)
    try:
        train_config.validate(env.world_size)
        with run_lock(run, enabled=env.is_main, agree=lambda refused: broadcast_flag(refused, env)):
            task = make_task(env)
            resumed = prepare_run_dir(run, resolved, env.is_main)
            if env.is_main:
                for dependency in depends_on:
                    freeze_dependency(run, dependency)
                record_training_patients(run, data)
                console.print(
                    f"{'resuming' if resumed else 'training'} {describe} in {run} on "
                    f"{env.device} × {env.world_size}: {train_config.steps} steps of batch "
                    f"{train_config.batch}",
                    highlight=False,
                )
            result = Trainer(task, train_config, run, env).fit()
            if not env.is_main:
                return None
            summary = {
                **(head or {}),
                "steps": result.steps,
                "resumed from step": result.resumed_from,
                "train images/s": result.images_per_second,
                **{f"final {k}": v for k, v in result.last_metrics.items()},
                **report(run, env),
                "checkpoint": str(result.checkpoint),
            }
            (run / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
            print_summary(f"{title}: {run}", summary)
            return summary
    finally:
        shutdown_distributed()
