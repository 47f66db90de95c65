"""The Gamma-VAE training loss (paper eq. 7), every term restricted to the ultrasound sector.

    total = w_recon * L2(X, Y) + w_perceptual * LPIPS(X, Y) + w_kl * KL + w_latent * L2(x, z)

- ``recon``: squared error between the image X and the reconstruction Y, averaged over the
  in-sector pixels (:func:`~edmcli.models.masked.masked_mean`).
- ``perceptual``: the LPIPS distance map of :class:`~edmcli.models.perceptual.MaskedLPIPS`,
  averaged over the in-sector pixels.
- ``kl``: the closed-form Gamma KL per latent element (:func:`~edmcli.models.gamma_kl.gamma_vae_kl`,
  KL(q || p) by default), summed over the latent's C channels at each position and averaged over
  the in-sector latent positions (C = 1, the paper: the KL per latent pixel).
- ``latent``: squared error between the latent z (its channel 0 when C > 1; the other channels
  are free) and the image downsampled to latent size x
  (:func:`~edmcli.models.gamma_vae.area_downsample`), averaged over the in-sector latent pixels.

Beyond the paper, ``spectrum`` (weight 0 by default, ``train-vae --w-spectrum``): the distance of
the reconstruction's radially averaged power spectrum to the image's
(:mod:`edmcli.models.spectrum`), counted after the warm-up like the perceptual term.

Default weights are the authors' (docs/reference.md, EDMLX code): 10, 1e-3, 1e-3, 1e-2, with the
perceptual and latent terms switched on after 5 epochs (``warmup_epochs``). The engine passes the
0-based epoch; the two terms count from epoch ``warmup_epochs`` on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from edmcli.models.gamma_kl import KLDirection, gamma_vae_kl
from edmcli.models.gamma_vae import VAEOutput, area_downsample
from edmcli.models.masked import masked_mean
from edmcli.models.spectrum import spectrum_distance

__all__ = ["GammaVAELoss", "GammaVAELossWeights", "LOSS_TERMS"]

LOSS_TERMS: tuple[str, ...] = ("recon", "perceptual", "kl", "latent")
"""Names of the loss terms, in the order of the paper's eq. 7."""


@dataclass(frozen=True)
class GammaVAELossWeights:
    """Weights lambda_1..lambda_4 of the loss; defaults from the authors' code (docs/reference.md).

    Args:
        recon: lambda_1, image L2 (10).
        perceptual: lambda_2, LPIPS (1e-3).
        kl: lambda_3, Gamma KL (1e-3).
        latent: lambda_4, latent-to-downsampled-image L2 (1e-2).
    """

    recon: float = 10.0
    perceptual: float = 1e-3
    kl: float = 1e-3
    latent: float = 1e-2
    spectrum: float = 0.0  # beyond the paper: the weight-free sharpness term (models.spectrum)

    def validate(self) -> GammaVAELossWeights:
        """Check that every weight is a finite non-negative number; return self.

        Raises:
            ValueError: naming the first bad weight.
        """
        for name in (*LOSS_TERMS, "spectrum"):
            value = getattr(self, name)
            is_number = isinstance(value, int | float) and not isinstance(value, bool)
            if not (is_number and math.isfinite(value) and value >= 0):
                raise ValueError(
                    f"loss weight {name!r} must be a finite non-negative number, got {value!r}."
                )
        return self


class GammaVAELoss(nn.Module):
    """Gamma-VAE loss with sector masking and a warm-up for the perceptual and latent terms.

    Args:
        prior_shape: shape of the Gamma prior (paper: 3.75); use the model's config value.
        prior_rate: rate of the Gamma prior (paper: 10.8).
        weights: the four weights (defaults: the authors' 10, 1e-3, 1e-3, 1e-2).
        kl_direction: ``"posterior-first"`` (KL(q || p), the ELBO's; default) or
            ``"prior-first"`` (KL(p || q), eq. 5 as printed).
        perceptual: a module ``(image, recon, sector) -> (N, 1, H, W)`` distance map, e.g.
            :class:`~edmcli.models.perceptual.MaskedLPIPS`; ``None`` trains without the term.
        warmup_epochs: the perceptual and latent terms count from this 0-based epoch on
            (authors: 5); 0 counts them from the start.

    Raises:
        ValueError: for a bad weight, direction, prior or warm-up.
    """

    def __init__(
        self,
        prior_shape: float = 3.75,
        prior_rate: float = 10.8,
        weights: GammaVAELossWeights | None = None,
        kl_direction: KLDirection = "posterior-first",
        perceptual: nn.Module | None = None,
        warmup_epochs: int = 5,
    ) -> None:
        super().__init__()
        self.weights = (weights or GammaVAELossWeights()).validate()
        gamma_vae_kl(torch.ones(1), torch.ones(1), prior_shape, prior_rate, kl_direction)
        is_int = isinstance(warmup_epochs, int) and not isinstance(warmup_epochs, bool)
        if not is_int or warmup_epochs < 0:
            raise ValueError(
                f"warmup_epochs must be a non-negative integer, got {warmup_epochs!r}."
            )
        self.prior_shape = float(prior_shape)
        self.prior_rate = float(prior_rate)
        self.kl_direction: KLDirection = kl_direction
        self.perceptual = perceptual
        self.warmup_epochs = warmup_epochs

    def warmed_up(self, epoch: int) -> bool:
        """Whether the perceptual and latent terms count at this 0-based epoch."""
        return epoch >= self.warmup_epochs

    def forward(
        self, image: torch.Tensor, sector: torch.Tensor, output: VAEOutput, *, epoch: int
    ) -> dict[str, torch.Tensor]:
        """Compute the loss terms.

        Args:
            image: (N, 1, H, W) float in [0, 1], the model's input.
            sector: (N, 1, H, W) bool or {0, 1} float pixel sector mask.
            output: what :meth:`GammaVAE.forward` returned for ``image`` and ``sector``.
            epoch: 0-based epoch, for the warm-up of the perceptual and latent terms.

        Returns:
            ``{"recon", "perceptual", "kl", "latent", "total"}``: the four unweighted terms
            (0-dim tensors) and their weighted sum. ``latent`` is always computed (it is cheap)
            but weighs only once warmed up; ``perceptual`` is 0 and not computed before the
            warm-up or without a perceptual module.
        """
        if image.shape != output.recon.shape or sector.shape != image.shape:
            raise ValueError(
                f"image {tuple(image.shape)}, sector {tuple(sector.shape)} and reconstruction "
                f"{tuple(output.recon.shape)} must have the same shape."
            )
        latent_shapes = {tuple(t.shape) for t in output[1:4]}
        n, _c, h, w = output.z.shape
        if len(latent_shapes) != 1 or tuple(output.latent_sector.shape) != (n, 1, h, w):
            raise ValueError(
                f"z, alpha and beta must have the same shape (N, C, h, w) and latent_sector "
                f"(N, 1, h, w), got {latent_shapes} and {tuple(output.latent_sector.shape)}."
            )
        warm = self.warmed_up(epoch)
        mask = sector.to(output.recon.dtype)
        target = image.to(output.recon.dtype) * mask
        recon = masked_mean((target - output.recon).square(), mask)
        kl = masked_mean(  # per latent position: summed over the C channels' elements
            gamma_vae_kl(
                output.alpha, output.beta, self.prior_shape, self.prior_rate, self.kl_direction
            ).sum(1, keepdim=True),
            output.latent_sector,
        )
        small = area_downsample(target, output.z.shape[-1])
        z0 = output.z[:, :1]  # the channel tied to the image (the only one when C = 1)
        latent = masked_mean((z0 - small.to(z0.dtype)).square(), output.latent_sector)
        if warm and self.perceptual is not None:
            perceptual = masked_mean(self.perceptual(image, output.recon, sector), mask)
        else:
            perceptual = recon.new_zeros(())
        w = self.weights
        total = w.recon * recon + w.kl * kl
        if warm:
            total = total + w.perceptual * perceptual + w.latent * latent
        terms = {"recon": recon, "perceptual": perceptual, "kl": kl, "latent": latent}
        if w.spectrum > 0:  # only then: the logged terms of the paper's loss stay as they were
            terms["spectrum"] = spectrum_distance(output.recon, target, mask)
            if warm:
                total = total + w.spectrum * terms["spectrum"]
        return {**terms, "total": total}
