"""Architectures and losses of the six generative models (DESIGN.md), by name and preset.

| name | space | preconditioning | ``paper`` UNet (default size) |
|---|---|---|---|
| ``sdm`` | pixels | DDPM eps | ADM (SDM): 256 ch, 1-1-2-2-4-4, 2 blocks, attn 32/16/8 (256) |
| ``edm`` | pixels | EDM | ADM: 192 ch, 1-2-3-4, 3 blocks, attn 32/16/8 (256) |
| ``ve`` | pixels | VE | NCSN++-style: 128 ch, 2-2-2, 4 blocks, attn 16, Fourier (256) |
| ``vp`` | pixels | VP | DDPM++-style: 128 ch, 2-2-2, 4 blocks, attn 16 (256) |
| ``edm-l128`` | Gamma-VAE latent | EDM | as ``edm`` (128) |
| ``edm-l64`` | Gamma-VAE latent | EDM | as ``edm`` (64) |

SPADE sits in the middle and decoder blocks in every ``paper`` preset (the authors' code; SDM's
"middle and output blocks"). The ``paper`` EDM networks reproduce the authors' parameter counts
(REFERENCE.md: 359 M at 256², 374 M at 128², 382 M at 64²). The DDPM++/NCSN++-style networks
keep the layout of :class:`~edmcli.models.unet.SpadeUNet` with those architectures' widths,
depth, attention resolution, skip scale, additive noise embedding and (NCSN++) Fourier features;
at 256² with three levels their only attention is the middle block at 64², as in the authors'
configuration.

The ``tiny`` presets (32 ch, mult 1-2, 1 block, attention at the lowest level only) train on a CPU
in minutes: 64² pixels, or 32²/16² latents for ``edm-l128``/``edm-l64``.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any

from torch import nn

from edmcli.models.diffusion_loss import DDPMLoss, DiffusionLoss, EDMLoss, VELoss, VPLoss
from edmcli.models.preconditioning import DDPMEpsModel, EDMPrecond, VEPrecond, VPPrecond
from edmcli.models.unet import SpadeUNet, SpadeUNetConfig

__all__ = [
    "MODEL_NAMES",
    "PRESET_NAMES",
    "build_loss",
    "build_model",
    "build_precond",
    "default_image_size",
    "is_latent",
    "unet_config",
]

MODEL_NAMES = ("sdm", "edm", "ve", "vp", "edm-l128", "edm-l64")
PRESET_NAMES = ("paper", "tiny")

_PRECONDS: dict[str, type[nn.Module]] = {
    "sdm": DDPMEpsModel,
    "edm": EDMPrecond,
    "ve": VEPrecond,
    "vp": VPPrecond,
    "edm-l128": EDMPrecond,
    "edm-l64": EDMPrecond,
}
_LOSSES: dict[str, type] = {
    "sdm": DDPMLoss,
    "edm": EDMLoss,
    "ve": VELoss,
    "vp": VPLoss,
    "edm-l128": EDMLoss,
    "edm-l64": EDMLoss,
}
_IMAGE_SIZE = {
    "paper": {"edm-l128": 128, "edm-l64": 64},
    "tiny": {"edm-l128": 32, "edm-l64": 16},
}
_PIXEL_SIZE = {"paper": 256, "tiny": 64}

_SQRT_HALF = math.sqrt(0.5)
_ADM = dict(
    model_channels=192,
    channel_mult=(1, 2, 3, 4),
    num_blocks=3,
    attention_resolutions=(32, 16, 8),
    dropout=0.1,
    attention_head_channels=64,
)
_SDM = dict(
    model_channels=256,
    channel_mult=(1, 1, 2, 2, 4, 4),
    num_blocks=2,
    attention_resolutions=(32, 16, 8),
    dropout=0.0,
    attention_head_channels=64,
)
_SONG = dict(
    model_channels=128,
    channel_mult=(2, 2, 2),
    num_blocks=4,
    attention_resolutions=(16,),
    dropout=0.1,
    attention_head_channels=None,
    adaptive_scale=False,
    skip_scale=_SQRT_HALF,
    eps=1e-6,
)
_NCSNPP = dict(_SONG, embedding="fourier", noise_mult=2)
_DDPMPP = dict(_SONG, embedding="positional")
_TINY = dict(
    model_channels=32,
    channel_mult=(1, 2),
    num_blocks=1,
    attention_resolutions=(),
    dropout=0.0,
    attention_head_channels=32,
    spade_hidden=32,
)
_ARCH = {
    "paper": {
        "sdm": _SDM,
        "edm": _ADM,
        "ve": _NCSNPP,
        "vp": _DDPMPP,
        "edm-l128": _ADM,
        "edm-l64": _ADM,
    },
    "tiny": {
        "sdm": _TINY,
        "edm": _TINY,
        "ve": dict(
            _TINY, embedding="fourier", noise_mult=2, adaptive_scale=False, skip_scale=_SQRT_HALF
        ),
        "vp": dict(_TINY, adaptive_scale=False, skip_scale=_SQRT_HALF),
        "edm-l128": _TINY,
        "edm-l64": _TINY,
    },
}


def _check_name(name: str) -> None:
    if name not in MODEL_NAMES:
        raise ValueError(f"Unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}.")


def _check_preset(preset: str) -> None:
    if preset not in PRESET_NAMES:
        raise ValueError(f"Unknown preset {preset!r}; valid presets: {', '.join(PRESET_NAMES)}.")


def is_latent(name: str) -> bool:
    """True for the models that run in the Gamma-VAE latent space."""
    _check_name(name)
    return name.startswith("edm-l")


def default_image_size(name: str, preset: str) -> int:
    """Network input size of ``name`` under ``preset``: pixels, or the latent size."""
    _check_name(name)
    _check_preset(preset)
    return _IMAGE_SIZE[preset].get(name, _PIXEL_SIZE[preset])


def _init_params(cls: type, skip: tuple[str, ...] = ("self",)) -> set[str]:
    params = inspect.signature(cls.__init__).parameters.values()
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name for p in params if p.kind in named and p.name not in skip}


def _precond_params(name: str) -> set[str]:
    return _init_params(_PRECONDS[name], skip=("self", "net"))


def _split_overrides(name: str, overrides: dict[str, Any]) -> tuple[dict, dict]:
    unet_fields = {f.name for f in dataclasses.fields(SpadeUNetConfig)}
    precond_fields = _precond_params(name)
    unknown = sorted(set(overrides) - unet_fields - precond_fields)
    if unknown:
        raise ValueError(
            f"Unknown override(s) {unknown} for model {name!r}; valid: UNet fields "
            f"{sorted(unet_fields)} or preconditioning parameters {sorted(precond_fields)}."
        )
    unet = {k: v for k, v in overrides.items() if k in unet_fields}
    precond = {k: v for k, v in overrides.items() if k in precond_fields}
    return unet, precond


def unet_config(
    name: str, preset: str = "tiny", image_size: int | None = None, **overrides: Any
) -> SpadeUNetConfig:
    """The :class:`SpadeUNetConfig` of model ``name`` under ``preset`` (``"paper"`` or
    ``"tiny"``), at ``image_size`` (default :func:`default_image_size`), with UNet field
    ``overrides``."""
    _check_name(name)
    _check_preset(preset)
    unet, precond = _split_overrides(name, overrides)
    if precond:
        raise ValueError(
            f"unet_config takes UNet fields only; {sorted(precond)} belong to the "
            f"preconditioning (use build_model)."
        )
    size = default_image_size(name, preset) if image_size is None else image_size
    values = {**_ARCH[preset][name], "image_size": size, "in_channels": 1, "out_channels": 1}
    values.update(unet)
    return SpadeUNetConfig(**values)


def build_precond(name: str, config: SpadeUNetConfig, **precond_kwargs: Any) -> nn.Module:
    """Preconditioned model ``name`` around a new :class:`SpadeUNet` built from ``config`` (e.g.
    the config stored with a run), with preconditioning parameters ``precond_kwargs``."""
    _check_name(name)
    unknown = sorted(set(precond_kwargs) - _precond_params(name))
    if unknown:
        raise ValueError(
            f"Unknown preconditioning parameter(s) {unknown} for model {name!r}; valid: "
            f"{sorted(_precond_params(name))}."
        )
    return _PRECONDS[name](SpadeUNet(config), **precond_kwargs)


def build_model(
    name: str, preset: str = "tiny", image_size: int | None = None, **overrides: Any
) -> nn.Module:
    """Preconditioned network of model ``name`` (:class:`EDMPrecond`, :class:`VEPrecond`,
    :class:`VPPrecond` or :class:`DDPMEpsModel`) under ``preset``.

    ``overrides`` are :class:`SpadeUNetConfig` fields (``dropout=0.0``, ``spade_placement="all"``)
    or parameters of the preconditioning (``sigma_data=...``). Build under
    ``torch.device("meta")`` to inspect a paper-size network without allocating it.
    """
    _check_name(name)
    _check_preset(preset)
    unet, precond = _split_overrides(name, overrides)
    return build_precond(name, unet_config(name, preset, image_size, **unet), **precond)


def build_loss(name: str, **kwargs: Any) -> DiffusionLoss:
    """Training loss of model ``name`` with its default constants (``kwargs`` override them)."""
    _check_name(name)
    cls = _LOSSES[name]
    valid = _init_params(cls)
    unknown = sorted(set(kwargs) - valid)
    if unknown:
        raise ValueError(
            f"Unknown loss parameter(s) {unknown} for model {name!r}; valid: {sorted(valid)}."
        )
    return cls(**kwargs)
