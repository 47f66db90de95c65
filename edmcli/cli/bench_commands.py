"""The ``bench`` command: the generation cost of the models (FLOPs, throughput against NFE)."""

from __future__ import annotations

import enum
import json
from pathlib import Path
from typing import Annotated

import typer

from edmcli.config import ConfigOption
from edmcli.console import console, err_console

from .errors import user_errors
from .options import DeviceOpt, stage_options


class BenchPreset(str, enum.Enum):
    auto = "auto"
    tiny = "tiny"
    paper = "paper"


class BenchDtype(str, enum.Enum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"


@user_errors
def bench(
    models: Annotated[
        list[str] | None,
        typer.Option("--models", help="Models to measure: repeat or a comma list (default: all)."),
    ] = None,
    preset: Annotated[
        BenchPreset,
        typer.Option(
            help="auto: paper on CUDA; on a CPU the ratio table at the paper configs (batch 1, "
            "one NFE of each path) and the NFE sweep at the tiny ones. tiny or paper: that one."
        ),
    ] = BenchPreset.auto,
    run: Annotated[
        list[Path] | None,
        typer.Option("--run", help="A trained diffusion run to measure instead (repeat)."),
    ] = None,
    nfe: Annotated[
        list[str] | None,
        typer.Option(
            help="NFEs of the throughput curves: repeat or a comma list (default "
            "1,2,5,10,20,50,100,200; sdm also 1000)."
        ),
    ] = None,
    batch: Annotated[
        int | None,
        typer.Option(
            help="Images per batch (default: auto-sized on CUDA; 1 at paper, 4 at tiny on a CPU)."
        ),
    ] = None,
    matched_batch: Annotated[
        int | None,
        typer.Option(
            "--matched-batch",
            help="Also measure every model at this one batch, for ratios of model cost alone "
            "(default: the smallest of the models' batches).",
        ),
    ] = None,
    generator: Annotated[
        str | None,
        typer.Option(
            help="A generator recipe (faithful): also measure each latent model with its Γ-VAE "
            "(e.g. a decoder with labels), next to the paper's."
        ),
    ] = None,
    repeats: Annotated[
        int | None, typer.Option(help="Timed repeats per measurement (cut to a time budget).")
    ] = None,
    compile: Annotated[
        bool | None,
        typer.Option(
            "--compile/--no-compile",
            help="Also time the torch.compile'd denoiser (default: on CUDA; off on a CPU).",
        ),
    ] = None,
    peer: Annotated[
        bool,
        typer.Option(help="Compare with MONAI's SPADEDiffusionModelUNet at matched FLOPs/NFE."),
    ] = True,
    dtype: Annotated[BenchDtype, typer.Option(help="auto: bf16 on CUDA, fp32 on a CPU.")] = (
        BenchDtype.auto
    ),
    device: DeviceOpt = "auto",
    out: Annotated[Path, typer.Option(help="Folder for bench.json and the plots.")] = Path("bench"),
    reports: Annotated[
        list[Path] | None,
        typer.Option(
            "--reports",
            help="An `evaluate` output folder (or report.json) for the utility-vs-cost plot "
            "(repeat).",
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the JSON result on stdout, tables on stderr.")
    ] = False,
    config: ConfigOption = None,
) -> None:
    """Generation cost of the models (the paper's section IV.C, Fig. 4): FLOPs, per-NFE and
    fixed costs, images/s against NFE, ratios next to their FLOP ceilings (at the batch that fits
    each model and at one matched batch), SDM's 1000-NFE prediction checked end to end at a
    reduced NFE, and our UNet against MONAI's; writes bench.json and throughput.png under
    --out."""
    options = stage_options(locals(), "as_json")
    from edmcli.bench.bench import bench as stage
    from edmcli.bench.render import render

    result = stage(**options, log=lambda line: err_console.print(line, highlight=False))
    render(result, err_console if as_json else console)
    if as_json:
        print(json.dumps(result, indent=2))
