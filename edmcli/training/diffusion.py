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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edmcli.console import console
from edmcli.data.augment import AugmentConfig, PairedAugment
from edmcli.data.dataset import EchoDataset
from edmcli.data.labels import sector_mask
from edmcli.data.store import DatasetStore
from edmcli.models.masked import masked_mean
from edmcli.models.registry import build_loss, loss_settings
from edmcli.runs.diffusion_run import DiffusionSettings, build_network, class_ids
from edmcli.runs.distributed import process_layout
from edmcli.runs.folder import Dependency
from edmcli.runs.grids import save_image_grid
from edmcli.runs.memory import VALIDATION_CHUNK
from edmcli.runs.vae_run import LoadedVAE, open_vae_run
from edmcli.training.diffusion_plan import (
    DiffusionTrainingPlan,
    PreviewFn,
    plan_train_diffusion,
)
from edmcli.training.engine import TrainingTask
from edmcli.training.run import train_run

__all__ = [
    "DiffusionTask",
    "class_drop_mask",
    "last_validation",
    "run_train_diffusion",
    "train_diffusion",
    "vae_dependencies",
]

CHECK_SIGMA = 0.5  # the denoising check's noise level (σ_data of EDM: a "moderate" σ)
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
        self.loss_fn = build_loss(
            settings.model, **loss_settings(settings.model, settings.precond), **settings.loss
        )
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
        """Images in [0, 1] → the diffusion space: pixels in [−1, 1] or Γ-VAE latents (mapped by
        the run's latent normalisation, :mod:`edmcli.models.latent_norm`)."""
        sector = sector_mask(labels)
        if self.vae is None:
            return image * 2 - 1
        vae = self.vae.model.to(image.device)
        with torch.no_grad():
            latent = vae.encode(image, sector)
            return self.settings.norm.normalise(latent, vae.latent_sector(sector))

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
        denoised = torch.cat([
            ema_model(noisy[i : i + VALIDATION_CHUNK], sigma[i : i + VALIDATION_CHUNK],
                      batch["labels"][i : i + VALIDATION_CHUNK],
                      **{k: v[i : i + VALIDATION_CHUNK] for k, v in extra.items()}).float()
            for i in range(0, y.shape[0], VALIDATION_CHUNK)
        ])  # fmt: skip
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
        classes = self.class_labels(batch)  # the images' own classes, never the null class
        classes = None if classes is None else classes[:8]
        samples = self.preview(ema_model, labels, self.settings, self.vae, classes)
        save_image_grid(
            [batch["image"][:8], labels.unsqueeze(1).float() / 4, samples],
            run_dir / "grids" / f"samples-{step:08d}.png",
        )
        return {}


def run_train_diffusion(plan: DiffusionTrainingPlan) -> dict[str, Any] | None:
    """Train (or resume) the planned diffusion run: load its Γ-VAE (a latent model), then train;
    returns the run's summary on the main rank. On CUDA it first prints the plan's GPU memory
    estimate."""
    settings = plan.settings
    if plan.memory is not None and process_layout()[1] == 0:
        console.print(plan.memory.message, highlight=False)
    loaded_vae = open_vae_run(plan.vae, torch.device("cpu")) if plan.vae is not None else None

    def make_task(env):
        if loaded_vae is not None:
            loaded_vae.model.to(env.device)
        return DiffusionTask(settings, loaded_vae, plan.preview, seed=plan.train_config.seed)

    return train_run(
        run=plan.run,
        device=plan.placement.device,
        resolved=plan.resolved,
        data=settings.data,
        train_config=plan.train_config,
        make_task=make_task,
        describe=plan.network,
        report=lambda run, env: last_validation(run),
        title=plan.model,
        head={"model": plan.model, **_sigma_data_head(settings), **_class_head(settings)},
        depends_on=vae_dependencies(settings),
    )


def vae_dependencies(settings: DiffusionSettings) -> list[Dependency]:
    """The Γ-VAE checkpoint a latent run is built on (frozen into the run), none for pixels."""
    if settings.vae_run is None:
        return []
    return [Dependency("vae", Path(settings.vae_run), Path(settings.vae_checkpoint),
                       settings.vae_sha256)]  # fmt: skip


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
    plan = plan_train_diffusion(model, data, vae=vae, run=run, preset=preset,
                                precision=precision, device=device, seed=seed, preview=preview,
                                **overrides)  # fmt: skip
    return run_train_diffusion(plan)


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
