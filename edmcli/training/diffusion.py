"""Training the six SPADE diffusion models (``echo-synth train-diffusion``).

Pixel models see images mapped to [−1, 1] (black outside the sector = −1); latent models see the
Γ-VAE encoding ``2·E[z] − 1`` of the same (geometrically augmented) images, computed on the fly
with the frozen VAE of the run named by ``--vae``, so the augmentation stays consistent between
image and label map. Label maps stay at pixel resolution: the UNet resizes them (nearest) to each
feature size, and the loss resizes the sector mask to the latent size.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edmcli.data.augment import AugmentConfig, PairedAugment
from edmcli.data.dataset import EchoDataset
from edmcli.data.labels import NUM_CLASSES, OUTSIDE
from edmcli.data.store import DatasetStore
from edmcli.errors import EchoSynthError
from edmcli.models.diffusion_loss import sector_mask_like
from edmcli.models.masked import masked_mean
from edmcli.models.presets import MODEL_NAMES, build_loss, build_precond, is_latent, unet_config
from edmcli.models.unet import SpadeUNetConfig
from edmcli.training.engine import TrainingTask
from edmcli.training.grids import save_image_grid
from edmcli.training.vae import LoadedVAE, load_vae_run

CHECK_SIGMA = 0.5  # the denoising check's noise level (σ_data of EDM: a "moderate" σ)
LATENT_OF_MODEL = {"edm-l64": 64, "edm-l128": 128}


@dataclass
class DiffusionSettings:
    """Everything that defines a diffusion run (written to the run's config.yaml)."""

    model: str
    data: str
    preset: str
    image_size: int  # pixels of the store
    net_size: int  # the UNet's input size: pixels, or the Γ-VAE latent size
    unet: dict[str, Any] = field(default_factory=dict)
    vae_run: str | None = None
    vae_checkpoint: str | None = None
    vae_sha256: str | None = None
    augment: bool = True
    in_memory: bool = True

    def unet_config(self) -> SpadeUNetConfig:
        return SpadeUNetConfig(**self.unet)


def check_model_name(model: str) -> None:
    if model not in MODEL_NAMES:
        raise EchoSynthError(f"--model {model!r} does not exist; valid: {', '.join(MODEL_NAMES)}")


def diffusion_settings(
    model: str, data: Path, preset: str, vae: Path | None, unet_overrides: dict[str, Any]
) -> tuple[DiffusionSettings, LoadedVAE | None]:
    """Validate the model, the store and (for latent models) the Γ-VAE run; build the settings."""
    check_model_name(model)
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
    first = store.labels[: int(store.info.get("samples_per_shard", 64))]
    bad = sorted(set(np.unique(first).tolist()) - set(range(NUM_CLASSES)))
    if bad:
        raise EchoSynthError(
            f"{data} has label values {bad} outside the convention 0..4; rebuild it with "
            "echo-synth prepare"
        )
    loaded = None
    net_size = height
    if is_latent(model):
        if vae is None:
            raise EchoSynthError(
                f"--model {model} runs in the Γ-VAE latent space: pass --vae RUN (train one with "
                f"echo-synth train-vae --latent {LATENT_OF_MODEL[model]})"
            )
        loaded = load_vae_run(vae, torch.device("cpu"))
        if loaded.settings.latent != LATENT_OF_MODEL[model]:
            raise EchoSynthError(
                f"--vae {vae} is a Γ-VAE L{loaded.settings.latent} but {model} needs an "
                f"L{LATENT_OF_MODEL[model]} (train-vae --latent {LATENT_OF_MODEL[model]})"
            )
        if loaded.settings.image_size != height:
            raise EchoSynthError(
                f"--vae {vae} was trained on {loaded.settings.image_size}² images but {data} "
                f"holds {height}² images"
            )
        net_size = loaded.settings.latent_size
    try:
        config = unet_config(model, preset, net_size, **unet_overrides)
        config_dict = asdict(config)
        SpadeUNetConfig(**config_dict)
    except ValueError as exc:
        raise EchoSynthError(f"{model} network settings: {exc}") from None
    settings = DiffusionSettings(
        model=model,
        data=str(Path(data).resolve()),
        preset=preset,
        image_size=height,
        net_size=net_size,
        unet=_plain(config_dict),
        vae_run=str(loaded.run) if loaded else None,
        vae_checkpoint=str(loaded.checkpoint) if loaded else None,
        vae_sha256=loaded.sha256 if loaded else None,
    )
    return settings, loaded


def _plain(value: Any) -> Any:
    """Tuples → lists, so the settings round-trip through YAML unchanged."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def build_network(settings: DiffusionSettings) -> nn.Module:
    config = settings.unet_config()
    return build_precond(settings.model, config)


class DiffusionTask(TrainingTask):
    """One of the six models: geometric augmentation only, loss masked to the sector."""

    def __init__(self, settings: DiffusionSettings, vae: LoadedVAE | None) -> None:
        self.settings = settings
        self.vae = vae
        self.loss_fn = build_loss(settings.model)
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
        sector = (labels != OUTSIDE).unsqueeze(1).float()
        if self.vae is None:
            return image * 2 - 1
        vae = self.vae.model.to(image.device)
        with torch.no_grad():
            return vae.encode(image, sector)

    def loss(self, model, batch, step, epoch):
        labels = batch["labels"]
        target = self.to_model_space(batch["image"], labels)
        loss, logs = self.loss_fn(model, target, labels, labels != OUTSIDE)
        return loss, {"mse": logs["mse"]}

    def _val_batch(self, device: torch.device) -> dict[str, torch.Tensor]:
        if self._val is None:
            split = DatasetStore(self.settings.data).monitoring_split()
            data = EchoDataset(self.settings.data, splits=split)
            items = [data[i] for i in range(min(16, len(data)))]
            self._val = {
                "image": torch.stack([it["image"] for it in items]),
                "labels": torch.stack([it["labels"] for it in items]),
            }
        return {k: v.to(device) for k, v in self._val.items()}

    @torch.no_grad()
    def validate(self, ema_model: nn.Module, step: int) -> dict[str, float]:
        """The denoising check: masked MSE of D(y + σn; σ) against y, and of the noisy input,
        at σ = 0.5 on fixed validation images with fixed noise."""
        device = next(ema_model.parameters()).device
        batch = self._val_batch(device)
        y = self.to_model_space(batch["image"], batch["labels"])
        mask = sector_mask_like(batch["labels"] != OUTSIDE, y)
        g = torch.Generator(device=device).manual_seed(1234)
        noisy = y + CHECK_SIGMA * torch.randn(y.shape, generator=g, device=device)
        sigma = torch.full((y.shape[0],), CHECK_SIGMA, device=device)
        denoised = ema_model(noisy, sigma, batch["labels"]).float()
        mse = float(masked_mean((denoised - y) ** 2, mask))
        noisy_mse = float(masked_mean((noisy - y) ** 2, mask))
        return {"score": -mse, "denoised_mse": mse, "noisy_mse": noisy_mse}

    def report(self, ema_model: nn.Module, step: int, run_dir: Path) -> dict[str, float]:
        """A grid of label maps and quick samples (Euler, 8 steps) on validation label maps."""
        from edmcli.sampling.preview import preview_samples

        device = next(ema_model.parameters()).device
        batch = self._val_batch(device)
        labels = batch["labels"][:8]
        samples = preview_samples(ema_model, labels, self.settings, self.vae, steps=8)
        save_image_grid(
            [batch["image"][:8], labels.unsqueeze(1).float() / 4, samples],
            run_dir / "grids" / f"samples-{step:08d}.png",
        )
        return {}


def settings_dict(settings: DiffusionSettings) -> dict[str, Any]:
    return asdict(settings)
