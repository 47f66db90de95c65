"""Training the SPADE diffusion models (``echo-synth train-diffusion``).

Pixel models see images mapped to [−1, 1] (black outside the sector = −1); latent models see the
Γ-VAE encoding ``2·E[z] − 1`` of the same (geometrically augmented) images, computed on the fly
with the frozen VAE of the run's ``vae``, so the augmentation stays consistent between image and
label map. Label maps stay at pixel resolution; the UNet and the loss bring them to each size by
the one rule of :mod:`edmcli.data.labels` (area fractions; a sector pixel is one at least half
inside).

Class-conditional runs (``class_cond``: the view, or view and phase, of each image; the paper's
model is map only) train with classifier-free guidance dropout: a sample's class is replaced by
the null class with probability ``class_dropout`` (0.1), decided by :func:`class_drop_mask` from
(seed, step, store row) alone, so a resumed run drops exactly the classes an uninterrupted one
does, whatever the batch split (``batch_gpu``) or the number of processes.

Sample grids while training come from a *preview callback* (``preview(net, labels, settings,
vae) → images``) that the caller passes in, as k-diffusion's samplers take one: training never
imports sampling (the CLI hands in :func:`edmcli.sampling.preview.preview_samples`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edmcli.data.augment import AugmentConfig, PairedAugment
from edmcli.data.dataset import PHASES, EchoDataset, codes
from edmcli.data.labels import VIEWS, sector_mask
from edmcli.data.store import DatasetStore
from edmcli.errors import EchoSynthError
from edmcli.models.masked import masked_mean
from edmcli.models.registry import (
    build_loss,
    get_spec,
    loss_settings,
    precond_settings,
    unet_config,
)
from edmcli.models.unet import SpadeUNetConfig
from edmcli.runs.diffusion_run import (
    CLASS_CONDITIONS,
    CLASS_DROPOUT,
    DiffusionSettings,
    build_network,
    check_class_cond,
    check_model_name,
    class_ids,
)
from edmcli.runs.folder import Dependency, frozen_dependency
from edmcli.runs.grids import save_image_grid
from edmcli.runs.vae_run import LoadedVAE, load_latent_stats, load_vae_run
from edmcli.settings import resolve, training_steps
from edmcli.training.engine import TrainConfig, TrainingTask
from edmcli.training.run import train_config_dict, train_run

CHECK_SIGMA = 0.5  # the denoising check's noise level (σ_data of EDM: a "moderate" σ)
UNET_SETTINGS = ("dropout", "spade_placement", "model_channels")
PRECOND_SETTINGS = ("noise_schedule", "learn_sigma", "clip_denoised", "sigma_data")
PreviewFn = Callable[[nn.Module, torch.Tensor, DiffusionSettings, "LoadedVAE | None"], torch.Tensor]
CLASS_DROP_STREAM = 0xC1A55  # seed stream of the classifier-free guidance dropout


def class_drop_mask(seed: int, step: int, indices: Sequence[int], p: float) -> torch.Tensor:
    """Which samples of training step ``step`` lose their class (classifier-free guidance
    dropout): the sample of store row ``i`` is dropped when u < ``p``, u uniform in [0, 1) drawn
    from its own ``SeedSequence([seed, step, i, stream])``. A pure function of (seed, step, row):
    the same on resume, on any rank and in any micro-batch. Returns a bool tensor (CPU)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must lie in [0, 1], got {p}.")
    states = [
        np.random.SeedSequence([seed, step, int(i), CLASS_DROP_STREAM]).generate_state(1)[0]
        for i in indices
    ]
    u = np.asarray(states, dtype=np.float64) / 2.0**32
    return torch.from_numpy(u < p)


def diffusion_settings(
    model: str,
    data: Path,
    preset: str,
    vae: Path | None,
    unet_overrides: dict[str, Any],
    precond_overrides: dict[str, Any] | None = None,
    run: Path | None = None,
) -> tuple[DiffusionSettings, LoadedVAE | None]:
    """Validate the model, the store and (for latent models) the Γ-VAE run; build the settings."""
    check_model_name(model)
    spec = get_spec(model)
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
    loaded = None
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
            loaded = load_vae_run(frozen.folder, torch.device("cpu"), frozen.checkpoint,
                                  frozen.sha256)  # fmt: skip
            vae_run, vae_checkpoint = frozen.source_run, frozen.source_checkpoint
        else:
            loaded = load_vae_run(vae, torch.device("cpu"))
            vae_run, vae_checkpoint = loaded.run, loaded.checkpoint
        if loaded.settings.latent != spec.latent:
            raise EchoSynthError(
                f"the Γ-VAE run {vae} is an L{loaded.settings.latent} but {model} needs an "
                f"L{spec.latent} (train-vae --latent {spec.latent})"
            )
        if loaded.settings.image_size != height:
            raise EchoSynthError(
                f"the Γ-VAE run {vae} was trained on {loaded.settings.image_size}² images but "
                f"{data} holds {height}² images"
            )
        net_size = loaded.settings.latent_size
    precond_overrides = dict(precond_overrides or {})
    sigma_data_source = None
    if loaded is not None and "sigma_data" in precond_settings(model):
        stats = load_latent_stats(loaded.run)
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
        vae_run=str(vae_run) if loaded else None,
        vae_checkpoint=str(vae_checkpoint) if loaded else None,
        vae_sha256=loaded.sha256 if loaded else None,
        sigma_data_source=sigma_data_source,
    )
    return settings, loaded


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


class DiffusionTask(TrainingTask):
    """One of the six models: geometric augmentation only, loss masked to the sector."""

    def __init__(
        self,
        settings: DiffusionSettings,
        vae: LoadedVAE | None,
        preview: PreviewFn | None = None,
        seed: int = 0,
    ) -> None:
        self.settings = settings
        self.vae = vae
        self.preview = preview
        self.seed = seed
        self.loss_fn = build_loss(settings.model, **loss_settings(settings.model, settings.precond))
        self._val: dict[str, torch.Tensor] | None = None

    def build_model(self) -> nn.Module:
        return build_network(self.settings)

    def train_dataset(self) -> EchoDataset:
        s = self.settings
        dataset = EchoDataset(s.data, splits="train", in_memory=s.in_memory)
        geometric = AugmentConfig(intensity=False)
        self.augment = PairedAugment(geometric, dataset.image_size) if s.augment else None
        return dataset

    def augmentation(self):
        return self.augment

    def to_model_space(self, image: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] → the diffusion space: pixels in [−1, 1] or Γ-VAE latents."""
        sector = sector_mask(labels)
        if self.vae is None:
            return image * 2 - 1
        vae = self.vae.model.to(image.device)
        with torch.no_grad():
            return vae.encode(image, sector)

    def class_labels(self, batch: dict[str, Any], step: int | None = None) -> torch.Tensor | None:
        """The classes of a batch for a class-conditional run (None when map only); with
        ``step`` (training), those of :func:`class_drop_mask` replaced by the null class."""
        s = self.settings
        if not s.class_cond:
            return None
        device = batch["labels"].device
        classes = class_ids(s.class_cond, batch["view"], batch["phase"]).to(device)
        if step is None or not s.class_dropout:
            return classes
        index = torch.as_tensor(batch["index"]).tolist()
        drop = class_drop_mask(self.seed, step, index, s.class_dropout).to(device)
        return torch.where(drop, torch.full_like(classes, s.num_classes), classes)

    def loss(self, model, batch, step, epoch):
        labels = batch["labels"]
        target = self.to_model_space(batch["image"], labels)
        classes = self.class_labels(batch, step)
        loss, logs = self.loss_fn(model, target, labels, sector_mask(labels), class_labels=classes)
        terms = {"mse": logs["mse"]}
        if classes is not None:  # the fraction trained unconditionally (null class)
            terms["null_class"] = (classes == self.settings.num_classes).float().mean()
        return loss, terms

    def _val_batch(self, device: torch.device) -> dict[str, torch.Tensor]:
        if self._val is None:
            split = DatasetStore(self.settings.data).monitoring_split()
            data = EchoDataset(self.settings.data, splits=split)
            items = [data[i] for i in range(min(16, len(data)))]
            self._val = {
                "image": torch.stack([it["image"] for it in items]),
                "labels": torch.stack([it["labels"] for it in items]),
                "view": torch.tensor([it["view"] for it in items]),
                "phase": torch.tensor([it["phase"] for it in items]),
            }
        return {k: v.to(device) for k, v in self._val.items()}

    @torch.no_grad()
    def validate(self, ema_model: nn.Module, step: int) -> dict[str, float]:
        """The denoising check: masked MSE of D(y + σn; σ) against y, and of the noisy input,
        at σ = 0.5 on fixed validation images with fixed noise (class-conditional runs: given
        each image's class)."""
        device = next(ema_model.parameters()).device
        batch = self._val_batch(device)
        y = self.to_model_space(batch["image"], batch["labels"])
        mask = sector_mask(batch["labels"], tuple(y.shape[-2:]))
        g = torch.Generator(device=device).manual_seed(1234)
        noisy = y + CHECK_SIGMA * torch.randn(y.shape, generator=g, device=device)
        sigma = torch.full((y.shape[0],), CHECK_SIGMA, device=device)
        classes = self.class_labels(batch)
        extra = {} if classes is None else {"class_labels": classes}
        denoised = ema_model(noisy, sigma, batch["labels"], **extra).float()
        mse = float(masked_mean((denoised - y) ** 2, mask))
        noisy_mse = float(masked_mean((noisy - y) ** 2, mask))
        return {"score": -mse, "denoised_mse": mse, "noisy_mse": noisy_mse}

    def report(self, ema_model: nn.Module, step: int, run_dir: Path) -> dict[str, float]:
        """A grid of validation images, their label maps and quick samples of the preview
        callback (none without one)."""
        if self.preview is None:
            return {}
        device = next(ema_model.parameters()).device
        batch = self._val_batch(device)
        labels = batch["labels"][:8]
        samples = self.preview(ema_model, labels, self.settings, self.vae)
        save_image_grid(
            [batch["image"][:8], labels.unsqueeze(1).float() / 4, samples],
            run_dir / "grids" / f"samples-{step:08d}.png",
        )
        return {}


def settings_dict(settings: DiffusionSettings) -> dict[str, Any]:
    return asdict(settings)


def train_diffusion(
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
) -> dict[str, Any] | None:
    """Train (or resume) diffusion model ``model`` on the train split of ``data`` (latent
    models: with the Γ-VAE run ``vae``). ``overrides`` are settings of
    :data:`edmcli.settings.PRESETS` ``["diffusion"]`` (None: the preset decides; ``dropout``,
    ``spade_placement`` and ``model_channels`` change the model's UNet; ``class_cond`` ``view`` or
    ``view-phase`` makes it class-conditional, trained with ``class_dropout``). ``preview`` draws
    the sample grids. Returns the run's summary on the main rank."""
    check_model_name(model)
    spec = get_spec(model)
    values = resolve("diffusion", preset, overrides, defaults={"batch": spec.paper_batch})
    unet = {k: values[k] for k in UNET_SETTINGS if values.get(k) is not None}
    precond = {k: values[k] for k in PRECOND_SETTINGS if values.get(k) is not None}
    run = Path(run) if run is not None else Path("runs") / model
    class_cond, class_dropout = class_settings(values, data)
    if class_cond is not None:
        unet["num_classes"] = CLASS_CONDITIONS[class_cond]
    settings, loaded_vae = diffusion_settings(model, data, preset, vae, unet, precond, run=run)
    settings.class_cond, settings.class_dropout = class_cond, class_dropout
    if values.get("augment") is not None:
        settings.augment = bool(values["augment"])
    n_train = len(DatasetStore(data).indices("train"))
    train_config = TrainConfig.from_values(values, training_steps(values, n_train), precision, seed)
    resolved = {"kind": "diffusion", **settings_dict(settings),
                **train_config_dict(train_config)}  # fmt: skip

    def make_task(env):
        if loaded_vae is not None:
            loaded_vae.model.to(env.device)
        return DiffusionTask(settings, loaded_vae, preview, seed=train_config.seed)

    space = "latent" if loaded_vae else "pixels"
    depends_on = []
    if loaded_vae is not None:
        depends_on.append(Dependency("vae", Path(settings.vae_run), Path(settings.vae_checkpoint),
                                     settings.vae_sha256))  # fmt: skip
    return train_run(
        run=run,
        device=device,
        resolved=resolved,
        data=settings.data,
        train_config=train_config,
        make_task=make_task,
        describe=f"{model} ({preset}; {settings.net_size}² {space}"
        + (f"; classes: {class_cond}, dropped with p = {class_dropout}" if class_cond else "")
        + ")",
        report=lambda run, env: last_validation(run),
        title=model,
        head={"model": model, **_sigma_data_head(settings), **_class_head(settings)},
        depends_on=depends_on,
    )


def _sigma_data_head(settings: DiffusionSettings) -> dict[str, Any]:
    """σ_data of a latent model and where it came from, for the summary."""
    if settings.sigma_data_source is None:
        return {}
    return {"σ_data": settings.precond.get("sigma_data"), "σ_data from": settings.sigma_data_source}


def _class_head(settings: DiffusionSettings) -> dict[str, Any]:
    """The class conditioning of a run, for the summary."""
    if not settings.class_cond:
        return {}
    return {"class conditioning": settings.class_cond, "class dropout": settings.class_dropout}


def last_validation(run: Path) -> dict[str, Any]:
    """The last denoising check of a run's metrics log."""
    last: dict[str, Any] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "val/denoised_mse" in record:
            last = record
    if not last:
        return {}
    return {
        f"denoising check at σ=0.5 (step {last['step']}): denoised masked MSE": last[
            "val/denoised_mse"
        ],
        "noisy input masked MSE": last["val/noisy_mse"],
    }
