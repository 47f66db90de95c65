"""A Γ-VAE run: its settings (``config.yaml``) and loading its frozen EMA weights.

Shared by training (the latent diffusion models encode with it), sampling (decoding) and
evaluation; it knows nothing of the training engine.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from edmcli.errors import EchoSynthError
from edmcli.models.gamma_kl import KL_DIRECTIONS
from edmcli.models.gamma_vae import GammaVAE, GammaVAEConfig
from edmcli.models.perceptual import PERCEPTUAL_BACKBONES
from edmcli.models.vae_loss import GammaVAELossWeights
from edmcli.runs.checkpoint import file_sha256, find_checkpoint, latest_checkpoint, load_checkpoint
from edmcli.runs.folder import load_run_config

LATENT_CHOICES = (64, 128)
MAX_LATENT_CHANNELS = 16  # SD's and EDM2's autoencoders use 4; more codes nearly pixels at L128
# ``lpips`` names the perceptual loss by its package: LPIPS on AlexNet (its default) or VGG16.
PERCEPTUAL_ALIASES = {"lpips": "alex", "lpips-alex": "alex", "lpips-vgg": "vgg"}


@dataclass
class VAESettings:
    """Everything that defines a Γ-VAE run (written to the run's config.yaml)."""

    data: str
    latent: int  # the paper's name: latent side at 256² (64 → 4× down, 128 → 2× down)
    image_size: int = 256
    base_channels: int = 64
    num_res_blocks: int = 2
    norm_groups: int = 32
    prior_shape: float = 3.75
    prior_rate: float = 10.8
    kl_direction: str = "posterior-first"
    perceptual: str = "alex"
    w_recon: float = 10.0
    w_perceptual: float = 1e-3
    w_kl: float = 1e-3
    w_latent: float = 1e-2
    w_spectrum: float = 0.0  # beyond the paper: train-vae --w-spectrum (models.spectrum)
    warmup_epochs: int = 5
    latent_channels: int = 1  # C, the paper's 1 (train-vae --latent-channels)
    decoder_labels: bool = False  # beyond the paper: train-vae --decoder-labels
    decoder_hidden: int | None = None  # its SPADE width (None: the deepest level's channels)
    augment: bool = True
    in_memory: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def latent_size(self) -> int:
        return self.image_size * self.latent // 256

    def model_config(self) -> GammaVAEConfig:
        return GammaVAEConfig(
            image_size=self.image_size,
            latent_size=self.latent_size,
            base_channels=self.base_channels,
            num_res_blocks=self.num_res_blocks,
            norm_num_groups=self.norm_groups,
            prior_shape=self.prior_shape,
            prior_rate=self.prior_rate,
            latent_channels=self.latent_channels,
            decoder_labels=self.decoder_labels,
            decoder_hidden=self.decoder_hidden,
        )

    def loss_weights(self) -> GammaVAELossWeights:
        """The loss weights λ1..λ4 (and the spectrum term's) of the run."""
        return GammaVAELossWeights(self.w_recon, self.w_perceptual, self.w_kl, self.w_latent,
                                   self.w_spectrum)  # fmt: skip

    def validate(self) -> None:
        if self.latent not in LATENT_CHOICES:
            raise EchoSynthError(
                f"--latent {self.latent} is not a Γ-VAE size: 64 (EDM-L64, 4× downsampling) "
                "or 128 (EDM-L128, 2× downsampling)"
            )
        factor = 256 // self.latent
        if self.image_size % factor:
            raise EchoSynthError(
                f"--latent {self.latent} downsamples {factor}× but the store's image size "
                f"{self.image_size} is not divisible by {factor}"
            )
        self.perceptual = PERCEPTUAL_ALIASES.get(self.perceptual, self.perceptual)
        if self.perceptual not in PERCEPTUAL_BACKBONES:
            raise EchoSynthError(
                f"--perceptual {self.perceptual!r} is unknown; choose from "
                + ", ".join([*PERCEPTUAL_BACKBONES, *PERCEPTUAL_ALIASES])
            )
        if self.kl_direction not in KL_DIRECTIONS:
            raise EchoSynthError(
                f"--kl-direction {self.kl_direction!r}: choose from {', '.join(KL_DIRECTIONS)}"
            )
        if not 1 <= self.latent_channels <= MAX_LATENT_CHANNELS:
            raise EchoSynthError(
                f"--latent-channels {self.latent_channels} must be in 1..{MAX_LATENT_CHANNELS}"
            )
        try:
            self.model_config().validate()
            self.loss_weights().validate()
        except ValueError as exc:
            raise EchoSynthError(f"Γ-VAE settings: {exc}") from None


def settings_dict(settings: VAESettings) -> dict[str, Any]:
    out = asdict(settings)
    out.pop("extra")
    return out


LATENT_STATS_FILE = "latent_stats.json"


def save_latent_stats(run: Path, stats: dict[str, Any]) -> None:
    """Record the statistics of a Γ-VAE run's encoded training latents."""
    (Path(run) / LATENT_STATS_FILE).write_text(json.dumps(stats, indent=2))


def load_latent_stats(run: Path) -> dict[str, Any] | None:
    """The recorded latent statistics of a Γ-VAE run, or None for a run that predates them."""
    path = Path(run) / LATENT_STATS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


@dataclass
class LoadedVAE:
    """A trained Γ-VAE run, ready to encode/decode (EMA weights, eval mode, frozen)."""

    model: GammaVAE
    settings: VAESettings
    run: Path
    checkpoint: Path
    sha256: str


@dataclass(frozen=True)
class VAERunRef:
    """A Γ-VAE run and the checkpoint chosen in it, checked from its files alone (config, the
    checkpoint's presence and hash); nothing loaded. :func:`open_vae_run` loads it."""

    settings: VAESettings
    run: Path  # as given
    checkpoint: Path  # as found
    sha256: str


def find_vae_run(run: Path, checkpoint: Path | None = None, sha256: str | None = None) -> VAERunRef:
    """The checks of :func:`load_vae_run` that need no weights: a ``train-vae`` run, its newest
    checkpoint (or ``checkpoint``, checked against ``sha256`` when given)."""
    run = Path(run)
    config = load_run_config(run)
    if config.get("kind") != "vae":
        raise EchoSynthError(f"{run} is not a Γ-VAE run (it is a {config.get('kind')!r} run)")
    known = set(VAESettings.__dataclass_fields__) - {"extra"}
    settings = VAESettings(**{k: v for k, v in config.items() if k in known})
    checkpoint = (
        find_checkpoint(checkpoint, run) if checkpoint is not None else latest_checkpoint(run)
    )
    if checkpoint is None:
        raise EchoSynthError(f"Γ-VAE run {run} has no checkpoint yet; train it first")
    if not checkpoint.is_file():
        raise EchoSynthError(f"the Γ-VAE checkpoint {checkpoint} no longer exists")
    digest = file_sha256(checkpoint)
    if sha256 is not None and digest != sha256:
        raise EchoSynthError(
            f"the Γ-VAE checkpoint {checkpoint} changed since the diffusion model was trained "
            "(its hash differs)"
        )
    return VAERunRef(settings, run, checkpoint, digest)


def open_vae_run(ref: VAERunRef, device: torch.device) -> LoadedVAE:
    """Build the Γ-VAE of ``ref`` and load its checkpoint's EMA weights."""
    model = GammaVAE(ref.settings.model_config())
    try:
        model.load_state_dict(load_checkpoint(ref.checkpoint, "cpu")["ema"])
    except RuntimeError as exc:  # weights of another architecture than the run's settings say
        first = str(exc).splitlines()[1].strip() if "\n" in str(exc) else str(exc)
        raise EchoSynthError(
            f"the Γ-VAE checkpoint {ref.checkpoint} does not fit the settings of its run "
            f"{ref.run} ({first}); it was written by another version or another configuration"
        ) from None
    model = model.to(device).eval().requires_grad_(False)
    return LoadedVAE(model, ref.settings, ref.run.resolve(), ref.checkpoint.resolve(), ref.sha256)


def load_vae_run(
    run: Path, device: torch.device, checkpoint: Path | None = None, sha256: str | None = None
) -> LoadedVAE:
    """Load the EMA weights of a ``train-vae`` run: its newest checkpoint, or ``checkpoint``
    (checked against ``sha256`` when given: a latent model must decode with its own VAE)."""
    return open_vae_run(find_vae_run(run, checkpoint, sha256), device)
