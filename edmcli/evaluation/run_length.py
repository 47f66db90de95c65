"""How long a downstream run trains, and why it stopped.

Each run trains until its validation score stops improving (:func:`stopping_config`: the
engine's early stopping and reduce-on-plateau schedule), within a cap (:func:`run_length`: an
epoch cap, and the tiny preset's step budget); :func:`stop_reason` says which of the three
ended it (``patience``, ``cap`` or ``steps``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edmcli.errors import EchoSynthError
from edmcli.settings import training_steps


def steps_per_epoch(n_train: int, batch: int) -> int:
    """Optimiser steps per pass over ``n_train`` images (at least 1)."""
    return max(1, n_train // batch)


STOPPING_SETTINGS = (
    "lr_schedule", "lr_min_ratio", "plateau_patience", "plateau_factor", "patience",
    "min_delta", "min_steps",
)  # fmt: skip
"""Settings of the ``seg``/``cls`` preset rows that go to the engine's early stopping and
schedule (:class:`~edmcli.training.engine.TrainConfig` fields of the same names)."""


@dataclass(frozen=True)
class RunLength:
    """How long one downstream run may train."""

    steps: int  # the step limit given to the engine
    steps_per_epoch: int
    max_epochs: int | None  # the epoch cap (None: the length was given in steps or kimg)

    @property
    def cap_steps(self) -> int | None:
        """The epoch cap in steps."""
        return None if self.max_epochs is None else self.max_epochs * self.steps_per_epoch


def run_length(values: dict[str, Any], n_train: int) -> RunLength:
    """The step limit of a run on ``n_train`` images: the settings layer's rule
    (:func:`~edmcli.settings.training_steps`: ``steps``, else ``epochs`` passes, else ``kimg``),
    and when the values hold both ``steps`` and ``epochs`` (only a preset row can: a length on
    the command line replaces both), the earlier of the step budget and the epoch cap — the tiny
    preset's budget keeps the demo short on large synthetic stores, its cap keeps small real
    stores from being seen hundreds of times."""
    per_epoch = steps_per_epoch(n_train, int(values["batch"]))
    total = training_steps(values, n_train)
    epochs = values.get("epochs")
    if epochs is None:
        return RunLength(total, per_epoch, None)
    if epochs <= 0:
        raise EchoSynthError(f"epochs {epochs} must be positive")
    return RunLength(min(total, int(epochs) * per_epoch), per_epoch, int(epochs))


def stopping_config(values: dict[str, Any]) -> dict[str, Any]:
    """The early-stopping and schedule fields of the engine's ``TrainConfig`` from resolved
    values (unset ones stay None: off, or the engine's documented default)."""
    out = {key: values.get(key) for key in STOPPING_SETTINGS}
    for key in ("plateau_patience", "patience", "min_steps"):
        if out[key] is not None:
            out[key] = int(out[key])
    for key in ("lr_min_ratio", "plateau_factor", "min_delta"):
        if out[key] is not None:
            out[key] = float(out[key])
    return out


def stop_reason(engine_reason: str, steps_done: int, length: RunLength) -> str:
    """Why a run ended: ``patience`` (its validation score stopped improving), ``cap`` (it
    reached the epoch cap) or ``steps`` (it reached a step limit below the cap: ``steps``,
    ``kimg`` or the preset's step budget)."""
    if engine_reason == "patience":
        return "patience"
    cap = length.cap_steps
    return "cap" if cap is not None and steps_done >= cap else "steps"
