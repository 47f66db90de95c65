"""Terminal output shared by the CLI stages: rich progress on a TTY, plain lines elsewhere.

Progress (bars, or plain lines when stderr is not a terminal) goes to stderr; results and
summaries go to stdout (``console``), so ``cmd > results.txt`` keeps only the results. Both
consoles honour ``NO_COLOR`` (rich does).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

from rich.console import Console

# No console markup: the text printed holds user paths and option values, and a path such as
# ``runs/[old]`` or ``mk[/]st.zarr`` is printed as it is (rich would style it away or raise
# MarkupError after the work was done). Styling is applied with :func:`styled` instead.
console = Console(soft_wrap=True, emoji=False, markup=False)
err_console = Console(stderr=True, soft_wrap=True, emoji=False, markup=False)


def styled(text: str, style: str = "bold"):
    """``text`` as rich renderable in ``style``: never parsed as markup."""
    from rich.text import Text

    return Text(text, style=style)


# Third-party log lines that say nothing to a user of the command line: torch's C++-extension
# module (imported by torch.compile's CPU backend) warns "No CUDA runtime is found, using
# CUDA_HOME=..." on every CPU-only machine that has a CUDA toolkit installed.
QUIET_LOGGERS = ("torch.utils.cpp_extension",)


def quiet_third_party_logs() -> None:
    """Show only errors from :data:`QUIET_LOGGERS` (the CLI calls this once at start-up)."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


class Reporter:
    """``reporter(n)`` advances; ``reporter.status(text)`` shows the latest numbers (on a
    terminal in the bar, elsewhere as a plain line at most every ~10 % and at each status)."""

    def __init__(self, total: int, description: str, bar=None, task=None) -> None:
        self.total, self.description = total, description
        self.bar, self.task = bar, task
        self.done = 0
        self.step = max(1, math.ceil(total / 10))
        self.next = self.step
        self.start = time.perf_counter()

    def __call__(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.advance(self.task, n)
        elif self.done >= self.next or self.done == self.total:
            elapsed = time.perf_counter() - self.start
            print(
                f"{self.description}: {self.done}/{self.total} ({elapsed:.1f} s)",
                file=sys.stderr,
                flush=True,
            )
            self.next = self.done + self.step

    def status(self, text: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, description=f"{self.description} {text}")
        else:
            print(
                f"{self.description} {self.done}/{self.total}: {text}", file=sys.stderr, flush=True
            )


class _Silent(Reporter):
    def __call__(self, n: int = 1) -> None:
        self.done += n

    def status(self, text: str) -> None:
        pass


@contextlib.contextmanager
def progress(total: int, description: str, enabled: bool = True) -> Iterator[Reporter]:
    """Yield a :class:`Reporter`: a rich bar on a terminal, plain lines elsewhere (CI logs);
    silent when not ``enabled`` (the other ranks of a distributed run)."""
    if not enabled:
        yield _Silent(total, description)
        return
    if not err_console.is_terminal or os.environ.get("ECHO_SYNTH_PLAIN_PROGRESS"):
        yield Reporter(total, description)  # lines (also for runs side by side: one terminal)
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err_console, transient=False) as bar:
        task = bar.add_task(description, total=total)
        yield Reporter(total, description, bar, task)


def print_summary(title: str, rows: dict[str, Any]) -> None:
    """A one-screen summary table at the end of a stage."""
    from rich.table import Table

    table = Table(title=title, show_header=False)
    for key, value in rows.items():
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    console.print(table)
