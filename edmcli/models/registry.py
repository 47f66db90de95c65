"""The one registry of generative models: a :class:`ModelSpec` per model name.

Everything that asks "is this a latent model", "which solver, schedule or NFE by default",
"which preconditioning and loss", "which batch does the paper train with", "which UNet under a
preset" or "which model is the paper's throughput reference" asks the spec (:func:`get_spec`,
:func:`paper_reference`). Adding a model is one :func:`register_model` call with its classes;
nothing else in the package names models.

| name | space | precond. | ``paper`` UNet (default size) | solver, schedule, NFE |
|---|---|---|---|---|
| ``sdm`` | pixels | DDPM ε, Σ | ADM: 256 ch, 1-1-2-2-4-4, 2 blocks, attn 32/16/8 | DDPM, 1000 |
| ``edm`` | pixels | EDM | ADM: 192 ch, 1-2-3-4, 3 blocks, attn 32/16/8 (256) | Heun, EDM ρ=7, 35 |
| ``ve`` | pixels | VE | NCSN++: 128 ch, 2-2-2, 4 blocks, attn 16, Fourier | Heun, EDM ρ=7, 35 |
| ``vp`` | pixels | VP | DDPM++-style: 128 ch, 2-2-2, 4 blocks, attn 16 (256) | Heun, EDM ρ=7, 35 |
| ``edm-l128`` | Γ-VAE latent (128 at 256²) | EDM | as ``edm`` (128) | Heun, EDM ρ=7, 35 |
| ``edm-l64`` | Γ-VAE latent (64 at 256²) | EDM | as ``edm`` (64) | Heun, EDM ρ=7, 35 |

``sdm`` is the published SDM configuration (echo_from_noise): 1000 steps of the cosine schedule,
learned variance (the UNet outputs ε and v; hybrid loss), x₀ clipped to [−1, 1] while sampling
(:attr:`ModelSpec.precond_defaults`); ``noise_schedule="linear"``, ``learn_sigma=False``,
``clip_denoised=False`` give the original DDPM. SDM at these 1000 steps is the reference of the
paper's throughput study (section IV.C, Fig. 4; :attr:`ModelSpec.paper_reference_nfe`). The
EDM ρ = 7 schedule of ``ve`` and ``vp`` is EDM's σ range 0.002–80 clipped to the network's (VE
0.02–80, VP 0.002–80), the default of the authors' ``generatev2.py``; their native Table-1
schedules stay available by name.

SPADE sits in the middle and decoder blocks in every ``paper`` preset (the authors' code; SDM's
"middle and output blocks"). The ``paper`` EDM networks reproduce the authors' parameter counts
(359 M at 256², 374 M at 128², 382 M at 64²; ``docs/reference.md``). The DDPM++/NCSN++-style
networks keep the layout of :class:`~edmcli.models.unet.SpadeUNet` with those architectures'
widths, depth, attention resolution, skip scale, additive noise embedding and (NCSN++) Fourier
features; at 256² with three levels their only attention is the middle block at 64², as in the
authors' configuration. Paper batches: 24 (256² pixels), 54 (128² latent), 120 (64² latent)
(paper section III.E).

The ``tiny`` presets (32 ch, mult 1-2, 1 block, attention at the lowest level only) train on a CPU
in minutes: 64² pixels, or 32²/16² latents for ``edm-l128``/``edm-l64``.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from edmcli.errors import EchoSynthError
from edmcli.models.ddpm import DDPMEpsModel
from edmcli.models.diffusion_loss import DDPMLoss, DiffusionLoss, EDMLoss, VELoss, VPLoss
from edmcli.models.preconditioning import EDMPrecond, VEPrecond, VPPrecond
from edmcli.models.unet import SpadeUNet, SpadeUNetConfig
from edmcli.settings import PIXEL_SIZE, PRESET_NAMES, PRESETS

__all__ = [
    "MODEL_NAMES",
    "ModelSpec",
    "build_loss",
    "build_model",
    "build_precond",
    "default_image_size",
    "precond_settings",
    "get_spec",
    "is_latent",
    "loss_settings",
    "model_names",
    "paper_reference",
    "preset_row",
    "preset_table",
    "PresetRow",
    "register_model",
    "unet_config",
    "unregister_model",
]


@dataclass(frozen=True)
class ModelSpec:
    """What defines one generative model.

    Attributes:
        name: the CLI value (``--model NAME``).
        precond: preconditioning class wrapping a :class:`SpadeUNet` (``cls(net, **kw)``).
        loss: training loss class (:class:`DiffusionLoss`).
        architectures: :class:`SpadeUNetConfig` fields per preset (``image_size`` excluded).
        latent: Γ-VAE latent side at 256² (64 or 128) for latent models, None in pixel space.
        solver: default solver (a name of :data:`edmcli.sampling.solvers.SOLVERS`).
        schedule: default σ schedule (a name of :data:`edmcli.sampling.schedules.SCHEDULES`).
        nfe: default network evaluations per sample of ``echo-synth sample``.
        preview_solver: the few-step solver of the training previews.
        paper_batch: global training batch of the paper (section III.E).
        precond_defaults: preconditioning parameters of the model over the class defaults
            (what :func:`build_model` and a new training run use; a run records them all).
        paper_reference_nfe: the NFE at which this model is the reference of the paper's
            throughput study (``sdm`` at its own 1000 steps; :func:`paper_reference`), None for
            every other model.
    """

    name: str
    precond: type[nn.Module]
    loss: type[DiffusionLoss]
    architectures: Mapping[str, Mapping[str, Any]]
    latent: int | None = None
    solver: str = "heun"
    schedule: str = "edm"
    nfe: int = 35
    preview_solver: str = "euler"
    paper_batch: int = 24
    precond_defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    paper_reference_nfe: int | None = None

    @property
    def is_latent(self) -> bool:
        return self.latent is not None

    def net_size(self, image_size: int) -> int:
        """The network's input side for stores of ``image_size`` pixels."""
        return image_size * self.latent // 256 if self.latent else image_size

    def default_image_size(self, preset: str) -> int:
        _check_preset(preset)
        return self.net_size(PIXEL_SIZE[preset])


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> ModelSpec:
    """Add ``spec`` to the registry (its name must be new); returns it."""
    if spec.name in _REGISTRY:
        raise ValueError(f"A model named {spec.name!r} is already registered.")
    missing = [p for p in PRESET_NAMES if p not in spec.architectures]
    if missing:
        raise ValueError(f"Model {spec.name!r} has no architecture for preset(s) {missing}.")
    _REGISTRY[spec.name] = spec
    return spec


def unregister_model(name: str) -> None:
    """Remove a registered model (tests that register a dummy one)."""
    _REGISTRY.pop(name, None)


def model_names() -> tuple[str, ...]:
    """The registered model names, in registration order."""
    return tuple(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    """The spec of model ``name``; ValueError listing the valid names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"Unknown model {name!r}; valid names: {', '.join(_REGISTRY)}.") from None


def paper_reference() -> ModelSpec:
    """The spec of the paper's throughput reference: the registered model with a
    :attr:`ModelSpec.paper_reference_nfe` (``sdm``)."""
    for spec in _REGISTRY.values():
        if spec.paper_reference_nfe is not None:
            return spec
    raise ValueError("No registered model is the paper's throughput reference.")


@dataclass(frozen=True)
class PresetRow:
    """One row of the (model, preset) table, as EDM's ``config_presets``: what a run of
    ``model`` at ``preset`` builds, trains and samples with unless told otherwise.

    Attributes:
        image_size: the store's side in pixels the preset is sized for (:data:`PIXEL_SIZE`).
        net_size: the network's side (the latent side for latent models).
        architecture: the :class:`SpadeUNetConfig` fields of the preset (``image_size`` aside).
        training: the diffusion training defaults: the preset's row of
            :data:`edmcli.settings.PRESETS` over the paper's batch of the model.
        solver, schedule, nfe: the sampling defaults.
    """

    model: str
    preset: str
    image_size: int
    net_size: int
    architecture: Mapping[str, Any]
    training: Mapping[str, Any]
    solver: str
    schedule: str
    nfe: int


def preset_row(model: str, preset: str) -> PresetRow:
    """The (``model``, ``preset``) row; an unknown preset is the user's error."""
    spec = get_spec(model)
    if preset not in PRESET_NAMES:
        raise EchoSynthError(f"preset {preset!r} is unknown; choose from {', '.join(PRESET_NAMES)}")
    return PresetRow(
        model=model,
        preset=preset,
        image_size=PIXEL_SIZE[preset],
        net_size=spec.default_image_size(preset),
        architecture=dict(spec.architectures[preset]),
        training={"batch": spec.paper_batch, **PRESETS["diffusion"][preset]},
        solver=spec.solver,
        schedule=spec.schedule,
        nfe=spec.nfe,
    )


def preset_table() -> dict[tuple[str, str], PresetRow]:
    """Every (model, preset) row of the registered models."""
    return {(m, p): preset_row(m, p) for m in model_names() for p in PRESET_NAMES}


def _check_preset(preset: str) -> None:
    if preset not in PRESET_NAMES:
        raise ValueError(f"Unknown preset {preset!r}; valid presets: {', '.join(PRESET_NAMES)}.")


def is_latent(name: str) -> bool:
    """True for the models that run in the Gamma-VAE latent space."""
    return get_spec(name).is_latent


def default_image_size(name: str, preset: str) -> int:
    """Network input size of ``name`` under ``preset``: pixels, or the latent size."""
    return get_spec(name).default_image_size(preset)


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
_VE_TINY = dict(
    _TINY, embedding="fourier", noise_mult=2, adaptive_scale=False, skip_scale=_SQRT_HALF
)
_VP_TINY = dict(_TINY, adaptive_scale=False, skip_scale=_SQRT_HALF)

# echo_from_noise's semantic_diffusion_model/config.py: NOISE_SCHEDULE="cosine",
# LEARN_SIGMA=True, CLIP_DENOISED=True, 1000 steps.
SDM_PRECOND = {"noise_schedule": "cosine", "learn_sigma": True, "clip_denoised": True}

# The paper's six models (DESIGN: sdm, edm, ve, vp, edm-l128, edm-l64).
register_model(
    ModelSpec(
        "sdm",
        DDPMEpsModel,
        DDPMLoss,
        {"paper": _SDM, "tiny": _TINY},
        solver="ddpm_ancestral",
        schedule="ddpm",
        nfe=1000,
        preview_solver="ddim",
        paper_batch=24,
        precond_defaults=SDM_PRECOND,
        paper_reference_nfe=1000,
    )
)
register_model(ModelSpec("edm", EDMPrecond, EDMLoss, {"paper": _ADM, "tiny": _TINY}))
register_model(ModelSpec("ve", VEPrecond, VELoss, {"paper": _NCSNPP, "tiny": _VE_TINY}))
register_model(ModelSpec("vp", VPPrecond, VPLoss, {"paper": _DDPMPP, "tiny": _VP_TINY}))
register_model(
    ModelSpec(
        "edm-l128", EDMPrecond, EDMLoss, {"paper": _ADM, "tiny": _TINY}, latent=128, paper_batch=54
    )
)
register_model(
    ModelSpec(
        "edm-l64", EDMPrecond, EDMLoss, {"paper": _ADM, "tiny": _TINY}, latent=64, paper_batch=120
    )
)
MODEL_NAMES = (
    model_names()
)  # the paper's six, as built in (a registered model adds to model_names())


def _init_params(cls: type, skip: tuple[str, ...] = ("self",)) -> set[str]:
    params = inspect.signature(cls.__init__).parameters.values()
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name for p in params if p.kind in named and p.name not in skip}


def _precond_params(name: str) -> set[str]:
    return _init_params(get_spec(name).precond, skip=("self", "net"))


def _check_precond_names(name: str, params: Mapping[str, Any]) -> None:
    unknown = sorted(set(params) - _precond_params(name))
    if unknown:
        raise ValueError(
            f"Unknown preconditioning parameter(s) {unknown} for model {name!r}; valid: "
            f"{sorted(_precond_params(name))}."
        )


def precond_settings(name: str, **overrides: Any) -> dict[str, Any]:
    """Every named preconditioning parameter of model ``name``: the class defaults, then the
    spec's :attr:`ModelSpec.precond_defaults`, then ``overrides`` (what a run records, so that
    :func:`build_precond` rebuilds the same model whatever the defaults become)."""
    spec = get_spec(name)
    _check_precond_names(name, overrides)
    params = inspect.signature(spec.precond.__init__).parameters
    values = {
        key: params[key].default
        for key in sorted(_precond_params(name))
        if params[key].default is not inspect.Parameter.empty
    }
    values.update(spec.precond_defaults)
    values.update(overrides)
    check = getattr(spec.precond, "check_params", None)
    if check is not None:  # refuse values the model cannot be built with, before building it
        names = set(inspect.signature(check).parameters)
        check(**{k: v for k, v in values.items() if k in names})
    return values


def _net_out_channels(name: str, in_channels: int, precond: Mapping[str, Any]) -> int:
    rule = getattr(get_spec(name).precond, "net_out_channels", None)
    return in_channels if rule is None else int(rule(in_channels, **precond))


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
    name: str,
    preset: str = "tiny",
    image_size: int | None = None,
    *,
    precond: Mapping[str, Any] | None = None,
    **overrides: Any,
) -> SpadeUNetConfig:
    """The :class:`SpadeUNetConfig` of model ``name`` under ``preset`` (``"paper"`` or
    ``"tiny"``), at ``image_size`` (default :func:`default_image_size`), with UNet field
    ``overrides``. Its output channels are those the preconditioning needs with the parameters
    ``precond`` (over the spec's defaults; e.g. ε and v for a DDPM with ``learn_sigma``)."""
    spec = get_spec(name)
    _check_preset(preset)
    unet, extra = _split_overrides(name, overrides)
    if extra:
        raise ValueError(
            f"unet_config takes UNet fields only; {sorted(extra)} belong to the "
            f"preconditioning (use build_model, or unet_config(..., precond=...))."
        )
    size = spec.default_image_size(preset) if image_size is None else image_size
    values = {**spec.architectures[preset], "image_size": size, "in_channels": 1}
    values.update(unet)
    if "out_channels" not in unet:
        params = precond_settings(name, **(precond or {}))
        values["out_channels"] = _net_out_channels(name, values["in_channels"], params)
    return SpadeUNetConfig(**values)


def build_precond(name: str, config: SpadeUNetConfig, **precond_kwargs: Any) -> nn.Module:
    """Preconditioned model ``name`` around a new :class:`SpadeUNet` built from ``config`` (e.g.
    the config stored with a run), with exactly the preconditioning parameters
    ``precond_kwargs`` over the class defaults (a run's record; :func:`build_model` adds the
    spec's :attr:`ModelSpec.precond_defaults`)."""
    spec = get_spec(name)
    _check_precond_names(name, precond_kwargs)
    return spec.precond(SpadeUNet(config), **precond_kwargs)


def build_model(
    name: str, preset: str = "tiny", image_size: int | None = None, **overrides: Any
) -> nn.Module:
    """Preconditioned network of model ``name`` (:class:`EDMPrecond`, :class:`VEPrecond`,
    :class:`VPPrecond` or :class:`DDPMEpsModel`) under ``preset``.

    ``overrides`` are :class:`SpadeUNetConfig` fields (``dropout=0.0``, ``spade_placement="all"``)
    or parameters of the preconditioning (``sigma_data=...``; for ``sdm``
    ``noise_schedule="linear"``, ``learn_sigma=False``, ``clip_denoised=False``), which override
    the spec's :attr:`ModelSpec.precond_defaults`. Build under ``torch.device("meta")`` to
    inspect a paper-size network without allocating it.
    """
    get_spec(name)
    _check_preset(preset)
    unet, precond = _split_overrides(name, overrides)
    params = precond_settings(name, **precond)
    config = unet_config(name, preset, image_size, precond=params, **unet)
    return build_precond(name, config, **params)


def loss_parameters(name: str) -> set[str]:
    """The constructor parameters of the training loss of model ``name``."""
    return _init_params(get_spec(name).loss)


def loss_settings(name: str, precond: Mapping[str, Any]) -> dict[str, Any]:
    """The preconditioning settings that the loss of ``name`` shares (e.g. EDM's ``sigma_data``,
    which sets the loss weight), so loss and network agree."""
    valid = _init_params(get_spec(name).loss)
    return {k: v for k, v in precond.items() if k in valid}


def build_loss(name: str, **kwargs: Any) -> DiffusionLoss:
    """Training loss of model ``name`` with its default constants (``kwargs`` override them)."""
    cls = get_spec(name).loss
    valid = _init_params(cls)
    unknown = sorted(set(kwargs) - valid)
    if unknown:
        raise ValueError(
            f"Unknown loss parameter(s) {unknown} for model {name!r}; valid: {sorted(valid)}."
        )
    return cls(**kwargs)
