"""CPU threads: how many torch may use, and a warning when the cores are oversubscribed.

Two torch processes that each use every core slow each other 10–100× (measured on the 2-core
CI machine: thread contention, not a fair share). Every command takes ``--threads N``
(default: the cores this process may run on, :func:`available_cores`) and warns in one line
when its threads plus the load already on the machine exceed the cores.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from edmcli.errors import EchoSynthError

__all__ = ["ThreadPlan", "available_cores", "configure_threads", "oversubscription_warning"]


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, where the OS has one), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _machine_load() -> float | None:
    """The 1-minute load average (runnable processes), None where the OS has none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


@dataclass(frozen=True)
class ThreadPlan:
    """What :func:`configure_threads` set: ``threads`` of ``cores``, and any warning."""

    threads: int
    cores: int
    warning: str | None


def oversubscription_warning(threads: int, cores: int, load: float | None) -> str | None:
    """A one-line warning when ``threads`` plus the ``load`` already running exceed ``cores``.

    ``load`` is the machine's load average before this command starts its work (other
    processes); a load under half a core is noise and is ignored."""
    if threads > cores:
        return (
            f"{threads} threads on {cores} cores: threads compete for cores and steps slow "
            f"down; use --threads {cores} or fewer"
        )
    if load is not None and load >= 0.5 and threads + load > cores + 0.5:
        fair = max(1, int(cores - load + 0.5))
        return (
            f"the machine already runs a load of {load:.1f} on {cores} cores and this command "
            f"uses {threads} threads: two torch jobs on the same cores slow each other 10-100x; "
            f"run one at a time or use --threads {fair}"
        )
    return None


MAX_THREADS = 1024  # more than any machine's cores; torch.set_num_threads overflows past 2**63


def configure_threads(threads: int | None = None, *, load: float | None = None) -> ThreadPlan:
    """Set torch's intra-op threads to ``threads`` (default: :func:`available_cores`).

    With the default, the warning also weighs the load other processes put on the machine;
    a number given on purpose is only checked against the cores.

    Args:
        threads: threads for torch's CPU kernels; at least 1; None: every available core.
        load: the machine's load average to judge oversubscription (default: read it now).

    Raises:
        EchoSynthError: ``threads`` < 1.
    """
    import torch

    cores = available_cores()
    chosen = threads is not None
    threads = cores if threads is None else threads
    if not 1 <= threads <= MAX_THREADS:
        raise EchoSynthError(f"--threads {threads} must be from 1 to {MAX_THREADS}")
    torch.set_num_threads(threads)
    if chosen:
        load = None
    elif load is None:
        load = _machine_load()
    return ThreadPlan(threads, cores, oversubscription_warning(threads, cores, load))
