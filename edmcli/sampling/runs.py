"""Finding and loading a trained diffusion run for sampling."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import nn

from edmcli.errors import EchoSynthError
from edmcli.training.checkpoint import file_sha256, latest_checkpoint, load_checkpoint
from edmcli.training.diffusion import DiffusionSettings, build_network, check_model_name
from edmcli.training.run_dir import load_run_config
from edmcli.training.vae import LoadedVAE, load_vae_run


@dataclass
class LoadedDiffusion:
    net: nn.Module  # EMA weights, eval mode, frozen
    settings: DiffusionSettings
    vae: LoadedVAE | None
    run: Path
    checkpoint: Path
    sha256: str
    step: int


def resolve_run(model: str, run: Path | None, runs_root: Path) -> Path:
    """``--run DIR`` when given, else ``RUNS_ROOT/MODEL``; explain how to train a missing one."""
    check_model_name(model)
    path = run if run is not None else runs_root / model
    if not (path / "config.yaml").is_file():
        hint = "--vae RUN " if model.startswith("edm-l") else ""
        raise EchoSynthError(
            f"no trained {model} run at {path}; train one with `echo-synth train-diffusion "
            f"--model {model} --data STORE {hint}--run {path}` or name it with --run"
        )
    return path


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
    state = load_checkpoint(checkpoint, "cpu")
    net = build_network(settings)
    net.load_state_dict(state["ema"])
    net = net.to(device).eval().requires_grad_(False)
    vae = None
    if settings.vae_run is not None:
        vae = load_vae_run(
            Path(settings.vae_run), device, Path(settings.vae_checkpoint), settings.vae_sha256
        )
    return LoadedDiffusion(
        net, settings, vae, Path(run).resolve(), checkpoint, file_sha256(checkpoint),
        int(state["step"]),
    )  # fmt: skip
