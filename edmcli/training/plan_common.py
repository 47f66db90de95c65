"""What the plans of the training stages share: where the run goes, on which device, and the
engine's own refusals (``TrainConfig.validate``), all checked before any work.

A plan resolves the device and the number of processes as :func:`train_run` will
(:func:`~edmcli.runs.distributed.process_layout`, :func:`~edmcli.runs.distributed.resolve_device`)
and validates the training configuration for them, so that a bad ``--device`` or batch is refused
by the plan, in the order the stage always refused them (after the settings and the store).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edmcli.runs.checkpoint import latest_checkpoint
from edmcli.runs.distributed import process_layout, resolve_device
from edmcli.training.engine import TrainConfig


@dataclass(frozen=True)
class Placement:
    """Where a training runs: its device (as asked, and what it resolves to in this process),
    its number of processes, and the checkpoint an existing run would resume from."""

    device: str  # as asked: auto, cpu, cuda, cuda:N
    device_name: str  # what it resolves to here
    world_size: int
    resumes_from: Path | None  # the run's newest checkpoint (None: a new run)

    def line(self, run: Path) -> str:
        state = f"resumes from {self.resumes_from.name}" if self.resumes_from else "a new run"
        return f"run {run} ({state}) on {self.device_name} × {self.world_size}"


def place(run: Path, device: str, train_config: TrainConfig) -> Placement:
    """Resolve the device and the processes; refuse a configuration the engine would refuse."""
    world_size, _, local_rank = process_layout()
    resolved = resolve_device(device, local_rank)
    train_config.validate(world_size)
    return Placement(device, str(resolved), world_size, latest_checkpoint(run))


def length_line(train_config: TrainConfig, n_train: int) -> str:
    """``N steps of batch B (≈ E epochs of the T training images)``."""
    epochs = train_config.steps * train_config.batch / max(n_train, 1)
    return (
        f"{train_config.steps} steps of batch {train_config.batch} (≈ {epochs:.3g} epochs of "
        f"{n_train} training images), precision {train_config.precision}, seed "
        f"{train_config.seed}"
    )
