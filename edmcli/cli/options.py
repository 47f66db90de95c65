"""Options that several commands share (their types, help and defaults) and the one path from
parsed options to a stage function's keyword arguments."""

from __future__ import annotations

import enum
import math
from typing import Annotated, Any

import typer

from edmcli.errors import EchoSynthError

# Options shared by the training commands (the engine's settings); None: the preset decides.
BatchOpt = Annotated[int | None, typer.Option(help="Global batch size.")]
BatchGpuOpt = Annotated[
    int | None, typer.Option(help="Per-process micro-batch (gradient accumulation).")
]
LrOpt = Annotated[float | None, typer.Option(help="AdamW learning rate.")]
EmaOpt = Annotated[float | None, typer.Option(help="EMA decay per step.")]
CheckpointEveryOpt = Annotated[int | None, typer.Option(help="Steps between checkpoints.")]
LogEveryOpt = Annotated[int | None, typer.Option(help="Steps between log lines.")]
GridEveryOpt = Annotated[int | None, typer.Option(help="Steps between image grids.")]
ValidateEveryOpt = Annotated[int | None, typer.Option(help="Steps between denoising checks.")]
WorkersOpt = Annotated[int | None, typer.Option(help="DataLoader workers.")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
SeedOpt = Annotated[int, typer.Option(help="Seed.")]


ThreadsOpt = Annotated[
    int | None,
    typer.Option(
        envvar="ECHO_SYNTH_THREADS",
        help="CPU threads for torch (default: every core this process may use; one line warns "
        "when other processes already load them).",
    ),
]


class Precision(str, enum.Enum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


PrecisionOpt = Annotated[
    Precision, typer.Option(help="auto: bf16 on CUDA, fp32 on CPU (where bf16 samples no faster).")
]
TrainPrecisionOpt = Annotated[
    Precision,
    typer.Option(
        help="auto: bf16 autocast on CUDA; on a CPU fp32, except evaluate's networks on CPUs "
        "with native bf16 (AVX512-BF16, AMX); fp32: the exact path; bf16: on CPU too."
    ),
]
RunOption = typer.Option(
    "--run",
    "--run-dir",
    help="Run folder (default runs/<model>).",
)


def check_finite(values: dict[str, Any]) -> None:
    """Refuse, in one place for every command, a float option (or a float in a list option)
    that is NaN or infinite: ``sample --churn nan`` wrote all-black images into a complete
    store, ``--sigma-data nan`` surfaced as a NaN loss blaming the learning rate."""
    for name, value in values.items():
        for item in value if isinstance(value, list | tuple) else (value,):
            if isinstance(item, float) and not math.isfinite(item):
                raise EchoSynthError(f"--{name.replace('_', '-')} {item} must be a finite number")


MAX_SEED = 2**63 - 1  # numpy's SeedSequence takes any non-negative int, torch's seed 64 bits


def check_seed(values: dict[str, Any]) -> None:
    """Refuse a ``--seed`` that the random number generators cannot take (negative, or past
    :data:`MAX_SEED`): ``prepare --seed -1`` raised numpy's ValueError as a traceback."""
    seed = values.get("seed")
    if isinstance(seed, int) and not 0 <= seed <= MAX_SEED:
        raise EchoSynthError(f"--seed {seed} must be an integer from 0 to 2**63 - 1")


def stage_options(values: dict[str, Any], *drop: str) -> dict[str, Any]:
    """A command's parsed options as the stage function's keyword arguments: the one path from
    flags (and ``--config`` YAML, which arrives as the options' defaults) to settings. Enums
    become their values; ``config`` and ``drop`` are left out."""
    check_finite(values)
    check_seed(values)
    skip = {"config", *drop}
    return {
        k: v.value if isinstance(v, enum.Enum) else v for k, v in values.items() if k not in skip
    }
