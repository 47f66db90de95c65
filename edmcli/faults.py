"""Fault injection for crash drills and tests: ``ECHO_SYNTH_FAULT_KILL=POINT:N``.

The process SIGKILLs itself the N-th time it passes ``POINT``: ``train-step`` (after optimiser
step N, before that step's checkpoint) or ``sample-shard`` (after N shards were written, before
the next one). Unset, it costs one environment lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "ECHO_SYNTH_FAULT_KILL"


def maybe_kill(point: str, count: int) -> None:
    value = os.environ.get(ENV)
    if value and value == f"{point}:{count}":
        os.kill(os.getpid(), signal.SIGKILL)
