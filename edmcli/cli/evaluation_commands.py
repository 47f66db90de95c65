"""The ``evaluate`` command: downstream segmentation and view classification trained on each
store and scored on real held-out images."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated

import typer

from edmcli.config import ConfigOption

from .errors import user_errors
from .options import BatchOpt, DeviceOpt, Precision, TrainPrecisionOpt, WorkersOpt, stage_options


class LrScheduleChoice(str, enum.Enum):
    constant = "constant"
    cosine = "cosine"
    plateau = "plateau"


class TaskChoice(str, enum.Enum):
    seg = "seg"
    cls = "cls"
    both = "both"


class PresetChoice(str, enum.Enum):
    paper = "paper"
    tiny = "tiny"


class CheckpointChoice(str, enum.Enum):
    real = "real"
    synthetic = "synthetic"
    last = "last"


@user_errors
def evaluate(
    train: Annotated[
        list[str],
        typer.Option(
            "--train",
            help="Dataset store whose train split trains one run; repeat for several runs "
            "(one per synthetic dataset, and the real store for the reference line); "
            "'a.zarr,b.zarr' trains one run on the union.",
        ),
    ],
    test: Annotated[
        Path, typer.Option("--test", help="Real dataset store; its test split is scored.")
    ],
    out: Annotated[
        Path, typer.Option("--out", help="Folder for the runs, report.json/.md and plots.")
    ] = Path("evaluation"),
    preset: Annotated[
        PresetChoice,
        typer.Option(
            help="paper (256², to convergence, at most 250 epochs) or tiny (CPU minutes, 64²)."
        ),
    ] = PresetChoice.paper,
    task: Annotated[
        TaskChoice, typer.Option(help="seg (DynUNet), cls (EfficientNetV2-S A2C/A4C) or both.")
    ] = TaskChoice.both,
    size: Annotated[int | None, typer.Option(help="Network input side (resamples).")] = None,
    steps: Annotated[int | None, typer.Option(help="Optimiser steps per run.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs per run (if no --steps).")] = None,
    batch: BatchOpt = None,
    lr: Annotated[float | None, typer.Option(help="Adam(W) learning rate.")] = None,
    ema_decay: Annotated[float | None, typer.Option(help="EMA decay (0: none).")] = None,
    validate_every: Annotated[
        int | None, typer.Option(help="Steps between validations (best checkpoint).")
    ] = None,
    patience: Annotated[
        int | None,
        typer.Option(help="Stop a run after this many validations in a row without improvement."),
    ] = None,
    min_delta: Annotated[
        float | None, typer.Option(help="Smallest validation gain that counts as improvement.")
    ] = None,
    min_steps: Annotated[
        int | None, typer.Option(help="Steps before validations count towards --patience.")
    ] = None,
    lr_schedule: Annotated[
        LrScheduleChoice | None,
        typer.Option(help="After the warm-up: constant, cosine, or plateau (cut on a plateau)."),
    ] = None,
    deep_supervision: Annotated[
        bool | None, typer.Option(help="DynUNet deep-supervision heads.")
    ] = None,
    augment: Annotated[
        bool | None, typer.Option(help="Geometric + intensity augmentation.")
    ] = None,
    num_workers: WorkersOpt = None,
    checkpoint: Annotated[
        CheckpointChoice,
        typer.Option(
            help="Which checkpoint of each run is tested: real (best on real validation images: "
            "--val, else a real --train store's val split, else the test store's), synthetic "
            "(best on the run's own val split: sample --holdout), or last."
        ),
    ] = CheckpointChoice.real,
    val: Annotated[
        Path | None,
        typer.Option(help="Real store whose val split picks the checkpoints (--checkpoint real)."),
    ] = None,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap iterations.")] = 1000,
    bootstrap_fraction: Annotated[
        float, typer.Option(help="Fraction of the test set per bootstrap subset.")
    ] = 0.8,
    precision: TrainPrecisionOpt = Precision.auto,
    device: DeviceOpt = "auto",
    seed: Annotated[int, typer.Option(help="Seed of training and of the bootstrap.")] = 0,
    fidelity: Annotated[
        bool,
        typer.Option(
            help="Also judge each synthetic store in seconds with the real-trained networks "
            "(label fidelity, accuracy on synthetic, FD/KID/PRDC, diversity) and, with 3 or "
            "more, rank each metric against the downstream Dice and accuracy.",
        ),
    ] = False,
    probe: Annotated[
        list[Path] | None,
        typer.Option(
            help="With --fidelity: a synthetic store sampled by a --train store's generator "
            "with its settings from label maps the reference networks never saw (sample "
            "--labels TEST_STORE --splits test --k 1), on which label fidelity and classifier "
            "accuracy are judged; never trained on. Repeat per generator.",
        ),
    ] = None,
    jobs: Annotated[
        int,
        typer.Option(
            help="Runs trained at once on a CPU, each with threads/jobs threads (a run rarely "
            "keeps every core busy); 1: one after another.",
        ),
    ] = 1,
    config: ConfigOption = None,
) -> None:
    """Train a segmenter and a view classifier on each --train store and score them on the
    held-out real --test split; write report.json, report.md and plots. Rerun to resume."""
    options = stage_options(locals(), "train", "test", "out", "preset", "task", "bootstrap",
                            "bootstrap_fraction", "precision", "device", "seed", "checkpoint",
                            "val", "fidelity", "probe", "jobs")  # fmt: skip
    from edmcli.evaluation.evaluate import evaluate as stage

    stage(
        train, test, out, preset.value, ["seg", "cls"] if task is TaskChoice.both else [task.value],
        options, device=device, seed=seed, precision=precision.value,
        bootstrap_iterations=bootstrap, bootstrap_fraction=bootstrap_fraction,
        checkpoint=checkpoint.value, val=val, fidelity=fidelity, jobs=jobs, probes=probe or (),
    )  # fmt: skip


@user_errors
def memorisation(
    store: Annotated[Path, typer.Argument(help="Synthetic store written by sample.")],
    reference: Annotated[
        Path | None,
        typer.Option(
            help="Real store whose --split images (patients the generator never saw) calibrate "
            "the check (default: the store the generator's diffusion run trained on)."
        ),
    ] = None,
    split: Annotated[str, typer.Option(help="Split of --reference that calibrates.")] = "test",
    probe: Annotated[
        Path | None,
        typer.Option(
            help="The same generator's store of new patients' maps (sample --labels TEST_STORE "
            "--splits test --k 1): adds the map-matched check, each image against the real "
            "image of its own source map, calibrated by the probe's images."
        ),
    ] = None,
    max_images: Annotated[
        int | None, typer.Option(help="At most this many synthetic images (whole source groups).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the --max-images selection.")] = 0,
) -> None:
    """Does a synthetic store copy its generator's training patients? The fraction of its
    images closer to a training image than the 1st / 5th percentile of real images of new
    patients (pixel space; evaluate --fidelity adds the networks' feature spaces). Writes
    STEM-memorisation.json and a grid of the closest pairs next to the store."""
    from edmcli.console import print_summary
    from edmcli.evaluation.memorisation import check_store, flagged_row

    entry = check_store(store, reference, split, max_images, seed, probe)
    rows = {f"flagged {k}": f"{v:.1%}" if v is not None else "–"
            for k, v in flagged_row(entry).items()}  # fmt: skip
    if probe is not None:
        rows.update({f"source image: flagged {k}": f"{v:.1%}" if v is not None else "–"
                     for k, v in flagged_row(entry, "source_image").items()})  # fmt: skip
    pixel = entry["spaces"]["pixel"]
    print_summary(f"memorisation of {store}", {
        "synthetic images": entry["images"],
        "training images": f"{entry['training']['images']} ({entry['training']['patients']} "
        "patients)",
        "reference images": f"{entry['reference']['images']} ({entry['reference']['patients']} "
        "new patients)",
        **rows,
        "nearest is own source patient": f"{pixel['nearest_is_own_source_patient']:.1%}",
        "closest pairs": entry["grid"],
        "report": entry["json"],
    })  # fmt: skip
