"""Training the planned downstream runs: one after another, or several at once on a CPU.

The runs of an evaluation are independent (each its own folder, lock, seed and resume), and on a
CPU one run does not keep every core busy: EfficientNetV2-S at 64² spends its time in small
batch-normalised layers on 2×2 to 8×8 maps, where a second thread adds little (measured on the
2-core CI-class machine, issue 23). ``jobs`` > 1 trains that many runs at once, each in its own
process with ``threads // jobs`` torch threads, the most expensive runs first; each run prints
plain progress lines named after its task and store. Results are those of a run trained alone
with that many threads (the thread count may change the last bits of a CPU run, never its
reproducibility: the same ``--jobs`` and ``--threads`` give the same numbers).

``jobs`` 1 (and every distributed or CUDA run) trains in this process, one run at a time.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, Future, ProcessPoolExecutor, wait
from typing import Any

from edmcli.errors import EchoSynthError

__all__ = ["check_jobs", "run_order", "train_runs"]

# Relative cost of one training step per task at the tiny preset on the CI-class CPU (bf16:
# EfficientNetV2-S ≈ 0.37 s, DynUNet 16–128 filters ≈ 0.1 s per batch of 16 at 64²): only the
# order of the runs depends on it.
_STEP_COST = {"cls": 4.0, "seg": 1.0}


def check_jobs(jobs: int, device: str, world_size: int) -> None:
    """Refuse a ``jobs`` that cannot run here (one line): at least 1; more than one only for a
    single process on a CPU."""
    if jobs < 1:
        raise EchoSynthError(f"--jobs {jobs} must be at least 1")
    if jobs > 1 and (world_size > 1 or not device.startswith("cpu")):
        raise EchoSynthError(
            f"--jobs {jobs} trains runs side by side on a CPU; on {device}"
            + (f" with {world_size} processes" if world_size > 1 else "")
            + " give --jobs 1"
        )


def run_order(runs: list[dict[str, Any]]) -> list[int]:
    """Indices of ``runs``, the longest expected first (steps × the task's step cost), so that
    the short ones fill the gaps at the end."""
    cost = [run["config"].steps * _STEP_COST.get(run["task"], 1.0) for run in runs]
    return sorted(range(len(runs)), key=lambda i: (-cost[i], i))


def train_runs(
    runs: list[dict[str, Any]],
    train_one: Callable[[dict[str, Any]], None],
    jobs: int,
    threads: int,
) -> None:
    """Train every run with ``train_one(run)`` (it fills in the run's results): in this
    process when ``jobs`` is 1, else in ``jobs`` worker processes of ``threads // jobs``
    threads each. A failing run stops the ones not yet started and its error is raised once
    the running ones have ended (each keeps its checkpoints; rerunning resumes)."""
    if jobs == 1 or len(runs) < 2:
        for run in runs:
            train_one(run)
        return
    per_job = max(1, threads // jobs)
    context = multiprocessing.get_context("spawn")  # no forked torch thread pools
    with ProcessPoolExecutor(
        max_workers=min(jobs, len(runs)),
        mp_context=context,
        initializer=_start_worker,
        initargs=(per_job,),
    ) as pool:
        futures: dict[Future, int] = {
            pool.submit(_train_in_worker, train_one, runs[i]): i for i in run_order(runs)
        }
        pending = set(futures)
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for future in done:
                    error = future.exception()
                    if error is not None:
                        raise error  # the handler below cancels the runs not started
                    runs[futures[future]].update(future.result())
        except BaseException:
            for other in pending:
                other.cancel()
            raise


def _start_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    os.environ["ECHO_SYNTH_PLAIN_PROGRESS"] = "1"  # lines, not live bars, side by side


def _train_in_worker(
    train_one: Callable[[dict[str, Any]], None], run: dict[str, Any]
) -> dict[str, Any]:
    planned = set(run)
    train_one(run)
    return {key: run[key] for key in run.keys() - planned}  # what the training filled in
