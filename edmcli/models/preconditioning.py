"""Preconditionings that turn the raw UNet F into a denoiser D(x; sigma) (Karras et al. 2022).

    D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma))

| | c_skip | c_out | c_in | c_noise |
|---|---|---|---|---|
| EDM | sd^2/(s^2+sd^2) | s sd/sqrt(s^2+sd^2) | 1/sqrt(s^2+sd^2) | ln(s)/4 |
| VE | 1 | s | 1 | ln(s/2) |
| VP | 1 | -s | 1/sqrt(s^2+1) | (M-1) sigma^-1(s) |

Each preconditioning is a pure coefficient function plus a small module wrapping a
:class:`~edmcli.models.unet.SpadeUNet`. The modules share one interface that samplers use:
``forward(x, sigma, labels=None, spade_cache=None, *, class_labels=None, guidance=None) -> D(x)``,
``spade_cache(labels)``, ``round_sigma(sigma)`` and the supported ``sigma_min``/``sigma_max``; the
DDPM model of SDM offers the same interface (:mod:`edmcli.models.ddpm`).

``class_labels`` and the classifier-free ``guidance`` scale (networks with ``num_classes`` > 0)
act on the raw output F, where D is affine in F with the same coefficients for both branches
(:mod:`edmcli.models.guidance`).

All coefficients are computed in fp32 whatever the dtype the network runs in.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import nn

from edmcli.models.guidance import guided_net_output
from edmcli.models.unet import SpadeCache, SpadeUNet

__all__ = [
    "EDMPrecond",
    "VEPrecond",
    "VPPrecond",
    "edm_coefficients",
    "per_sample_sigma",
    "ve_coefficients",
    "vp_coefficients",
    "vp_sigma",
    "vp_sigma_inv",
]

Coefficients = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def edm_coefficients(sigma: torch.Tensor, sigma_data: float = 0.5) -> Coefficients:
    """``(c_skip, c_out, c_in, c_noise)`` of EDM at noise level ``sigma``."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    denom = sigma**2 + sigma_data**2
    c_skip = sigma_data**2 / denom
    c_out = sigma * sigma_data / denom.sqrt()
    c_in = 1 / denom.sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


def ve_coefficients(sigma: torch.Tensor) -> Coefficients:
    """``(c_skip, c_out, c_in, c_noise)`` of VE at noise level ``sigma``."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    one = torch.ones_like(sigma)
    return one, sigma, one, (0.5 * sigma).log()


def vp_sigma(t: torch.Tensor, beta_d: float = 19.9, beta_min: float = 0.1) -> torch.Tensor:
    """VP noise level sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1), in float64 for a
    float64 tensor ``t`` (the sampling schedules) and in fp32 for anything else."""
    wide = isinstance(t, torch.Tensor) and t.dtype == torch.float64
    t = torch.as_tensor(t, dtype=torch.float64 if wide else torch.float32)
    return torch.expm1(0.5 * beta_d * t**2 + beta_min * t).sqrt()


def vp_sigma_inv(sigma: torch.Tensor, beta_d: float = 19.9, beta_min: float = 0.1) -> torch.Tensor:
    """Inverse of :func:`vp_sigma`: t such that sigma(t) = ``sigma``."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    return ((beta_min**2 + 2 * beta_d * torch.log1p(sigma**2)).sqrt() - beta_min) / beta_d


def vp_coefficients(
    sigma: torch.Tensor, beta_d: float = 19.9, beta_min: float = 0.1, M: int = 1000
) -> Coefficients:
    """``(c_skip, c_out, c_in, c_noise)`` of VP at noise level ``sigma``."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    c_skip = torch.ones_like(sigma)
    c_in = 1 / (sigma**2 + 1).sqrt()
    c_noise = (M - 1) * vp_sigma_inv(sigma, beta_d, beta_min)
    return c_skip, -sigma, c_in, c_noise


def per_sample_sigma(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """``sigma`` (scalar or one per sample) as an fp32 (N, 1, 1, 1) tensor on x's device."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1, 1, 1)
    if sigma.shape[0] not in (1, x.shape[0]):
        raise ValueError(
            f"sigma must be a scalar or hold one value per sample ({x.shape[0]}), got "
            f"{sigma.shape[0]} values."
        )
    return sigma.expand(x.shape[0], 1, 1, 1)


class _Precond(nn.Module, ABC):
    """Shared plumbing: D(x) = c_skip x + c_out F(c_in x, c_noise)."""

    sigma_min: float
    sigma_max: float

    def __init__(self, net: SpadeUNet) -> None:
        super().__init__()
        if not isinstance(net, SpadeUNet):
            raise ValueError(f"net must be a SpadeUNet, got {type(net).__name__}.")
        self.net = net

    @abstractmethod
    def coefficients(self, sigma: torch.Tensor) -> Coefficients:
        """``(c_skip, c_out, c_in, c_noise)`` at ``sigma``."""

    def forward(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor | float,
        labels: torch.Tensor | None = None,
        spade_cache: SpadeCache | None = None,
        *,
        class_labels: torch.Tensor | None = None,
        guidance: float | None = None,
    ) -> torch.Tensor:
        """Denoised estimate D(x; sigma) in fp32; ``sigma`` is a scalar or one per sample;
        ``class_labels`` and ``guidance`` as in :mod:`edmcli.models.guidance`."""
        x = x.float()
        sigma = per_sample_sigma(sigma, x)
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        f = guided_net_output(
            self.net, c_in * x, c_noise.flatten(), labels, spade_cache, class_labels, guidance
        )
        return c_skip * x + c_out * f

    def spade_cache(self, labels: torch.Tensor, max_bytes: int | None = None) -> SpadeCache:
        """SPADE modulations of ``labels`` for reuse at every noise level."""
        return self.net.spade_cache(labels, max_bytes=max_bytes)

    def round_sigma(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """Continuous-time models support every sigma: identity."""
        return torch.as_tensor(sigma)


class EDMPrecond(_Precond):
    """EDM preconditioning (sigma_data 0.5; sigma in (0, inf), sampled 0.002..80)."""

    def __init__(
        self,
        net: SpadeUNet,
        sigma_data: float = 0.5,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
    ) -> None:
        super().__init__(net)
        if sigma_data <= 0 or not 0 < sigma_min < sigma_max:
            raise ValueError(
                f"EDMPrecond needs sigma_data > 0 and 0 < sigma_min < sigma_max, got "
                f"{sigma_data}, {sigma_min}, {sigma_max}."
            )
        self.sigma_data = sigma_data
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def coefficients(self, sigma: torch.Tensor) -> Coefficients:
        return edm_coefficients(sigma, self.sigma_data)


class VEPrecond(_Precond):
    """Variance-exploding preconditioning (sigma 0.02..100)."""

    def __init__(self, net: SpadeUNet, sigma_min: float = 0.02, sigma_max: float = 100.0) -> None:
        super().__init__(net)
        if not 0 < sigma_min < sigma_max:
            raise ValueError(
                f"VEPrecond needs 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}."
            )
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def coefficients(self, sigma: torch.Tensor) -> Coefficients:
        return ve_coefficients(sigma)


class VPPrecond(_Precond):
    """Variance-preserving preconditioning (beta_d 19.9, beta_min 0.1, eps_t 1e-5, M 1000);
    sigma ranges over sigma(eps_t)..sigma(1)."""

    def __init__(
        self,
        net: SpadeUNet,
        beta_d: float = 19.9,
        beta_min: float = 0.1,
        epsilon_t: float = 1e-5,
        M: int = 1000,
    ) -> None:
        super().__init__(net)
        if beta_d <= 0 or beta_min < 0 or not 0 < epsilon_t < 1 or M < 2:
            raise ValueError(
                f"VPPrecond needs beta_d > 0, beta_min >= 0, 0 < epsilon_t < 1 and M >= 2, got "
                f"{beta_d}, {beta_min}, {epsilon_t}, {M}."
            )
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.epsilon_t = epsilon_t
        self.M = M
        # Python floats (not tensors): also valid when the model is built on the meta device.
        self.sigma_min = math.sqrt(math.expm1(0.5 * beta_d * epsilon_t**2 + beta_min * epsilon_t))
        self.sigma_max = math.sqrt(math.expm1(0.5 * beta_d + beta_min))

    def sigma(self, t: torch.Tensor | float) -> torch.Tensor:
        return vp_sigma(t, self.beta_d, self.beta_min)

    def sigma_inv(self, sigma: torch.Tensor | float) -> torch.Tensor:
        return vp_sigma_inv(sigma, self.beta_d, self.beta_min)

    def coefficients(self, sigma: torch.Tensor) -> Coefficients:
        return vp_coefficients(sigma, self.beta_d, self.beta_min, self.M)
