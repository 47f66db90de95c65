"""Training the Γ-VAE (``echo-synth train-vae``): the engine task and the stage function, planned
first (:mod:`edmcli.training.vae_plan`), then run (:func:`run_train_vae`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from edmcli.console import console
from edmcli.data.augment import AugmentConfig, PairedAugment
from edmcli.data.dataset import EchoDataset
from edmcli.data.labels import sector_mask
from edmcli.data.store import DatasetStore
from edmcli.models.gamma_vae import GammaVAE
from edmcli.models.perceptual import MissingWeightsError, build_perceptual
from edmcli.models.vae_loss import GammaVAELoss
from edmcli.runs.checkpoint import latest_checkpoint, load_checkpoint
from edmcli.runs.distributed import process_layout
from edmcli.runs.grids import save_image_grid
from edmcli.runs.vae_run import VAESettings, save_latent_stats
from edmcli.training.engine import TrainingTask
from edmcli.training.reconstruction import map_following, reconstruction_quality
from edmcli.training.run import train_run
from edmcli.training.vae_plan import (
    VAETrainingPlan,
    missing_weights,
    plan_train_vae,
)

__all__ = [
    "GammaVAETask",
    "run_train_vae",
    "train_vae",
    "latent_statistics",
    "vae_quality",
]


class GammaVAETask(TrainingTask):
    def __init__(self, settings: VAESettings) -> None:
        self.settings = settings
        try:
            perceptual = build_perceptual(settings.perceptual)
        except MissingWeightsError as exc:
            raise missing_weights(exc) from None
        self.loss_fn = GammaVAELoss(
            prior_shape=settings.prior_shape,
            prior_rate=settings.prior_rate,
            weights=settings.loss_weights(),
            kl_direction=settings.kl_direction,
            perceptual=perceptual,
            warmup_epochs=settings.warmup_epochs,
        )
        self._preview: dict[str, torch.Tensor] | None = None

    def build_model(self) -> nn.Module:
        return GammaVAE(self.settings.model_config())

    def train_dataset(self) -> EchoDataset:
        s = self.settings
        dataset = EchoDataset(s.data, splits="train", in_memory=s.in_memory)
        self.augment = PairedAugment(AugmentConfig(), dataset.image_size) if s.augment else None
        return dataset

    def augmentation(self):
        return self.augment

    def loss(self, model, batch, step, epoch):
        image, sector = batch["image"], sector_mask(batch["labels"])
        output = model(image, sector, sample=True, labels=batch["labels"])
        terms = self.loss_fn.to(image.device)(image, sector, output, epoch=epoch)
        total = terms.pop("total")
        return total, terms

    def report(self, ema_model: nn.Module, step: int, run_dir: Path) -> dict[str, float]:
        if self._preview is None:
            split = DatasetStore(self.settings.data).monitoring_split()
            val = EchoDataset(self.settings.data, splits=split)
            items = [val[i] for i in range(min(8, len(val)))]
            self._preview = {
                "image": torch.stack([it["image"] for it in items]),
                "labels": torch.stack([it["labels"] for it in items]),
            }
        device = next(ema_model.parameters()).device
        image, labels = self._preview["image"].to(device), self._preview["labels"].to(device)
        with torch.no_grad():
            recon = ema_model(image, sector_mask(labels), sample=False, labels=labels).recon
        save_image_grid([image, recon], run_dir / "grids" / f"recon-{step:08d}.png")
        return {}


LOW_CORRELATION = 0.5  # below it the latent does not follow the image: say so


def run_train_vae(plan: VAETrainingPlan) -> dict[str, Any] | None:
    """Train (or resume) the planned Γ-VAE run; returns its summary on the main rank. On CUDA
    it first prints the plan's GPU memory estimate."""
    settings = plan.settings
    if plan.memory is not None and process_layout()[1] == 0:
        console.print(plan.memory.message, highlight=False)
    summary = train_run(
        run=plan.run,
        device=plan.placement.device,
        resolved=plan.resolved,
        data=settings.data,
        train_config=plan.train_config,
        make_task=lambda env: GammaVAETask(settings),
        describe=plan.network,
        report=lambda run, env: vae_quality(run, settings, env.device),
        title=plan.title,
    )
    correlation = (summary or {}).get("latent-image correlation")
    if correlation is not None and correlation < LOW_CORRELATION:
        console.print(
            f"warning: the latent correlates {correlation:+.2f} with the downsampled image (a "
            "latent that does not follow the image); raise w_latent (the tiny preset uses 10)",
            highlight=False,
        )
    return summary


def train_vae(
    data: Path,
    latent: int,
    *,
    run: Path | None = None,
    preset: str = "paper",
    precision: str = "auto",
    device: str = "auto",
    seed: int = 0,
    **overrides: Any,
) -> dict[str, Any] | None:
    """Train (or resume) a Γ-VAE run on the train split of ``data``; ``overrides`` are settings
    of :data:`edmcli.settings.PRESETS` ``["vae"]`` (None: the preset decides). Returns the
    run's summary on the main rank."""
    plan = plan_train_vae(data, latent, run=run, preset=preset, precision=precision,
                          device=device, seed=seed, **overrides)  # fmt: skip
    return run_train_vae(plan)


@torch.no_grad()
def latent_statistics(model: GammaVAE, loader, device: torch.device) -> dict[str, Any]:
    """Mean and std of the diffusion latents ``2·E[z] − 1`` that ``model`` encodes from a
    loader's items: inside the latent sector (where the diffusion loss looks: the σ_data of the
    latent models), over all C channels and per channel (``channel_mean``, ``channel_std``), and
    over the whole latent (−1 outside the sector)."""
    channels = model.config.latent_channels
    total = torch.zeros(3, dtype=torch.float64)  # n, sum, sum of squares
    inside = torch.zeros(channels, 3, dtype=torch.float64)
    model.eval()
    for batch in loader:
        image, labels = batch["image"].to(device), batch["labels"].to(device)
        latent = model.encode(image, sector_mask(labels)).double().cpu()
        mask = sector_mask(labels, model.latent_size).bool().cpu()
        total += torch.stack([torch.tensor(latent.numel(), dtype=torch.float64), latent.sum(),
                              latent.square().sum()])  # fmt: skip
        for c in range(channels):
            values = latent[:, c : c + 1][mask]
            inside[c] += torch.stack([torch.tensor(values.numel(), dtype=torch.float64),
                                      values.sum(), values.square().sum()])  # fmt: skip

    def moments(acc: torch.Tensor) -> tuple[float, float]:
        n, s, ss = (float(v) for v in acc)
        mean = s / max(n, 1)
        return mean, max(ss / max(n, 1) - mean * mean, 0.0) ** 0.5

    mean_in, std_in = moments(inside.sum(0))
    mean_all, std_all = moments(total)
    per_channel = [moments(inside[c]) for c in range(channels)]
    return {"sigma_data": std_in, "mean": mean_in, "std_all": std_all, "mean_all": mean_all,
            "latent_pixels": int(inside[0, 0]),
            "channel_mean": [m for m, _ in per_channel],
            "channel_std": [sd for _, sd in per_channel]}  # fmt: skip


def vae_quality(run: Path, settings: VAESettings, device: torch.device) -> dict[str, Any]:
    """Masked PSNR/SSIM of the EMA model on the monitoring split, a comparison grid, and the
    statistics of the encoded training latents (``latent_stats.json``: the σ_data of the latent
    diffusion models trained on this Γ-VAE)."""
    model = GammaVAE(settings.model_config()).to(device)
    model.load_state_dict(load_checkpoint(latest_checkpoint(run), device)["ema"])
    train = EchoDataset(settings.data, splits="train")
    stats = latent_statistics(model, DataLoader(train, batch_size=32), device)
    save_latent_stats(run, stats)
    split = DatasetStore(settings.data).monitoring_split()
    dataset = EchoDataset(settings.data, splits=split)
    quality = reconstruction_quality(model, DataLoader(dataset, batch_size=32), device)
    items = [dataset[i] for i in range(min(8, len(dataset)))]
    image = torch.stack([it["image"] for it in items]).to(device)
    labels = torch.stack([it["labels"] for it in items]).to(device)
    with torch.no_grad():
        out = model(image, sector_mask(labels), sample=False, labels=labels)
    latent = torch.nn.functional.interpolate(out.z[:, :1], size=image.shape[-2:], mode="nearest")
    save_image_grid([image, out.recon, latent.clamp(0, 1)], run / "comparison.png")
    following = {}
    if settings.decoder_labels:  # does the decoder paint the map instead of the latent?
        following = {"map following (0 latent, 1 map)": map_following(model, image, labels)}
    return {
        f"{split} masked PSNR (dB)": quality["psnr"],
        f"{split} masked SSIM": quality["ssim"],
        "identity-to-mean PSNR (dB)": quality["baseline_psnr"],
        "identity-to-mean SSIM": quality["baseline_ssim"],
        "latent-image correlation": quality["latent_correlation"],
        f"{split} images": quality["images"],
        "train latent std in the sector (σ_data)": stats["sigma_data"],
        "train latent mean in the sector": stats["mean"],
        **following,
    }
