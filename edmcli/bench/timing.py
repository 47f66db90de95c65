"""Wall-clock timing of one call: device synchronisation, warm-up apart, repeats, median/spread.

Every timed call is bracketed by a device synchronisation (CUDA kernels run asynchronously), the
warm-up calls (first-call allocation, cuDNN autotuning, ``torch.compile``) are timed and reported
separately from the steady state, and the steady state is the median of the repeats with its
spread. On CUDA the peak memory allocated by torch during the call is recorded as well.

How many repeats fit a time budget is planned from a prediction of one call
(:func:`plan_repeats`): a paper-scale network on a CPU takes tens of seconds per call, so there the
first call is the only sample, and the report says so.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Timing", "plan_repeats", "summarise", "sync", "time_call"]


def sync(device: torch.device) -> None:
    """Wait for every queued kernel of ``device`` (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summarise(samples: Sequence[float]) -> dict[str, float]:
    """Median, min, max and relative spread ``(max − min) / median`` of timing samples (s)."""
    if not samples:
        raise ValueError("summarise needs at least one timing sample.")
    median = statistics.median(samples)
    lo, hi = min(samples), max(samples)
    return {
        "median_s": median,
        "min_s": lo,
        "max_s": hi,
        "spread": (hi - lo) / median if median > 0 else 0.0,
    }


@dataclass(frozen=True)
class Timing:
    """Seconds of the timed repeats and of the warm-up calls, and the peak memory (CUDA).

    Attributes:
        samples_s: steady-state seconds, one per repeat.
        warmup_s: seconds of each warm-up call (first-call and compilation costs live here).
        peak_bytes: peak memory allocated by torch over warm-up and repeats; None on the CPU.
    """

    samples_s: tuple[float, ...]
    warmup_s: tuple[float, ...] = ()
    peak_bytes: int | None = None

    @property
    def median_s(self) -> float:
        return statistics.median(self.samples_s)

    def to_dict(self) -> dict[str, Any]:
        """JSON form: the summary, every sample, the warm-up calls and the peak memory."""
        return {
            **summarise(self.samples_s),
            "repeats": len(self.samples_s),
            "samples_s": list(self.samples_s),
            "warmup_s": list(self.warmup_s),
            "peak_bytes": self.peak_bytes,
        }


def time_call(
    fn: Callable[[], object], device: torch.device, repeats: int = 3, warmup: int = 1
) -> Timing:
    """Time ``fn()``: ``warmup`` calls timed apart, then ``repeats`` timed calls, each between two
    synchronisations of ``device``."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"time_call needs repeats >= 1 and warmup >= 0, got {repeats}, {warmup}.")
    cuda = device.type == "cuda"
    if cuda:
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)

    def once() -> float:
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        return time.perf_counter() - start

    warm = tuple(once() for _ in range(warmup))
    samples = tuple(once() for _ in range(repeats))
    peak = int(torch.cuda.max_memory_allocated(device)) if cuda else None
    return Timing(samples, warm, peak)


def plan_repeats(
    predicted_s: float | None,
    repeats: int,
    budget_s: float | None,
    always_warm: bool = False,
) -> tuple[int, int]:
    """``(warmup, repeats)`` for a call predicted to take ``predicted_s`` seconds within a budget
    of ``budget_s`` seconds for the whole measurement.

    Without a prediction or a budget: one warm-up and ``repeats``. Otherwise the repeats are cut
    to what fits (at least one), and the separate warm-up is dropped when one call takes more than
    a quarter of the budget (a call of tens of seconds on a CPU: its first-call costs are a small
    part of it) unless ``always_warm`` (CUDA, compilation: the first call is not representative).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}.")
    if predicted_s is None or budget_s is None or predicted_s <= 0:
        return 1, repeats
    warmup = 1 if always_warm or predicted_s <= budget_s / 4 else 0
    fit = int((budget_s - warmup * predicted_s) // predicted_s)
    return warmup, max(1, min(repeats, fit))
