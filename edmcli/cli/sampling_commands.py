"""The ``sample`` command: a synthetic dataset store from label maps and a trained model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edmcli.config import ConfigOption

from .errors import user_errors
from .options import DeviceOpt, Precision, PrecisionOpt, RunOption, stage_options


@user_errors
def sample(
    model: Annotated[
        str | None,
        typer.Option(help="sdm, edm, ve, vp, edm-l128 or edm-l64 (default: the --run's model)."),
    ] = None,
    run: Annotated[Path | None, RunOption] = None,
    runs_root: Annotated[Path, typer.Option(help="Where --model looks for runs/<model>.")] = Path(
        "runs"
    ),
    labels: Annotated[
        Path | None, typer.Option(help="Store of label maps (default: the run's training store).")
    ] = None,
    splits: Annotated[
        str,
        typer.Option(
            help="Comma-separated splits of the label store. Default train: the val patients stay "
            "unseen for choosing checkpoints in evaluate (the paper's protocol: train,val with "
            "--holdout and evaluate --checkpoint synthetic); test: a probe store for evaluate "
            "--probe, never for training."
        ),
    ] = "train",
    k: Annotated[int, typer.Option("--k", help="Random transformations per label map.")] = 5,
    n: Annotated[int | None, typer.Option(help="At most this many samples.")] = None,
    nfe: Annotated[
        int | None,
        typer.Option(help="Network evaluations per sample (default 1000 for sdm, else 35)."),
    ] = None,
    solver: Annotated[
        str | None,
        typer.Option(
            help="heun, euler, dpmpp_2m, dpmpp_3m, ddim or ddpm_ancestral (default per model)."
        ),
    ] = None,
    churn: Annotated[float, typer.Option(help="Heun S_churn (0: deterministic).")] = 0.0,
    seed: Annotated[int, typer.Option(help="Global seed; sample i uses (seed, i).")] = 0,
    batch: Annotated[int, typer.Option(help="Samples per network call.")] = 16,
    chunk: Annotated[int, typer.Option(help="Samples per store shard (unit of resume).")] = 64,
    compile: Annotated[bool, typer.Option(help="torch.compile the denoiser.")] = True,
    spade_cache: Annotated[bool, typer.Option(help="Compute SPADE γ/β once per batch.")] = True,
    schedule: Annotated[
        str | None,
        typer.Option(help="σ schedule: edm (ρ = 7), ve, vp or ddpm (default: the model's)."),
    ] = None,
    transforms: Annotated[
        bool,
        typer.Option(
            help="Transform each label map randomly before sampling it (the paper's affine + "
            "elastic, a different draw per copy; default) or sample the maps as they are."
        ),
    ] = True,
    pin_outside: Annotated[
        bool,
        typer.Option(help="Reset the denoised estimate outside the sector to −1 at every step."),
    ] = False,
    guidance: Annotated[
        float | None,
        typer.Option(
            help="Classifier-free guidance scale w of a model trained with --class-cond: D = "
            "D_uncond + w (D_cond − D_uncond), diffusers' guidance_scale (Ho & Salimans' w is "
            "this w − 1). Default 1: the conditional model alone, no guidance. w ≠ 0, 1 "
            "evaluates the network twice per step, and --nfe counts both."
        ),
    ] = None,
    holdout: Annotated[
        float,
        typer.Option(
            help="Fraction of source patients whose samples form split 'val' (a synthetic "
            "validation set for evaluate --checkpoint synthetic); 0: every sample trains."
        ),
    ] = 0.0,
    privacy_filter: Annotated[
        float | None,
        typer.Option(
            help="Redraw (new recorded seed, at most 8 times) every sample closer to a training "
            "image of its generator than this percentile of real test images of new patients "
            "(pixel space, relative nearest distance); e.g. 1 or 5. The store records it.",
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Output store (default synthetic/<model>-nfe<NFE>.zarr).")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an output store of another config.")] = (
        False
    ),
    precision: PrecisionOpt = Precision.auto,
    device: DeviceOpt = "auto",
    config: ConfigOption = None,
) -> None:
    """Generate a synthetic dataset store from label maps with a trained model."""
    options = stage_options(locals())
    from edmcli.sampling.sample import sample as stage

    stage(**options)
