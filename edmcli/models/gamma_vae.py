"""The Gamma-distribution variational autoencoder (Gamma-VAE) of the EDM-Lx latent models.

The encoder maps a one-channel echo image (N, 1, H, W) in [0, 1] to a posterior
Gamma(alpha, beta) (shape, rate) per element of a latent (N, C, h, w) (the paper: C = 1), with
h = H/2 (2 levels, one downsample: EDM-L128 from 256^2) or h = H/4 (3 levels, two downsamples:
EDM-L64). Encoder and decoder are symmetric cascades of GroupNorm + SiLU residual blocks (MONAI's
``autoencoderkl`` Encoder/Decoder) with 64 * level channels by default.

Posterior. The encoder's last convolution has two output channels, one head each for ``a`` and
``b``; the parameters are ``alpha = prior_shape * softplus(a + ln(e - 1))`` and
``beta = prior_rate * softplus(b + ln(e - 1))``: positive, and equal to the prior where a head
outputs 0 (the authors scale ``softplus(a)`` by the prior in the same way, without the shift).
Both are floored at 1e-4 so that sampling and the KL stay finite.

Latent. While training, z is a reparameterised sample (``torch.distributions.Gamma.rsample``);
for diffusion, z is the posterior mean alpha / beta, deterministic (the authors' encoder replaced
it by a prior sample: not here). z is clamped at >= 1e-7 and multiplied by the latent-size sector
mask, so z = 0 outside the sector: the background keeps its meaning, as black pixels do in the
image. Diffusion works on ``2 z - 1`` (so the background is -1); :meth:`GammaVAE.decode` inverts
it with ``z = (x + 1) / 2``, clamped at the bottom of the Gamma support. The top is not clamped:
the latent term of the loss ties z to the image downsampled to latent size, so z stays near
[0, 1], and clamping would make ``decode(encode(x))`` differ from the reconstruction of the
posterior mean.

Latent-size sector mask (:func:`latent_sector_mask`): the area fraction of the sector inside each
latent pixel's footprint, kept where it is >= 0.5 (:func:`edmcli.data.labels.mask_at`, the one
resize rule of label-derived maps). The same rule serves encoding, decoding and the loss;
:func:`area_downsample` is the matching image downsampling.

Decoder output: ``sigmoid`` of the last convolution, times the pixel sector mask. A sigmoid keeps
the image in [0, 1] (the range LPIPS and the data store expect) with a gradient everywhere; a
clamp would give zero gradient to every pixel pushed outside [0, 1] and could leave such pixels
stuck.

Attention. ``GammaVAEConfig.attention`` adds MONAI's bottleneck block (residual block,
single-head self-attention, residual block) to encoder and decoder. It is off by default: at a
128^2 latent it attends over 16384 tokens and costs 417 of the reference L128 decoder's 501 GFLOP
(docs/reference.md), for a one-channel latent whose content is local (the latent term ties it
pixel-wise to the image).

Decoder labels. ``GammaVAEConfig.decoder_labels`` (beyond the paper: ``train-vae
--decoder-labels``) replaces the decoder by :class:`edmcli.models.label_decoder.LabelDecoder`,
whose norms are SPADE layers fed the label map: :meth:`GammaVAE.decode` and
:meth:`GammaVAE.forward` then need the label map ``labels`` (N, S, S) as well as the sector (which
is ``labels > 0``). The encoder is unchanged; the latent codes what the map does not say.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from edmcli.data.labels import mask_at

__all__ = [
    "GammaVAE",
    "GammaVAEConfig",
    "VAEOutput",
    "area_downsample",
    "latent_sector_mask",
]

Z_MIN = 1e-7
"""Lower clamp of the latent inside the sector (as the authors)."""
PARAM_MIN = 1e-4
"""Floor of the posterior shape and rate."""
_SOFTPLUS_INV_ONE = math.log(math.expm1(1.0))  # softplus(_SOFTPLUS_INV_ONE) == 1


@dataclass(frozen=True)
class GammaVAEConfig:
    """Architecture and prior of a :class:`GammaVAE`.

    Args:
        image_size: side of the square input images (256 for CAMUS, 64 for tiny runs).
        latent_size: side of the square one-channel latent: ``image_size / 2`` (2 levels, e.g.
            EDM-L128) or ``image_size / 4`` (3 levels, e.g. EDM-L64).
        base_channels: channels of the first level; level ``k`` (1-based) has
            ``base_channels * k`` (the paper: 64 * level).
        num_res_blocks: residual blocks per level, in the encoder and in the decoder.
        norm_num_groups: GroupNorm groups; every level's channel count must be a multiple.
        attention: self-attention at the bottleneck (off by default, see the module docstring).
        prior_shape: shape alpha of the Gamma prior (paper: 3.75, grid search on CAMUS).
        prior_rate: rate beta of the Gamma prior (paper: 10.8).
        latent_channels: channels C of the latent (paper: 1), each element with its own Gamma
            posterior; channel 0 is the one the latent term ties to the downsampled image.
        decoder_labels: a decoder that also takes the label map through SPADE norms (paper:
            False; see the module docstring). Not combined with ``attention``.
        decoder_hidden: hidden channels of that decoder's SPADE modulation (None: the deepest
            level's channels, at most 128; :class:`~edmcli.models.label_decoder.LabelDecoder`).
    """

    image_size: int = 256
    latent_size: int = 64
    base_channels: int = 64
    num_res_blocks: int = 2
    norm_num_groups: int = 32
    attention: bool = False
    prior_shape: float = 3.75
    prior_rate: float = 10.8
    latent_channels: int = 1
    decoder_labels: bool = False
    decoder_hidden: int | None = None

    @property
    def downsample_factor(self) -> int:
        """``image_size // latent_size`` (2 or 4 once validated)."""
        return self.image_size // self.latent_size

    @property
    def num_levels(self) -> int:
        """Encoder levels: 2 for a latent of half the image size, 3 for a quarter."""
        return int(math.log2(self.downsample_factor)) + 1

    @property
    def channels(self) -> tuple[int, ...]:
        """Channels per level, ``base_channels * level``."""
        return tuple(self.base_channels * (k + 1) for k in range(self.num_levels))

    def validate(self) -> GammaVAEConfig:
        """Check the configuration; return it unchanged.

        Raises:
            ValueError: for a non-positive size or width, a latent size that is not half or a
                quarter of the image size, channels not divisible by the GroupNorm groups, or a
                non-positive prior parameter.
        """
        for name in ("image_size", "latent_size", "base_channels", "num_res_blocks",
                     "latent_channels"):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"GammaVAEConfig.{name} must be a positive integer, got {value!r}."
                )
        if self.latent_size * 2 != self.image_size and self.latent_size * 4 != self.image_size:
            raise ValueError(
                f"latent size {self.latent_size} does not divide image size {self.image_size} "
                "into 2 or 4."
            )
        groups = self.norm_num_groups
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
            raise ValueError(
                f"GammaVAEConfig.norm_num_groups must be a positive integer, got "
                f"{self.norm_num_groups!r}."
            )
        if any(c % self.norm_num_groups for c in self.channels):
            raise ValueError(
                f"channels per level {self.channels} must all be multiples of norm_num_groups "
                f"{self.norm_num_groups}."
            )
        hidden = self.decoder_hidden
        if hidden is not None and (isinstance(hidden, bool) or not isinstance(hidden, int)
                                   or hidden < 1):  # fmt: skip
            raise ValueError(f"GammaVAEConfig.decoder_hidden must be a positive integer, got "
                             f"{hidden!r}.")  # fmt: skip
        if self.decoder_labels and self.attention:
            raise ValueError("a decoder with labels has no bottleneck attention; use one of them.")
        for name in ("prior_shape", "prior_rate"):
            value = getattr(self, name)
            is_number = isinstance(value, int | float) and not isinstance(value, bool)
            if not (is_number and math.isfinite(value) and value > 0):
                raise ValueError(f"GammaVAEConfig.{name} must be a positive number, got {value!r}.")
        return self


class VAEOutput(NamedTuple):
    """What :meth:`GammaVAE.forward` returns.

    Attributes:
        recon: reconstruction (N, 1, H, W) in [0, 1], zero outside the sector.
        z: latent (N, C, h, w): a posterior sample or the posterior mean, zero outside the sector.
        alpha: posterior shapes (N, C, h, w), float32 (meaningless outside the latent sector).
        beta: posterior rates (N, C, h, w), float32 (meaningless outside the latent sector).
        latent_sector: latent-size sector mask (N, 1, h, w), {0, 1} float.
    """

    recon: torch.Tensor
    z: torch.Tensor
    alpha: torch.Tensor
    beta: torch.Tensor
    latent_sector: torch.Tensor


def _check_nchw(name: str, x: torch.Tensor, size: int | None = None, channels: int = 1) -> None:
    if x.ndim != 4 or x.shape[1] != channels:
        raise ValueError(f"{name} must be shaped (N, {channels}, H, W), got {tuple(x.shape)}.")
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        raise ValueError(f"{name} must be {size}x{size}, got {x.shape[-2]}x{x.shape[-1]}.")


def _pool_factors(x: torch.Tensor, latent_size: int, name: str) -> tuple[int, int]:
    h, w = x.shape[-2:]
    if latent_size < 1 or h % latent_size or w % latent_size:
        raise ValueError(
            f"{name} of size {h}x{w} cannot be downsampled to latent size {latent_size}."
        )
    return h // latent_size, w // latent_size


def _full_precision(x: torch.Tensor):
    """Autocast off for ``x``'s device: the frozen Γ-VAE encodes and decodes in fp32 even inside
    a bf16/fp16 autocast region (bf16 latents differ by up to 0.05, far above σ_min = 0.002).
    Nothing on the meta device (FLOP counting), which has no autocast."""
    if x.device.type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(device_type=x.device.type, enabled=False)


def latent_sector_mask(sector: torch.Tensor, latent_size: int) -> torch.Tensor:
    """Downsample a pixel sector mask to the latent size.

    A latent pixel is in the sector when at least half of its footprint (the
    ``H / latent_size`` x ``W / latent_size`` block of pixels it covers) is: area interpolation
    (average pooling) thresholded at 0.5.

    Args:
        sector: (N, 1, H, W) bool or {0, 1} float mask; H and W multiples of ``latent_size``.
        latent_size: side of the latent.

    Returns:
        (N, 1, latent_size, latent_size) {0, 1} mask, in ``sector``'s float dtype (float32 for
        a bool or integer mask).

    Raises:
        ValueError: for a wrongly shaped mask or sizes that are not multiples of ``latent_size``.
    """
    _check_nchw("sector", sector)
    _pool_factors(sector, latent_size, "sector")
    return mask_at(sector, latent_size)


def area_downsample(image: torch.Tensor, latent_size: int) -> torch.Tensor:
    """Average ``image`` (N, C, H, W) over blocks of ``H/latent_size`` x ``W/latent_size`` pixels.

    The image counterpart of :func:`latent_sector_mask` (the x of the paper's latent term).

    Raises:
        ValueError: for sizes that are not multiples of ``latent_size``.
    """
    if image.ndim != 4:
        raise ValueError(f"image must be shaped (N, C, H, W), got {tuple(image.shape)}.")
    factors = _pool_factors(image, latent_size, "image")
    return image if factors == (1, 1) else F.avg_pool2d(image, factors)


class GammaVAE(nn.Module):
    """Gamma-VAE: image + sector -> Gamma posterior per latent pixel -> image.

    The latent diffusion models use only :meth:`encode` (image -> latent in [-1, 1]) and
    :meth:`decode` (latent -> image); training uses :meth:`forward` and :meth:`posterior`.
    Images are float (N, 1, S, S) in [0, 1] with ``S = config.image_size``; sector masks are
    (N, 1, S, S) bool or {0, 1} float (label != 0).

    Args:
        config: the architecture and prior; validated here.

    Example::

        vae = GammaVAE(GammaVAEConfig(image_size=64, latent_size=16, base_channels=16,
                                      norm_num_groups=8))
        latent = vae.encode(image, sector)          # (N, 1, 16, 16), -1 outside the sector
        image_hat = vae.decode(latent, sector)      # (N, 1, 64, 64), 0 outside the sector
    """

    def __init__(self, config: GammaVAEConfig) -> None:
        super().__init__()
        self.config = config.validate()
        levels = config.num_levels
        common = dict(
            spatial_dims=2,
            channels=config.channels,
            num_res_blocks=(config.num_res_blocks,) * levels,
            norm_num_groups=config.norm_num_groups,
            norm_eps=1e-6,
            attention_levels=(False,) * levels,
            with_nonlocal_attn=config.attention,
            use_flash_attention=True,
        )
        # MONAI is imported where a Γ-VAE is built, not with this module (run settings and
        # stage plans read GammaVAEConfig; importing MONAI costs seconds)
        from monai.networks.nets.autoencoderkl import Decoder, Encoder

        # 2C output channels: the heads of alpha and beta of each latent channel.
        c = config.latent_channels
        self.encoder = Encoder(in_channels=1, out_channels=2 * c, **common)
        if config.decoder_labels:
            from edmcli.models.label_decoder import LabelDecoder

            self.decoder = LabelDecoder(c, config.channels, config.num_res_blocks,
                                        config.norm_num_groups, eps=1e-6,
                                        hidden=config.decoder_hidden)  # fmt: skip
        else:
            self.decoder = Decoder(in_channels=c, out_channels=1, **common)

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def latent_size(self) -> int:
        return self.config.latent_size

    def latent_sector(self, sector: torch.Tensor) -> torch.Tensor:
        """:func:`latent_sector_mask` at this model's latent size."""
        return latent_sector_mask(sector, self.config.latent_size)

    def _check_pair(
        self,
        image: torch.Tensor,
        sector: torch.Tensor,
        name: str = "image",
        size: int | None = None,
        channels: int = 1,
    ) -> None:
        """``image`` (called ``name``) at ``size`` (default: the image size) with ``channels``
        and a pixel-size ``sector`` of the same batch size."""
        _check_nchw(name, image, self.config.image_size if size is None else size, channels)
        _check_nchw("sector", sector, self.config.image_size)
        if sector.shape[0] != image.shape[0]:
            raise ValueError(
                f"sector batch size {sector.shape[0]} differs from {name} batch size "
                f"{image.shape[0]}."
            )

    def posterior(
        self, image: torch.Tensor, sector: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior shape and rate per latent pixel.

        The image is masked to the sector before encoding. Values outside the latent sector are
        computed but meaningless (the latent is zeroed there and the KL is masked).

        Returns:
            ``(alpha, beta)``, each (N, C, h, w) float32 and >= 1e-4.
        """
        self._check_pair(image, sector)
        heads = self.encoder(image * sector.to(image.dtype)).float()
        a, b = heads.chunk(2, dim=1)
        alpha = self.config.prior_shape * F.softplus(a + _SOFTPLUS_INV_ONE)
        beta = self.config.prior_rate * F.softplus(b + _SOFTPLUS_INV_ONE)
        return alpha.clamp_min(PARAM_MIN), beta.clamp_min(PARAM_MIN)

    def _decoder_labels(self, labels: torch.Tensor | None, sector: torch.Tensor) -> torch.Tensor:
        """The label map a decoder with labels needs, checked against the sector."""
        if labels is None:
            raise ValueError("this Γ-VAE's decoder takes the label map: pass labels=.")
        size = self.config.image_size
        if labels.ndim != 3 or tuple(labels.shape) != (sector.shape[0], size, size):
            raise ValueError(
                f"labels must be shaped ({sector.shape[0]}, {size}, {size}), got "
                f"{tuple(labels.shape)}."
            )
        return labels

    def _decode_z(
        self, z: torch.Tensor, sector: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.config.decoder_labels:
            out = self.decoder(z, self._decoder_labels(labels, sector))
        else:
            out = self.decoder(z)
        return torch.sigmoid(out.float()) * sector.to(torch.float32)

    def forward(
        self,
        image: torch.Tensor,
        sector: torch.Tensor,
        sample: bool | None = None,
        labels: torch.Tensor | None = None,
    ) -> VAEOutput:
        """Encode, take a latent, decode.

        Args:
            image: (N, 1, S, S) float in [0, 1].
            sector: (N, 1, S, S) bool or {0, 1} float.
            sample: draw z with ``Gamma.rsample`` (differentiable in alpha and beta) when True;
                use the posterior mean alpha / beta when False; ``None`` samples in training
                mode and uses the mean in eval mode.
            labels: (N, S, S) integer label map, needed by a decoder with labels (ignored
                otherwise).

        Returns:
            :class:`VAEOutput` (recon, z, alpha, beta, latent_sector).
        """
        alpha, beta = self.posterior(image, sector)
        latent_sector = self.latent_sector(sector).to(alpha.dtype)
        if sample is None:
            sample = self.training
        if sample:
            z = torch.distributions.Gamma(alpha, beta, validate_args=False).rsample()
        else:
            z = alpha / beta
        z = z.clamp_min(Z_MIN) * latent_sector
        return VAEOutput(self._decode_z(z, sector, labels), z, alpha, beta, latent_sector)

    def encode(self, image: torch.Tensor, sector: torch.Tensor) -> torch.Tensor:
        """Image -> diffusion latent ``2 z - 1`` with z the posterior mean (deterministic).

        Args:
            image: (N, 1, S, S) float in [0, 1].
            sector: (N, 1, S, S) bool or {0, 1} float.

        Returns:
            (N, C, h, w) float32: -1 outside the latent sector, ``2 alpha / beta - 1`` (> -1)
            inside; nominally within [-1, 1] (the top is not clamped, see the module docstring).
            Computed in fp32 whatever autocast region it is called in.
        """
        with _full_precision(image):
            alpha, beta = self.posterior(image.float(), sector.float())
            latent_sector = self.latent_sector(sector).to(alpha.dtype)
            z = (alpha / beta).clamp_min(Z_MIN) * latent_sector
            return 2.0 * z - 1.0

    def decode(
        self, latent: torch.Tensor, sector: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Diffusion latent -> image in [0, 1], zero outside the sector.

        ``z = max((latent + 1) / 2, 1e-7)`` inside the latent sector and 0 outside, as in
        :meth:`forward`, so ``decode(encode(x, s), s)`` equals ``forward(x, s, sample=False)``'s
        reconstruction.

        Args:
            latent: (N, C, h, w) float with ``h = config.latent_size``.
            sector: pixel-size (N, 1, S, S) bool or {0, 1} float.
            labels: (N, S, S) integer label map, needed by a decoder with labels (ignored
                otherwise).

        Returns:
            (N, 1, S, S) float32 image.
        """
        self._check_pair(latent, sector, "latent", self.config.latent_size,
                         self.config.latent_channels)  # fmt: skip
        with _full_precision(latent):
            latent = latent.float()
            latent_sector = self.latent_sector(sector).to(latent.dtype)
            z = ((latent + 1.0) / 2.0).clamp_min(Z_MIN) * latent_sector
            return self._decode_z(z, sector, labels)
