"""Fault injection for crash drills and tests: ``ECHO_SYNTH_FAULT_KILL=POINT:N[:SIGNAL]``.

The process sends itself SIGNAL (default KILL; e.g. ``TERM``, ``INT``) the N-th time it passes
``POINT``: ``train-step`` (after optimiser step N, before that step's checkpoint),
``sample-shard`` (after N shards were written, before the next one) or ``prepare-sample`` (after
the N-th sample was generated). Unset, it costs one environment lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "ECHO_SYNTH_FAULT_KILL"


def maybe_kill(point: str, count: int) -> None:
    value = os.environ.get(ENV)
    if not value:
        return
    where, _, name = value.partition(":")[2].partition(":")
    if value.split(":", 1)[0] == point and where == str(count):
        os.kill(os.getpid(), getattr(signal, f"SIG{name or 'KILL'}"))
