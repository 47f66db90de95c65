"""The training commands: ``train-vae`` (the Γ-VAE of the latent models) and
``train-diffusion`` (a SPADE diffusion model)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edmcli.config import ConfigOption

from .errors import user_errors
from .options import (
    BatchGpuOpt,
    BatchOpt,
    CheckpointEveryOpt,
    DeviceOpt,
    EmaOpt,
    GridEveryOpt,
    LogEveryOpt,
    LrOpt,
    Precision,
    RunOption,
    SeedOpt,
    TrainPrecisionOpt,
    ValidateEveryOpt,
    WorkersOpt,
    stage_options,
)


@user_errors
def train_vae(
    data: Annotated[Path, typer.Option(help="Dataset store (its train split trains).")],
    latent: Annotated[int, typer.Option(help="64 (EDM-L64, 4× down) or 128 (EDM-L128, 2× down).")],
    run: Annotated[Path | None, RunOption] = None,
    preset: Annotated[str, typer.Option(help="paper or tiny (CPU minutes on 64² phantom).")] = (
        "paper"
    ),
    epochs: Annotated[int | None, typer.Option(help="Training epochs.")] = None,
    steps: Annotated[int | None, typer.Option(help="Optimiser steps (overrides --epochs).")] = None,
    batch: BatchOpt = None,
    batch_gpu: BatchGpuOpt = None,
    lr: LrOpt = None,
    perceptual: Annotated[
        str | None, typer.Option(help="lpips (AlexNet), lpips-vgg, or none.")
    ] = None,
    kl_direction: Annotated[
        str | None, typer.Option(help="posterior-first (ELBO) or prior-first (eq. 5 as printed).")
    ] = None,
    prior_shape: Annotated[float | None, typer.Option(help="Gamma prior shape α.")] = None,
    prior_rate: Annotated[float | None, typer.Option(help="Gamma prior rate β.")] = None,
    base_channels: Annotated[int | None, typer.Option(help="Channels of level 1.")] = None,
    latent_channels: Annotated[
        int | None,
        typer.Option(help="Latent channels C (default 1, the paper's), a Gamma posterior each."),
    ] = None,
    decoder_labels: Annotated[
        bool | None,
        typer.Option(
            "--decoder-labels/--no-decoder-labels",
            help="A decoder that also takes the label map (SPADE norms; the paper's: off).",
        ),
    ] = None,
    decoder_hidden: Annotated[
        int | None,
        typer.Option(help="SPADE width of the decoder with labels (default: its deepest level's)."),
    ] = None,
    w_recon: Annotated[float | None, typer.Option(help="λ1, image L2.")] = None,
    w_perceptual: Annotated[float | None, typer.Option(help="λ2, LPIPS.")] = None,
    w_kl: Annotated[float | None, typer.Option(help="λ3, KL.")] = None,
    w_latent: Annotated[float | None, typer.Option(help="λ4, latent L2.")] = None,
    w_spectrum: Annotated[
        float | None,
        typer.Option(
            help="Weight of the radial power-spectrum distance (0, the paper: off; a sharpness "
            "term without backbone weights)."
        ),
    ] = None,
    augment: Annotated[bool | None, typer.Option(help="Geometric + intensity augmentation.")] = (
        None
    ),
    ema_decay: EmaOpt = None,
    checkpoint_every: CheckpointEveryOpt = None,
    log_every: LogEveryOpt = None,
    grid_every: GridEveryOpt = None,
    num_workers: WorkersOpt = None,
    precision: TrainPrecisionOpt = Precision.auto,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    config: ConfigOption = None,
) -> None:
    """Train the Γ-VAE of the latent models; rerun the same command to resume."""
    options = stage_options(locals())
    from edmcli.training.vae import train_vae as stage

    stage(**options)


@user_errors
def train_diffusion(
    model: Annotated[str, typer.Option(help="sdm, edm, ve, vp, edm-l128 or edm-l64.")],
    data: Annotated[Path, typer.Option(help="Dataset store (its train split trains).")],
    vae: Annotated[Path | None, typer.Option(help="Γ-VAE run (latent models).")] = None,
    run: Annotated[Path | None, RunOption] = None,
    preset: Annotated[str, typer.Option(help="paper or tiny (CPU minutes).")] = "paper",
    steps: Annotated[int | None, typer.Option(help="Optimiser steps (overrides --kimg).")] = None,
    kimg: Annotated[float | None, typer.Option(help="Training length in 1000s of images.")] = (
        None
    ),
    batch: BatchOpt = None,
    batch_gpu: BatchGpuOpt = None,
    lr: LrOpt = None,
    dropout: Annotated[float | None, typer.Option(help="UNet dropout.")] = None,
    spade_placement: Annotated[
        str | None, typer.Option(help="decoder (as the authors) or all.")
    ] = None,
    model_channels: Annotated[int | None, typer.Option(help="UNet base channels.")] = None,
    noise_schedule: Annotated[
        str | None, typer.Option(help="sdm: cosine (published, default) or linear β.")
    ] = None,
    learn_sigma: Annotated[
        bool | None,
        typer.Option(help="sdm: learned variance + hybrid loss (published, default) or fixed."),
    ] = None,
    clip_denoised: Annotated[
        bool | None, typer.Option(help="sdm: clip x₀ to [−1, 1] while sampling (default on).")
    ] = None,
    sigma_data: Annotated[
        float | None,
        typer.Option(
            help="EDM σ_data (default 0.5; latent models: the std of the Γ-VAE's training "
            "latents, measured by train-vae)."
        ),
    ] = None,
    latent_norm: Annotated[
        str | None,
        typer.Option(
            help="Latent models: none (the paper: the Γ-VAE latents as they are, default) or "
            "centred (normalised to mean 0, std σ_data by the Γ-VAE's training latents, as "
            "EDM2)."
        ),
    ] = None,
    latent_outside: Annotated[
        str | None,
        typer.Option(
            help="Centred latents outside the sector: mean (0, default) or background (the "
            "normalised background latent)."
        ),
    ] = None,
    p_mean: Annotated[
        float | None,
        typer.Option(help="EDM models: mean of ln σ in training (default −1.2, EDM's)."),
    ] = None,
    p_std: Annotated[
        float | None,
        typer.Option(help="EDM models: std of ln σ in training (default 1.2, EDM's)."),
    ] = None,
    augment: Annotated[bool | None, typer.Option(help="Geometric augmentation.")] = None,
    class_cond: Annotated[
        str | None,
        typer.Option(
            help="Condition on the image's view (view), view and phase (view-phase), or not "
            "(none: the paper's map-only model, default); trained with classifier-free guidance "
            "dropout 0.1."
        ),
    ] = None,
    ema_decay: EmaOpt = None,
    checkpoint_every: CheckpointEveryOpt = None,
    log_every: LogEveryOpt = None,
    grid_every: GridEveryOpt = None,
    validate_every: ValidateEveryOpt = None,
    num_workers: WorkersOpt = None,
    precision: TrainPrecisionOpt = Precision.auto,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    config: ConfigOption = None,
) -> None:
    """Train a SPADE diffusion model; rerun the same command to resume."""
    options = stage_options(locals())
    from edmcli.sampling.preview import preview_samples
    from edmcli.training.diffusion import train_diffusion as stage

    stage(**options, preview=preview_samples)


@user_errors
def distill(
    teacher: Annotated[
        Path, typer.Option(help="A trained EDM-family run (edm, edm-l64, edm-l128) to distil.")
    ],
    run: Annotated[
        Path | None, typer.Option(help="The student's run folder (default: TEACHER-student).")
    ] = None,
    method: Annotated[
        str, typer.Option(help="ect: Easy Consistency Tuning from the teacher's weights.")
    ] = "ect",
    steps: Annotated[
        int | None, typer.Option(help="Optimiser steps (default: 3/4 of the teacher's).")
    ] = None,
    batch: BatchOpt = None,
    batch_gpu: BatchGpuOpt = None,
    lr: LrOpt = None,
    ema_decay: EmaOpt = None,
    checkpoint_every: CheckpointEveryOpt = None,
    log_every: LogEveryOpt = None,
    grid_every: GridEveryOpt = None,
    validate_every: ValidateEveryOpt = None,
    num_workers: WorkersOpt = None,
    precision: TrainPrecisionOpt = Precision.auto,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    config: ConfigOption = None,
) -> None:
    """Tune a trained diffusion run into a student that samples in 1, 2 or 4 network
    evaluations (`sample --run STUDENT --nfe 1|2|4`); rerun the same command to resume."""
    options = stage_options(locals())
    from edmcli.sampling.preview import preview_samples
    from edmcli.training.distill import distill as stage

    stage(**options, preview=preview_samples)
