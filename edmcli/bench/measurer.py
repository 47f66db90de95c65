"""Timing the calls of one target within a time budget: the budget, the running FLOP/s estimate
that predicts a call's seconds, the settings shared by a scale's targets, and the
:class:`Measurer` that times calls and records what it skipped (over the cap, out of memory, a
failed compilation)."""

from __future__ import annotations

import gc
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from edmcli.bench.timing import Timing, plan_repeats, time_call

__all__ = ["Budget", "Measurer", "Rate", "Settings", "oom_errors", "release_memory"]


@dataclass(frozen=True)
class Budget:
    """Time limits of the measurements of one configuration.

    Attributes:
        measure_s: seconds for one timing, warm-up and repeats together (None: no limit).
        optional_cap_s: optional paths (γ/β recomputed at every NFE, the MONAI peer) are not
            timed for a network whose one call is predicted to take longer (None: always).
        check_s: predicted seconds of all end-to-end checks of one model together.
        reference_s: predicted seconds of the paper reference's (SDM's) end-to-end run at a
            reduced NFE, the check of its 1000-NFE prediction (0: not run at this scale).
    """

    measure_s: float | None
    optional_cap_s: float | None
    check_s: float
    reference_s: float = 20.0


class Rate:
    """Running estimate of the FLOP/s this device achieves, to predict a call's seconds."""

    def __init__(self) -> None:
        self.flops_per_s: float | None = None

    def predict(self, flops: float) -> float | None:
        return None if self.flops_per_s is None else flops / self.flops_per_s

    def update(self, flops: float, seconds: float) -> None:
        if flops > 0 and seconds > 0:
            self.flops_per_s = flops / seconds


@dataclass
class Settings:
    """How one configuration is measured (shared by the targets of a scale)."""

    device: torch.device
    autocast: torch.dtype | None  # bf16 autocast, or None for fp32
    compile: bool
    repeats: int
    budget: Budget
    rate: Rate = field(default_factory=Rate)
    log: Callable[[str], None] = print

    def precision(self) -> str:
        return "bf16" if self.autocast is torch.bfloat16 else "fp32"

    def autocast_ctx(self, dtype: torch.dtype | None = None) -> AbstractContextManager:
        dtype = self.autocast if dtype is None else dtype
        if dtype is None or dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype)


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def oom_errors() -> tuple[type[BaseException], ...]:
    return (torch.OutOfMemoryError,) if hasattr(torch, "OutOfMemoryError") else (RuntimeError,)


class Measurer:
    """Times the calls of one target under the settings' budget, records what it skipped."""

    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.skipped: dict[str, str] = {}

    def time(self, fn: Callable[[], object], flops: float, always_warm: bool = False) -> Timing:
        s = self.s
        warm = always_warm or s.device.type == "cuda"
        warmup, repeats = plan_repeats(s.rate.predict(flops), s.repeats, s.budget.measure_s, warm)
        timing = time_call(fn, s.device, repeats, warmup)
        s.rate.update(flops, timing.median_s)
        return timing

    def time_keep(self, fn: Callable[[], Any], flops: float) -> tuple[Timing, Any]:
        """:meth:`time` of ``fn`` and the output of its last call (a γ/β cache, decoded images:
        a paper-scale CPU call is not paid twice to time it and then use it)."""
        out: list[Any] = [None]

        def call() -> None:
            out[0] = fn()

        return self.time(call, flops), out[0]

    def optional(self, name: str, flops: float) -> bool:
        """Whether an optional path of a call of ``flops`` fits the settings' cap."""
        cap = self.s.budget.optional_cap_s
        predicted = self.s.rate.predict(flops)
        if cap is None or predicted is None or predicted <= cap:
            return True
        self.skipped[name] = (
            f"not timed: one call is predicted to take {predicted:.0f} s (> {cap:.0f} s, the "
            "cap of this configuration)"
        )
        return False

    def attempt(self, name: str, fn: Callable[[], Any]) -> Any:
        """``fn()``, or None with the reason recorded when it runs out of memory or fails to
        compile (a benchmark reports that rather than stopping)."""
        try:
            return fn()
        except oom_errors() as exc:
            self.skipped[name] = f"out of memory ({str(exc).splitlines()[0][:120]})"
        except Exception as exc:  # compilation and kernel failures: report, go on
            if not name.endswith(("compiled", "triton", "torch_spade")):
                raise
            self.skipped[name] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        release_memory(self.s.device)
        return None
