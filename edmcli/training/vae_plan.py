"""The plan of ``train-vae``: every refusal and every resolved setting before any work.

:func:`plan_train_vae` takes the arguments of :func:`edmcli.training.vae.train_vae` and returns a
:class:`VAETrainingPlan` (the run's settings, its ``config.yaml``, its length in steps, where and on
what it runs); :func:`edmcli.training.vae.run_train_vae` trains it. Planning reads the store's
metadata and the run folder's checkpoint names; it writes nothing, builds no network and draws no
random number.

The plan imports torch: the settings it validates (:class:`~edmcli.runs.vae_run.VAESettings`,
whose model config and loss choices live with the Γ-VAE and LPIPS modules) and the engine's
:class:`~edmcli.training.engine.TrainConfig` live in torch modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edmcli.data.store import DatasetStore
from edmcli.errors import EchoSynthError
from edmcli.models.perceptual import MissingWeightsError, backbone_weights_path, build_perceptual
from edmcli.runs.memory import MemoryCheck, training_check, vae_training_memory
from edmcli.runs.vae_run import VAESettings, settings_dict
from edmcli.settings import resolve, training_steps
from edmcli.training.engine import TrainConfig
from edmcli.training.plan_common import Placement, length_line, place
from edmcli.training.run import train_config_dict

_SETTING_KEYS = (
    "base_channels", "num_res_blocks", "norm_groups", "prior_shape", "prior_rate",
    "kl_direction", "perceptual", "w_recon", "w_perceptual", "w_kl", "w_latent",
    "warmup_epochs", "augment", "latent_channels", "w_spectrum", "decoder_labels",
    "decoder_hidden",
)  # fmt: skip


@dataclass(frozen=True)
class VAETrainingPlan:
    """A planned ``train-vae`` run: ``resolved`` is the ``config.yaml`` it writes (or checks on
    resume); ``train_config.steps`` its length."""

    run: Path
    preset: str
    settings: VAESettings
    train_config: TrainConfig
    resolved: dict[str, Any]
    n_train: int  # training images of the store
    placement: Placement
    memory: MemoryCheck | None = None  # the GPU memory estimate (None off CUDA)

    @property
    def steps(self) -> int:
        return self.train_config.steps

    @property
    def title(self) -> str:
        return f"Γ-VAE L{self.settings.latent}"

    @property
    def network(self) -> str:
        s = self.settings
        return f"{self.title} ({s.image_size}² → {s.latent_size}²)"

    def describe(self) -> list[str]:
        s = self.settings
        lines = [
            f"train-vae: {self.network}, preset {self.preset}, base channels {s.base_channels}, "
            f"perceptual {s.perceptual}",
            self.placement.line(self.run),
            f"data: train split of {s.data}",
            length_line(self.train_config, self.n_train),
        ]
        return lines + ([self.memory.message] if self.memory is not None else [])


def missing_weights(exc: MissingWeightsError) -> EchoSynthError:
    """The one sentence for a missing LPIPS backbone file."""
    return EchoSynthError(f"{exc} (or train with --perceptual none)")


def check_perceptual_weights(net: str) -> None:
    """Refuse a missing LPIPS backbone file now (the training task, which builds the loss, would
    refuse it only after taking the run's lock). :func:`build_perceptual` refuses an absent file
    before building anything; the RNG is forked all the same, so the plan never moves it."""
    if net == "none" or backbone_weights_path(net).is_file():
        return
    with torch.random.fork_rng(devices=[]):
        try:
            build_perceptual(net)
        except MissingWeightsError as exc:
            raise missing_weights(exc) from None


def _settings_config(
    data: Path, latent: int, values: dict[str, Any], seed: int, precision: str
) -> tuple[VAESettings, TrainConfig, int]:
    store = DatasetStore(data)
    height, width = store.image_size
    if height != width:
        raise EchoSynthError(f"{data} has non-square images ({height}×{width})")
    n_train = len(store.indices("train"))
    if n_train == 0:
        raise EchoSynthError(f"{data} has no training split")
    settings = VAESettings(
        data=str(Path(data).resolve()),
        latent=latent,
        image_size=height,
        **{k: values[k] for k in _SETTING_KEYS if values.get(k) is not None},
    )
    settings.validate()
    steps = training_steps(values, n_train)
    return settings, TrainConfig.from_values(values, steps, precision, seed), n_train


def vae_settings_and_config(
    data: Path, latent: int, values: dict[str, Any], seed: int, precision: str
) -> tuple[VAESettings, TrainConfig]:
    """Resolved settings → (VAESettings, TrainConfig), validated against the store."""
    settings, train_config, _ = _settings_config(data, latent, values, seed, precision)
    return settings, train_config


def plan_train_vae(
    data: Path,
    latent: int,
    *,
    run: Path | None = None,
    preset: str = "paper",
    precision: str = "auto",
    device: str = "auto",
    seed: int = 0,
    **overrides: Any,
) -> VAETrainingPlan:
    """The plan of :func:`edmcli.training.vae.train_vae` (same arguments). Refuses, in the
    stage's order: the preset and settings, the store (missing, incomplete, non-square, no
    training split), the Γ-VAE settings, the length, the device, the engine's settings
    (``TrainConfig.validate``), a missing LPIPS weights file, and on CUDA a ``--batch-gpu`` whose
    estimated peak memory does not fit the device's free memory (:mod:`edmcli.runs.memory`)."""
    values = resolve("vae", preset, overrides)
    settings, train_config, n_train = _settings_config(data, latent, values, seed, precision)
    resolved = {"kind": "vae", "preset": preset, **settings_dict(settings),
                **train_config_dict(train_config)}  # fmt: skip
    run = Path(run) if run is not None else Path("runs") / f"vae-l{latent}"
    placement = place(run, device, train_config)
    check_perceptual_weights(settings.perceptual)
    memory = training_check(
        placement.device_name,
        lambda: vae_training_memory(
            settings, precision=precision, world_size=placement.world_size,
            resuming=placement.resumes_from is not None,
        ),
        batch=train_config.batch, batch_gpu=train_config.batch_gpu,
        world_size=placement.world_size,
    )  # fmt: skip
    return VAETrainingPlan(run, preset, settings, train_config, resolved, n_train, placement,
                           memory)  # fmt: skip
