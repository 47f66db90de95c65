"""A diffusion run: its settings (``config.yaml``), finding it, and loading its EMA network.

Shared by training (which writes the settings), sampling and the benchmark (which load them).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edmcli.errors import EchoSynthError
from edmcli.models.registry import build_precond, get_spec, model_names
from edmcli.models.unet import SpadeUNetConfig
from edmcli.runs.checkpoint import file_sha256, latest_checkpoint, load_checkpoint
from edmcli.runs.folder import frozen_dependency, load_run_config
from edmcli.runs.vae_run import LoadedVAE, load_vae_run


@dataclass
class DiffusionSettings:
    """Everything that defines a diffusion run (written to the run's config.yaml)."""

    model: str
    data: str
    preset: str
    image_size: int  # pixels of the store
    net_size: int  # the UNet's input size: pixels, or the Γ-VAE latent size
    unet: dict[str, Any] = field(default_factory=dict)
    # Every preconditioning parameter (registry.precond_settings); {} in runs recorded before
    # this field existed, which rebuilds the class defaults they were trained with (for sdm the
    # original DDPM: linear betas, fixed variance, no clipping).
    precond: dict[str, Any] = field(default_factory=dict)
    vae_run: str | None = None
    vae_checkpoint: str | None = None
    vae_sha256: str | None = None
    sigma_data_source: str | None = None  # latent models: how σ_data was chosen
    augment: bool = True
    in_memory: bool = True

    def unet_config(self) -> SpadeUNetConfig:
        return SpadeUNetConfig(**self.unet)


def check_model_name(model: str) -> None:
    """One sentence listing the registered models for an unknown name."""
    try:
        get_spec(model)
    except ValueError:
        raise EchoSynthError(
            f"model {model!r} does not exist; valid: {', '.join(model_names())}"
        ) from None


def build_network(settings: DiffusionSettings) -> nn.Module:
    """The run's preconditioned network, with the parameters it recorded."""
    return build_precond(settings.model, settings.unet_config(), **settings.precond)


@dataclass
class LoadedDiffusion:
    net: nn.Module  # EMA weights, eval mode, frozen
    settings: DiffusionSettings
    vae: LoadedVAE | None
    run: Path
    checkpoint: Path
    sha256: str
    step: int


def resolve_run(model: str | None, run: Path | None, runs_root: Path) -> tuple[str, Path]:
    """(model, run folder): ``run`` when given (its model read from its config when ``model``
    is None), else ``RUNS_ROOT/MODEL``; explains how to train a missing one."""
    if model is None and run is None:
        raise EchoSynthError("name the model (--model NAME) or the run (--run DIR)")
    if model is not None:
        check_model_name(model)
    path = Path(run) if run is not None else Path(runs_root) / model
    if not (path / "config.yaml").is_file():
        name = model or "MODEL"
        hint = "--vae RUN " if model is not None and get_spec(model).is_latent else ""
        raise EchoSynthError(
            f"no trained {name} run at {path}; train one with `echo-synth train-diffusion "
            f"--model {name} --data STORE {hint}--run {path}` or name it with --run"
        )
    if model is None:
        config = load_run_config(path)
        if config.get("kind") != "diffusion":
            raise EchoSynthError(
                f"{path} is not a diffusion run (it is a {config.get('kind')!r} run)"
            )
        model = str(config.get("model"))
        check_model_name(model)
    return model, path


def load_diffusion_run(model: str, run: Path, device: torch.device) -> LoadedDiffusion:
    """The EMA network of the newest checkpoint of ``run``, checked to be a ``model`` run."""
    config = load_run_config(run)
    if config.get("kind") != "diffusion":
        raise EchoSynthError(f"{run} is not a diffusion run (it is a {config.get('kind')!r} run)")
    if config.get("model") != model:
        raise EchoSynthError(f"{run} is a {config.get('model')} run, not {model}")
    names = {f.name for f in fields(DiffusionSettings)}
    settings = DiffusionSettings(**{k: v for k, v in config.items() if k in names})
    checkpoint = latest_checkpoint(run)
    if checkpoint is None:
        raise EchoSynthError(f"{run} has no checkpoint yet; train it first")
    state = load_checkpoint(
        checkpoint,
        "cpu",
        advice="delete it to sample the checkpoint before it, or train the run further to "
        "write a new one",
    )
    net = build_network(settings)
    net.load_state_dict(state["ema"])
    net = net.to(device).eval().requires_grad_(False)
    vae = None
    if settings.vae_run is not None:
        frozen = frozen_dependency(run, "vae")
        if frozen is not None and frozen.sha256 == settings.vae_sha256:  # the run's own copy
            vae = load_vae_run(frozen.folder, device, frozen.checkpoint, settings.vae_sha256)
        else:  # a run trained before runs kept a copy of their Γ-VAE checkpoint
            vae = load_vae_run(
                Path(settings.vae_run), device, Path(settings.vae_checkpoint), settings.vae_sha256
            )
    return LoadedDiffusion(
        net, settings, vae, Path(run).resolve(), checkpoint, file_sha256(checkpoint),
        int(state["step"]),
    )  # fmt: skip
