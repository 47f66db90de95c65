"""The plan of ``train-diffusion``: every refusal and every resolved setting before any work.

:func:`plan_train_diffusion` takes the arguments of
:func:`edmcli.training.diffusion.train_diffusion` and returns a :class:`DiffusionTrainingPlan`
(the run's settings and ``config.yaml``, its length in steps, the Γ-VAE checkpoint of a latent
model, where it runs); :func:`edmcli.training.diffusion.run_train_diffusion` trains it. Planning
reads the store (its metadata, and its label maps for values outside the convention) and the
Γ-VAE run's files (config, latent statistics, the checkpoint's hash); it writes nothing, builds
no network and loads no weights: a Γ-VAE checkpoint that exists but cannot be read is refused
when the run loads it, before training.

The plan imports torch: the model registry and the run settings it validates live in torch
modules, as does the engine's :class:`~edmcli.training.engine.TrainConfig`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edmcli.data.dataset import PHASES, codes
from edmcli.data.labels import VIEWS
from edmcli.data.store import DatasetStore
from edmcli.errors import EchoSynthError
from edmcli.models.latent_norm import LATENT_NORMS, LATENT_OUTSIDE, LatentNorm
from edmcli.models.registry import (
    get_spec,
    loss_parameters,
    model_names,
    precond_settings,
    preset_row,
    unet_config,
)
from edmcli.models.unet import SpadeUNetConfig
from edmcli.runs.diffusion_run import (
    CLASS_CONDITIONS,
    CLASS_DROPOUT,
    DiffusionSettings,
    check_class_cond,
    check_model_name,
    class_ids,
)
from edmcli.runs.folder import frozen_dependency
from edmcli.runs.memory import MemoryCheck, diffusion_training_memory, training_check
from edmcli.runs.vae_run import (
    LATENT_STATS_FILE,
    LoadedVAE,
    VAERunRef,
    find_vae_run,
    load_latent_stats,
)
from edmcli.settings import resolve, training_steps
from edmcli.training.engine import TrainConfig
from edmcli.training.plan_common import Placement, length_line, place
from edmcli.training.run import train_config_dict

UNET_SETTINGS = ("dropout", "spade_placement", "model_channels")
PRECOND_SETTINGS = ("noise_schedule", "learn_sigma", "clip_denoised", "sigma_data")
LATENT_SETTINGS = ("latent_norm", "latent_outside")  # a latent model's own (a study's pixel
# models leave them out of the settings every model shares)
# preview(net, label maps, settings, Γ-VAE, classes): quick samples; classes (N,) are the maps'
# own classes for a class-conditional run (never the null class), None for a map-only one
PreviewFn = Callable[
    [nn.Module, torch.Tensor, DiffusionSettings, "LoadedVAE | None", "torch.Tensor | None"],
    torch.Tensor,
]


@dataclass(frozen=True)
class DiffusionTrainingPlan:
    """A planned ``train-diffusion`` run: ``resolved`` is the ``config.yaml`` it writes (or checks
    on resume); ``train_config.steps`` its length; ``vae`` the Γ-VAE checkpoint a latent model
    encodes with (checked and hashed, not loaded); ``preview`` draws its sample grids."""

    model: str
    preset: str
    run: Path
    settings: DiffusionSettings
    train_config: TrainConfig
    resolved: dict[str, Any]
    n_train: int  # training images of the store
    placement: Placement
    vae: VAERunRef | None = None
    preview: PreviewFn | None = None
    memory: MemoryCheck | None = None  # the GPU memory estimate (None off CUDA)

    @property
    def steps(self) -> int:
        return self.train_config.steps

    @property
    def network(self) -> str:
        """The model as the run's header names it."""
        s = self.settings
        space = "latent" if self.vae is not None else "pixels"
        classes = (
            f"; classes: {s.class_cond}, dropped with p = {s.class_dropout}" if s.class_cond else ""
        )
        return f"{self.model} ({self.preset}; {s.net_size}² {space}{classes})"

    def describe(self) -> list[str]:
        s = self.settings
        lines = [
            f"train-diffusion: {self.network}, UNet {s.unet.get('model_channels')} channels",
            self.placement.line(self.run),
            f"data: train split of {s.data} ({s.image_size}²)",
            length_line(self.train_config, self.n_train),
        ]
        if self.vae is not None:
            lines.append(
                f"Γ-VAE: {s.vae_run}, checkpoint {Path(str(s.vae_checkpoint)).name} (sha256 "
                f"{str(s.vae_sha256)[:12]}…); σ_data {s.precond.get('sigma_data')} "
                f"({s.sigma_data_source})"
            )
        if s.loss:
            lines.append(
                f"training noise levels: ln σ ~ N({s.loss.get('P_mean', -1.2)}, "
                f"{s.loss.get('P_std', 1.2)}²)"
            )
        if self.preview is not None and self.train_config.grid_every:
            lines.append(f"sample grids every {self.train_config.grid_every} steps")
        if self.memory is not None:
            lines.append(self.memory.message)
        return lines


def diffusion_run_settings(
    model: str,
    data: Path,
    preset: str,
    vae: Path | None,
    unet_overrides: dict[str, Any],
    precond_overrides: dict[str, Any] | None = None,
    run: Path | None = None,
    latent_norm: str | None = None,
    latent_outside: str | None = None,
) -> tuple[DiffusionSettings, VAERunRef | None]:
    """Validate the model, the store and (for latent models) the Γ-VAE run, from their files;
    build the settings. Returns the Γ-VAE checkpoint to load (None for a pixel model).
    ``latent_norm``/``latent_outside``: :data:`~edmcli.models.latent_norm.LATENT_NORMS` and
    :data:`~edmcli.models.latent_norm.LATENT_OUTSIDE` (None: ``none``, the paper's latents)."""
    check_model_name(model)
    spec = get_spec(model)
    norm = check_latent_norm(latent_norm, latent_outside, model, spec.is_latent)
    store = DatasetStore(data)
    height, width = store.image_size
    if height != width:
        raise EchoSynthError(f"{data} has non-square images ({height}×{width})")
    labels_seen = store.info.get("label_names", {})
    if labels_seen.get("4") != "sector" or labels_seen.get("1") != "lv_endocardium":
        raise EchoSynthError(
            f"{data} does not use the label convention (0 outside, 1 LV, 2 myocardium, 3 LA, "
            "4 sector); rebuild it with echo-synth prepare"
        )
    bad = store.invalid_label_values()
    if bad:
        raise EchoSynthError(
            f"{data} has label values {bad} outside the convention 0..4; rebuild it with "
            "echo-synth prepare"
        )
    ref = None
    net_size = height
    if spec.is_latent:
        if vae is None:
            raise EchoSynthError(
                f"{model} runs in the Γ-VAE latent space: it needs a Γ-VAE run (vae; train one "
                f"with echo-synth train-vae --latent {spec.latent})"
            )
        frozen = frozen_dependency(run, "vae") if run is not None else None
        if frozen is not None and frozen.source_run == Path(vae).resolve():
            # resuming: the Γ-VAE checkpoint this run was trained with, from its own copy
            ref = find_vae_run(frozen.folder, frozen.checkpoint, frozen.sha256)
            vae_run, vae_checkpoint = frozen.source_run, frozen.source_checkpoint
        else:
            ref = find_vae_run(vae)
            vae_run, vae_checkpoint = ref.run.resolve(), ref.checkpoint.resolve()
        if ref.settings.latent != spec.latent:
            raise EchoSynthError(
                f"the Γ-VAE run {vae} is an L{ref.settings.latent} but {model} needs an "
                f"L{spec.latent} (train-vae --latent {spec.latent})"
            )
        if ref.settings.image_size != height:
            raise EchoSynthError(
                f"the Γ-VAE run {vae} was trained on {ref.settings.image_size}² images but "
                f"{data} holds {height}² images"
            )
        net_size = ref.settings.latent_size
        if ref.settings.latent_channels != 1:  # the UNet takes and predicts C channels
            unet_overrides = {**unet_overrides, "in_channels": ref.settings.latent_channels}
    precond_overrides = dict(precond_overrides or {})
    latent_norm_record = None
    sigma_data = precond_overrides.get("sigma_data")
    if sigma_data is not None and not float(sigma_data) > 0:  # σ_data divides c_in, c_out, c_skip
        raise EchoSynthError(f"--sigma-data {sigma_data} must be positive (the data's std)")
    sigma_data_source = None
    if ref is not None and norm != "none":
        stats = load_latent_stats(ref.run)
        if stats is None or not {"mean", "sigma_data"} <= set(stats):
            raise EchoSynthError(
                f"--latent-norm {norm} needs the mean and std of the Γ-VAE run {vae}'s training "
                f"latents, which it does not record ({LATENT_STATS_FILE}); retrain it with this "
                "version's train-vae"
            )
        target = float(precond_overrides.get("sigma_data", precond_settings(model)["sigma_data"]))
        per_channel = ref.settings.latent_channels > 1 and "channel_mean" in stats
        mean = stats["channel_mean"] if per_channel else float(stats["mean"])
        std = stats["channel_std"] if per_channel else float(stats["sigma_data"])
        try:
            latent_norm_record = LatentNorm.centred(
                mean, std, target, latent_outside or "mean"
            ).record()
        except ValueError as exc:
            raise EchoSynthError(f"--latent-norm {norm}: {exc}") from None
        precond_overrides["sigma_data"] = target
        sigma_data_source = (
            f"centred latents: the Γ-VAE run's training latents (mean {stats['mean']:.4g}, std "
            f"{stats['sigma_data']:.4g}{', per channel' if per_channel else ''}) normalised to "
            "mean 0, std σ_data"
        )
    elif ref is not None and "sigma_data" in precond_settings(model):
        stats = load_latent_stats(ref.run)
        if "sigma_data" in precond_overrides:
            sigma_data_source = "set"
        elif stats is not None:
            precond_overrides["sigma_data"] = round(float(stats["sigma_data"]), 6)
            sigma_data_source = "measured: std of the Γ-VAE run's encoded training latents"
        else:
            sigma_data_source = "assumed (the Γ-VAE run records no latent statistics)"
    try:
        precond = precond_settings(model, **precond_overrides)
        config = unet_config(model, preset, net_size, precond=precond, **unet_overrides)
        config_dict = asdict(config)
        SpadeUNetConfig(**config_dict)
    except ValueError as exc:
        raise EchoSynthError(f"{model} network settings: {exc}") from None
    if not config_dict.get("num_classes"):
        config_dict.pop("num_classes", None)  # map only: the config runs recorded before classes
    settings = DiffusionSettings(
        model=model,
        data=str(Path(data).resolve()),
        preset=preset,
        image_size=height,
        net_size=net_size,
        unet=_plain(config_dict),
        precond=_plain(precond),
        vae_run=str(vae_run) if ref else None,
        vae_checkpoint=str(vae_checkpoint) if ref else None,
        vae_sha256=ref.sha256 if ref else None,
        sigma_data_source=sigma_data_source,
        latent_norm=latent_norm_record,
    )
    return settings, ref


def check_latent_norm(
    latent_norm: str | None, latent_outside: str | None, model: str, is_latent: bool
) -> str:
    """``latent_norm`` as the plan uses it (``none`` for None), refused in one sentence when
    unknown, asked of a pixel model, or ``latent_outside`` given without centred latents."""
    norm = "none" if latent_norm is None else str(latent_norm)
    if norm not in LATENT_NORMS:
        raise EchoSynthError(f"--latent-norm {norm!r}: choose from {', '.join(LATENT_NORMS)}")
    if latent_outside is not None and latent_outside not in LATENT_OUTSIDE:
        raise EchoSynthError(
            f"--latent-outside {latent_outside!r}: choose from {', '.join(LATENT_OUTSIDE)}"
        )
    if norm != "none" and not is_latent:
        raise EchoSynthError(
            f"--latent-norm {norm} normalises Γ-VAE latents; {model} is a pixel model"
        )
    if latent_outside is not None and norm == "none":
        raise EchoSynthError(
            "--latent-outside applies to normalised latents (--latent-norm centred)"
        )
    return norm


NOISE_LEVEL_SETTINGS = {"p_mean": "P_mean", "p_std": "P_std"}  # option → EDM loss parameter


def noise_level_settings(values: dict[str, Any], model: str) -> dict[str, float]:
    """The EDM loss's training noise-level distribution ln σ ~ N(P_mean, P_std²) asked for in
    ``values`` (``p_mean``, ``p_std``; {}: EDM's −1.2, 1.2), refused in one sentence for a model
    whose loss has no such distribution or for a non-finite mean or a std that is not positive."""
    asked = {NOISE_LEVEL_SETTINGS[k]: values[k] for k in NOISE_LEVEL_SETTINGS
             if values.get(k) is not None}  # fmt: skip
    if not asked:
        return {}
    if "P_mean" not in loss_parameters(model):
        edm = ", ".join(n for n in model_names() if "P_mean" in loss_parameters(n))
        raise EchoSynthError(
            f"--p-mean/--p-std set EDM's training noise levels; {model} draws its own ({edm} "
            "take them)"
        )
    for key, value in asked.items():
        option = "--p-mean" if key == "P_mean" else "--p-std"
        if not isinstance(value, int | float) or not math.isfinite(value):
            raise EchoSynthError(f"{option} {value!r} must be a finite number")
    if asked.get("P_std", 1.0) <= 0:
        raise EchoSynthError(f"--p-std {asked['P_std']} must be positive (the std of ln σ)")
    return {k: float(v) for k, v in asked.items()}


def latent_model_settings(values: dict[str, Any], is_latent: bool) -> dict[str, Any]:
    """``values`` for a latent model; without :data:`LATENT_SETTINGS` for a pixel model."""
    return (
        dict(values) if is_latent else {k: v for k, v in values.items() if k not in LATENT_SETTINGS}
    )


def class_settings(values: dict[str, Any], data: Path) -> tuple[str | None, float | None]:
    """(class_cond, class_dropout) of resolved settings ``values``; a conditioning needs the
    training images' view (and phase) recorded in ``data``."""
    class_cond = check_class_cond(values.get("class_cond"))
    dropout = values.get("class_dropout")
    if class_cond is None:
        if dropout is not None:
            raise EchoSynthError("class_dropout needs a class conditioning (--class-cond view)")
        return None, None
    dropout = CLASS_DROPOUT if dropout is None else float(dropout)
    if not 0.0 <= dropout < 1.0:
        raise EchoSynthError(f"class_dropout {dropout} must be in [0, 1)")
    store = DatasetStore(data)
    rows = store.indices("train")
    known = class_ids(
        class_cond,
        torch.from_numpy(codes(store.column("view")[rows], VIEWS)),
        torch.from_numpy(codes(store.column("phase")[rows], PHASES)),
    )
    if not bool((known < CLASS_CONDITIONS[class_cond]).any()):
        what = "view" if class_cond == "view" else "view and phase"
        raise EchoSynthError(
            f"--class-cond {class_cond} needs the {what} of the training images, but the train "
            f"split of {data} records none"
        )
    return class_cond, dropout


def _plain(value: Any) -> Any:
    """Tuples → lists, so the settings round-trip through YAML unchanged."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def settings_dict(settings: DiffusionSettings) -> dict[str, Any]:
    return asdict(settings)


def plan_train_diffusion(
    model: str,
    data: Path,
    *,
    vae: Path | None = None,
    run: Path | None = None,
    preset: str = "paper",
    precision: str = "auto",
    device: str = "auto",
    seed: int = 0,
    preview: PreviewFn | None = None,
    **overrides: Any,
) -> DiffusionTrainingPlan:
    """The plan of :func:`edmcli.training.diffusion.train_diffusion` (same arguments). Refuses,
    in the stage's order: the model, the preset and settings, the class conditioning, the store
    (missing, incomplete, non-square, not the label convention, label values outside it), the
    Γ-VAE run of a latent model (missing, not a Γ-VAE run, no checkpoint, its checkpoint gone or
    changed, another latent size or image size), the network settings, the length, the device
    and the engine's settings (``TrainConfig.validate``), and on CUDA a ``--batch-gpu`` whose
    estimated peak memory does not fit the device's free memory (:mod:`edmcli.runs.memory`)."""
    check_model_name(model)
    values = resolve("diffusion", preset, overrides, defaults=preset_row(model, preset).training)
    unet = {k: values[k] for k in UNET_SETTINGS if values.get(k) is not None}
    precond = {k: values[k] for k in PRECOND_SETTINGS if values.get(k) is not None}
    run = Path(run) if run is not None else Path("runs") / model
    class_cond, class_dropout = class_settings(values, data)
    if class_cond is not None:
        unet["num_classes"] = CLASS_CONDITIONS[class_cond]
    settings, vae_ref = diffusion_run_settings(
        model, data, preset, vae, unet, precond, run=run,
        latent_norm=values.get("latent_norm"), latent_outside=values.get("latent_outside"),
    )  # fmt: skip
    settings.class_cond, settings.class_dropout = class_cond, class_dropout
    settings.loss = noise_level_settings(values, model)
    if values.get("augment") is not None:
        settings.augment = bool(values["augment"])
    n_train = len(DatasetStore(data).indices("train"))
    train_config = TrainConfig.from_values(values, training_steps(values, n_train), precision, seed)
    resolved = {"kind": "diffusion", **settings_dict(settings),
                **train_config_dict(train_config)}  # fmt: skip
    placement = place(run, device, train_config)
    vae_config = vae_ref.settings.model_config() if vae_ref is not None else None
    memory = training_check(
        placement.device_name,
        lambda: diffusion_training_memory(
            settings, vae_config, precision=precision, world_size=placement.world_size,
            resuming=placement.resumes_from is not None,
        ),
        batch=train_config.batch, batch_gpu=train_config.batch_gpu,
        world_size=placement.world_size,
    )  # fmt: skip
    return DiffusionTrainingPlan(model, preset, run, settings, train_config, resolved, n_train,
                                 placement, vae_ref, preview, memory)  # fmt: skip
