"""What the bench measures: a :class:`Target` is one configuration of one model, either a
randomly initialised preset (:func:`preset_target`) or a trained run (:func:`run_target`), with
its FLOPs counted on the meta device (:func:`target_flops`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from edmcli.bench.flops import NetworkFlops, network_flops
from edmcli.bench.scales import CPU_BATCH
from edmcli.models.gamma_vae import GammaVAE
from edmcli.models.registry import build_model, get_spec, preset_row
from edmcli.runs.diffusion_run import (
    DiffusionSettings,
    build_network,
    diffusion_vae_ref,
    load_diffusion_run,
    resolve_run,
)
from edmcli.runs.folder import load_run_config
from edmcli.runs.vae_run import VAESettings
from edmcli.settings import PRESETS, VAE_ARCHITECTURE, generator_recipe

__all__ = ["Target", "preset_target", "run_target", "target_flops"]


@dataclass
class Target:
    """One configuration of one model to measure.

    Attributes:
        label: its name in tables and plots (the model name, or the run folder's name).
        model: the registry name.
        preset: ``paper``, ``tiny`` or ``run``.
        image_size: pixels of the images (and label maps).
        net_size: side of the network input (pixels or latent).
        meta_net: builds the preconditioned network (called under the meta device: FLOPs).
        load_net: the network on a device, eval mode (random or trained weights).
        meta_vae: builds the Γ-VAE (meta device) for latent models, else None.
        load_vae: the Γ-VAE on a device, for latent models, else None.
        channels: channels of the network's input (a C-channel Γ-VAE's latent: C).
        weights: ``"random"`` or where trained weights came from.
        nfes: NFEs of the throughput curve.
        batch: images per batch; None: auto-sized (CUDA).
        batch_sizing: how ``batch`` was auto-sized (CUDA, when sized before measuring), else
            None.
    """

    label: str
    model: str
    preset: str
    image_size: int
    net_size: int
    meta_net: Callable[[], nn.Module]
    load_net: Callable[[torch.device], nn.Module]
    meta_vae: Callable[[], nn.Module] | None = None
    load_vae: Callable[[torch.device], nn.Module] | None = None
    channels: int = 1
    weights: str = "random"
    nfes: list[int] = field(default_factory=list)
    batch: int | None = None
    batch_sizing: dict | None = None


def target_flops(target: Target) -> NetworkFlops:
    """The target network's FLOPs per sample (:func:`network_flops`, on meta)."""
    return network_flops(target.meta_net, target.net_size, target.image_size, target.channels)


def _vae_config(preset: str, image_size: int, latent: int, vae: dict | None = None):
    row = PRESETS["vae"][preset]
    settings = VAESettings(
        data="", latent=latent, image_size=image_size, base_channels=row["base_channels"],
        num_res_blocks=row["num_res_blocks"], norm_groups=row["norm_groups"],
        **{k: v for k, v in (vae or {}).items() if k in VAE_ARCHITECTURE},
    )  # fmt: skip
    return settings.model_config()


def _on(device: torch.device, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    with device:
        return build()


def preset_target(
    model: str,
    preset: str,
    nfes: Sequence[int],
    batch: int | None,
    generator: str | None = None,
) -> Target:
    """A randomly initialised ``model`` at ``preset``'s configuration; for a latent model with
    ``generator``, the Γ-VAE architecture of that recipe (:data:`edmcli.settings.GENERATORS`:
    its latent channels, a decoder with labels), labelled ``model [generator]``."""
    spec, row = get_spec(model), preset_row(model, preset)
    image_size, net_size = row.image_size, row.net_size
    vae_settings = generator_recipe(generator)["vae"] if generator else {}
    channels = int(vae_settings.get("latent_channels", 1)) if spec.is_latent else 1

    def net() -> torch.nn.Module:
        overrides = {"in_channels": channels} if channels != 1 else {}
        return build_model(model, preset, net_size, **overrides)

    meta_vae = load_vae = None
    if spec.is_latent:
        config = _vae_config(preset, image_size, spec.latent, vae_settings)

        def meta_vae() -> torch.nn.Module:
            return GammaVAE(config)

        def load_vae(device: torch.device) -> torch.nn.Module:
            return _on(device, meta_vae)

    return Target(
        label=f"{model} [{generator}]" if generator else model, model=model, preset=preset,
        image_size=image_size, net_size=net_size, meta_net=net,
        load_net=lambda device: _on(device, net), meta_vae=meta_vae, load_vae=load_vae,
        channels=channels, weights="random (speed does not depend on the weights)",
        nfes=_model_nfes(model, nfes), batch=batch,
    )  # fmt: skip


def run_target(run: Path, nfes: Sequence[int], batch: int | None, device: torch.device) -> Target:
    """The network (EMA weights) and Γ-VAE of a trained diffusion run."""
    model, path = resolve_run(None, run, Path("runs"))
    config = load_run_config(path)
    settings = DiffusionSettings.from_config(config)

    @lru_cache(maxsize=1)
    def loaded():
        return load_diffusion_run(model, path, device)

    latent = get_spec(model).is_latent
    # the Γ-VAE's architecture from its run folder, not by loading the run: meta_vae is called
    # on the meta device (FLOP counting), where loading weights cannot work
    vae_config = diffusion_vae_ref(path, settings).settings.model_config() if latent else None
    if batch is None and device.type != "cuda":
        batch = CPU_BATCH["paper" if settings.preset == "paper" else "tiny"]
    return Target(
        label=path.name, model=model, preset="run", image_size=settings.image_size,
        net_size=settings.net_size, meta_net=lambda: build_network(settings),
        load_net=lambda _device: loaded().net,
        meta_vae=(lambda: GammaVAE(vae_config)) if latent else None,
        load_vae=(lambda _device: loaded().vae.model) if latent else None,
        channels=settings.channels,
        weights=f"trained run {path}", nfes=_model_nfes(model, nfes), batch=batch,
    )  # fmt: skip


def _model_nfes(model: str, nfes: Sequence[int]) -> list[int]:
    """``nfes``, plus the paper's reference NFE for its reference model (sdm: 1000)."""
    reference = get_spec(model).paper_reference_nfe
    return sorted(set(nfes) | ({reference} if reference is not None else set()))
