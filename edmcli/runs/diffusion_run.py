"""A diffusion run: its settings (``config.yaml``), finding it, and loading its EMA network.

Shared by training (which writes the settings), sampling and the benchmark (which load them).

A run may be *class-conditional* (``class_cond``, :data:`CLASS_CONDITIONS`): its UNet embeds the
view (A2C/A4C), or the view and the phase (ED/ES), of each training image
(:func:`class_ids`), and learns a null class for classifier-free guidance, which training
substitutes with probability ``class_dropout``. ``class_cond`` None (every run recorded before it
existed) is the paper's map-only model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edmcli.data.labels import VIEWS
from edmcli.errors import EchoSynthError
from edmcli.models.latent_norm import LatentNorm
from edmcli.models.registry import build_precond, get_spec, model_names
from edmcli.models.unet import SpadeUNetConfig
from edmcli.runs.checkpoint import file_sha256, latest_checkpoint, load_checkpoint
from edmcli.runs.folder import frozen_dependency, load_run_config
from edmcli.runs.vae_run import LoadedVAE, VAERunRef, find_vae_run, load_vae_run

CLASS_CONDITIONS = {"view": len(VIEWS), "view-phase": 2 * len(VIEWS)}
"""Class conditioning → number of classes (the null class is one more): ``view`` A2C 0, A4C 1;
``view-phase`` A2C-ED 0, A2C-ES 1, A4C-ED 2, A4C-ES 3."""
CLASS_DROPOUT = 0.1  # classifier-free guidance: the class is dropped to null with this probability


def check_class_cond(value: str | None) -> str | None:
    """``value`` as a run records it: None for ``"none"``/None (map only), else a key of
    :data:`CLASS_CONDITIONS`; one sentence naming ``--class-cond`` otherwise."""
    if value is None or value == "none":
        return None
    if value not in CLASS_CONDITIONS:
        raise EchoSynthError(
            f"--class-cond {value!r} is unknown; choose from none, {', '.join(CLASS_CONDITIONS)}"
        )
    return value


def class_ids(class_cond: str, views: torch.Tensor, phases: torch.Tensor) -> torch.Tensor:
    """Class of each sample (int64) from its view code (0 A2C, 1 A4C) and phase code (0 ED,
    1 ES; :class:`~edmcli.data.dataset.EchoDataset`): ``view`` → the view, ``view-phase`` →
    2·view + phase. A sample whose view (or, for ``view-phase``, phase) is unknown (−1) gets the
    null class, ``CLASS_CONDITIONS[class_cond]``."""
    views = torch.as_tensor(views, dtype=torch.long)
    phases = torch.as_tensor(phases, dtype=torch.long, device=views.device)
    null = CLASS_CONDITIONS[class_cond]
    known_view = (views >= 0) & (views < len(VIEWS))
    if class_cond == "view":
        return torch.where(known_view, views, null)
    known = known_view & (phases >= 0) & (phases < 2)
    return torch.where(known, 2 * views + phases, null)


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
    # Class conditioning (CLASS_CONDITIONS; None: map only, the paper) and the probability of
    # dropping the class to the null class in training (None when map only).
    class_cond: str | None = None
    class_dropout: float | None = None
    # Latent models: the map latent → model space (edmcli.models.latent_norm.LatentNorm record);
    # None for pixel models, the paper's un-normalised latents and runs recorded before it.
    latent_norm: dict[str, Any] | None = None
    # EDM losses' training noise-level distribution ln σ ~ N(P_mean, P_std²) when not EDM's
    # (−1.2, 1.2): {} for the defaults and runs recorded before it.
    loss: dict[str, Any] = field(default_factory=dict)
    # A consistency student (``echo-synth distill``, edmcli.training.distill_plan): method,
    # teacher run/checkpoint/hash, tuning schedule and the levels of each NFE it samples at;
    # None for every diffusion model.
    consistency: dict[str, Any] | None = None

    def unet_config(self) -> SpadeUNetConfig:
        return SpadeUNetConfig(**self.unet)

    @property
    def channels(self) -> int:
        """Channels of the model space: the Γ-VAE's latent channels, or 1 (pixels)."""
        return int(self.unet.get("in_channels", 1))

    @property
    def norm(self) -> LatentNorm:
        """The run's latent normalisation (the identity for pixels and un-normalised latents)."""
        return LatentNorm.from_record(self.latent_norm)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> DiffusionSettings:
        """The settings a run's ``config.yaml`` records (its engine keys left out)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names})

    def student_levels(self, nfe: int) -> list[float]:
        """:func:`student_levels` of this run's consistency record."""
        return student_levels(self.consistency or {}, nfe)

    @property
    def num_classes(self) -> int:
        """Classes of the run's class conditioning (0: map only)."""
        return CLASS_CONDITIONS[self.class_cond] if self.class_cond else 0


def student_levels(record: dict[str, Any], nfe: int) -> list[float]:
    """The noise levels at which a consistency student (its ``consistency`` record) samples with
    ``nfe`` evaluations; one sentence naming the NFEs it was made for otherwise."""
    levels = record.get("sigmas", {})
    if str(nfe) not in levels:
        made = ", ".join(levels) or "none"
        raise EchoSynthError(
            f"this student was made for NFE {made}, not {nfe}; sample it with --nfe "
            f"{'|'.join(levels) or '1'}"
        )
    return [float(v) for v in levels[str(nfe)]]


def latent_decoder(
    vae: LoadedVAE | None, norm: LatentNorm
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """``decode(x, sector, labels)`` from a latent run's model space to images (the Γ-VAE
    decoder after undoing ``norm``; ``labels`` the (N, H, W) maps, used by a decoder with labels);
    None for a pixel run (no Γ-VAE)."""
    if vae is None:
        return None
    if norm.is_identity:
        return vae.model.decode
    return lambda x, sector, labels=None: vae.model.decode(norm.denormalise(x), sector, labels)


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
    if not (path / "config.yaml").is_file() and (path / "zarr.json").is_file():
        raise EchoSynthError(
            f"{path} is a dataset store, not a run folder; --run names a folder written by "
            "`echo-synth train-diffusion`"
        )
    if not (path / "config.yaml").is_file() and model is None:
        raise EchoSynthError(
            f"no trained run at {path} (it has no config.yaml); --run names a folder written by "
            "`echo-synth train-diffusion`, or name the model with --model"
        )
    if not (path / "config.yaml").is_file():
        name = model
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


def diffusion_vae_ref(run_dir: Path, settings: DiffusionSettings) -> VAERunRef | None:
    """The Γ-VAE of a latent run as :func:`load_diffusion_run` will
    load it (the run's frozen copy when its hash is the recorded one, else the recorded run and
    checkpoint), checked from its files and hashed (:func:`~edmcli.runs.vae_run.find_vae_run`),
    not loaded; None for a pixel-space run."""
    if settings.vae_run is None:
        return None
    frozen = frozen_dependency(run_dir, "vae")
    if frozen is not None and frozen.sha256 == settings.vae_sha256:  # the run's own copy
        return find_vae_run(frozen.folder, frozen.checkpoint, settings.vae_sha256)
    return find_vae_run(
        Path(settings.vae_run), Path(settings.vae_checkpoint), settings.vae_sha256
    )  # a run trained before runs kept a copy of their Γ-VAE checkpoint


def load_diffusion_run(model: str, run: Path, device: torch.device) -> LoadedDiffusion:
    """The EMA network of the newest checkpoint of ``run``, checked to be a ``model`` run."""
    config = load_run_config(run)
    if config.get("kind") != "diffusion":
        raise EchoSynthError(f"{run} is not a diffusion run (it is a {config.get('kind')!r} run)")
    if config.get("model") != model:
        raise EchoSynthError(f"{run} is a {config.get('model')} run, not {model}")
    settings = DiffusionSettings.from_config(config)
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
