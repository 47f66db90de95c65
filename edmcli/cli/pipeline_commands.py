"""The pipeline commands, which run every stage in turn: ``demo`` (the main path on phantom
data) and ``study`` (the paper's study from one YAML file)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .errors import user_errors
from .options import DeviceOpt, SeedOpt, stage_options


@user_errors
def demo(
    out: Annotated[Path, typer.Option(help="Folder for everything the demo writes.")] = Path(
        "demo"
    ),
    n_patients: Annotated[
        int, typer.Option(help="Phantom patients (split 5:1:4 into train, validation, test).")
    ] = 50,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    class_cond: Annotated[
        str,
        typer.Option(
            help="The generator's conditioning besides the label map: view (default; lifts the "
            "synthetic-trained view accuracy), view-phase, or none (the paper's map-only model)."
        ),
    ] = "view",
    generator: Annotated[
        str,
        typer.Option(
            help="The generator's recipe: faithful (default: the label maps sampled as they "
            "are, a Γ-VAE with the power-spectrum term; measured best on the phantom) or paper "
            "(the paper's settings)."
        ),
    ] = "faithful",
) -> None:
    """The main path on built-in phantom data with tiny settings (CPU minutes): prepare 64²
    phantom echoes, train a Γ-VAE L64 and a view-conditioned EDM-L64, sample a synthetic store,
    and evaluate it against real-trained segmentation and view classification. Rerunning resumes
    every step."""
    options = stage_options(locals())
    from edmcli.demo import run_demo

    run_demo(**options)


@user_errors
def study(
    config: Annotated[
        Path, typer.Argument(help="Study YAML (examples/study-phantom.yaml, study-paper.yaml).")
    ],
    only: Annotated[
        list[str] | None,
        typer.Option(
            "--only",
            help="Run only these stages (repeat): prepare, train-vae, "
            "train-diffusion, sample, evaluate, bench.",
        ),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Plan every stage (its checks and resolved settings), print the plans, write "
            "nothing.",
        ),
    ] = False,
) -> None:
    """The paper's study from one YAML file: prepare, the Γ-VAEs, every diffusion model,
    sampling at each NFE, quality metrics and evaluation of every store (Fig. 3), bench
    (Fig. 4). The whole file, every stage's settings included, is checked before any stage
    runs. Each finished stage is recorded in OUT/study.json and skipped on a rerun."""
    from edmcli.study import run_study

    run_study(config, only=only, dry_run=dry_run)
