"""Training losses of the diffusion models, masked to the ultrasound sector.

Every loss draws a noise level per sample, noises the clean images, runs the model through its
``forward`` (so that a DistributedDataParallel wrapper sees the call) and averages a weighted
per-pixel squared error over the sector:

    loss = sum_{n, c, h, w} w(sigma_n) (D(y_n + sigma_n e; sigma_n) - y_n)^2 sector_n
           / sum_{n, c, h, w} sector_n

i.e. one mean over all in-sector pixels of the batch (docs/design.md), not a mean of per-sample
means.

| loss | noise level | weight |
|---|---|---|
| :class:`EDMLoss` | ln sigma ~ N(-1.2, 1.2^2) (P_mean, P_std) | (sigma^2 + sd^2) / (sigma sd)^2 |
| :class:`VELoss` | sigma log-uniform in [0.02, 100] | 1 / sigma^2 |
| :class:`VPLoss` | sigma = sigma_VP(t), t ~ U(eps_t, 1) | 1 / sigma^2 |
| :class:`DDPMLoss` | t uniform in 0..999 | eps-MSE (1), + lambda L_vlb with a learned variance |

Each loss is called as ``loss_fn(net, images, labels, sector, generator=None, *,
class_labels=None)`` and returns
``(loss, logs)``: the scalar to back-propagate and a dict of detached 0-dim tensors for logging
(``"loss"``, and ``"mse"``: the unweighted in-sector squared error of the denoised images, or of the
predicted noise for DDPM; :meth:`DDPMLoss.terms` gives its two terms undetached). ``images`` are (N,
C, H, W) floats (pixels or latents in [-1, 1]), ``labels`` the (N, H', W') integer label maps handed
to the network, ``sector`` an (N, H'', W'') or (N, 1, H'', W'') mask brought to the images' size
when it differs (:func:`sector_mask_like`). The noise levels and the noise come from ``generator``
when given (it must live on the images' device); dropout inside the network still uses the global
RNG. ``class_labels`` (N,) are handed to a class-conditional network as they are (the caller has
already replaced the dropped ones by the null class for classifier-free guidance); None calls the
network exactly as a map-only model is called.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Protocol

import torch
from torch import nn

from edmcli.data.labels import mask_at
from edmcli.models.ddpm import DDPMEpsModel
from edmcli.models.masked import masked_mean
from edmcli.models.preconditioning import vp_sigma

__all__ = [
    "DDPMLoss",
    "DiffusionLoss",
    "EDMLoss",
    "VELoss",
    "VPLoss",
    "discretized_gaussian_log_likelihood",
    "normal_kl",
    "sector_mask_like",
]

LossOutput = tuple[torch.Tensor, dict[str, torch.Tensor]]


class DiffusionLoss(Protocol):
    def __call__(
        self,
        net: nn.Module,
        images: torch.Tensor,
        labels: torch.Tensor,
        sector: torch.Tensor,
        generator: torch.Generator | None = None,
        *,
        class_labels: torch.Tensor | None = None,
    ) -> LossOutput: ...


def _class_kwargs(class_labels: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """``{"class_labels": c}``, or nothing for a map-only call."""
    return {} if class_labels is None else {"class_labels": class_labels}


def sector_mask_like(sector: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Sector mask (N, H, W) or (N, 1, H, W), bool or {0, 1}, as an (N, 1, h, w) float mask at
    the images' spatial size (e.g. a latent size) under the one rule of
    :func:`edmcli.data.labels.mask_at` (in when at least half of a pixel is)."""
    if sector.ndim == 3:
        sector = sector[:, None]
    if sector.ndim != 4 or sector.shape[1] != 1 or sector.shape[0] != images.shape[0]:
        raise ValueError(
            f"sector must have shape (N, H, W) or (N, 1, H, W) with N = {images.shape[0]}, got "
            f"{tuple(sector.shape)}."
        )
    sector = sector.to(device=images.device, dtype=torch.float32)
    return mask_at(sector, tuple(images.shape[-2:]))


def _check_images(images: torch.Tensor) -> None:
    if images.ndim != 4 or not images.dtype.is_floating_point:
        raise ValueError(
            f"images must be a floating-point batch (N, C, H, W), got {images.dtype} of shape "
            f"{tuple(images.shape)}."
        )


def _randn(shape: tuple[int, ...], like: torch.Tensor, generator: torch.Generator | None):
    return torch.randn(shape, generator=generator, device=like.device, dtype=torch.float32)


def _rand(shape: tuple[int, ...], like: torch.Tensor, generator: torch.Generator | None):
    return torch.rand(shape, generator=generator, device=like.device, dtype=torch.float32)


def _weighted_denoising_loss(
    net: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    sector: torch.Tensor,
    sigma: torch.Tensor,
    weight: torch.Tensor,
    generator: torch.Generator | None,
    class_labels: torch.Tensor | None = None,
) -> LossOutput:
    y = images.float()
    mask = sector_mask_like(sector, y)
    noise = _randn(tuple(y.shape), y, generator) * sigma
    denoised = net(y + noise, sigma.flatten(), labels, **_class_kwargs(class_labels))
    sq_err = (denoised - y) ** 2
    loss = masked_mean(weight * sq_err, mask)
    logs = {"loss": loss.detach(), "mse": masked_mean(sq_err.detach(), mask)}
    return loss, logs


class _SigmaWeightedLoss(ABC):
    """Weighted denoising loss on x = y + sigma n: subclasses draw sigma and weigh it."""

    @abstractmethod
    def sample_sigma(self, n: int, like: torch.Tensor, generator=None) -> torch.Tensor:
        """(n, 1, 1, 1) noise levels."""

    @abstractmethod
    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """Loss weight lambda(sigma)."""

    def __call__(
        self, net, images, labels, sector, generator=None, *, class_labels=None
    ) -> LossOutput:
        _check_images(images)
        sigma = self.sample_sigma(images.shape[0], images, generator)
        return _weighted_denoising_loss(
            net, images, labels, sector, sigma, self.weight(sigma), generator, class_labels
        )


class EDMLoss(_SigmaWeightedLoss):
    """EDM loss: ln sigma ~ N(P_mean, P_std^2), weight (sigma^2 + sd^2) / (sigma sd)^2."""

    def __init__(self, P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = 0.5):
        if P_std <= 0 or sigma_data <= 0:
            raise ValueError(
                f"EDMLoss needs P_std > 0 and sigma_data > 0, got {P_std}, {sigma_data}."
            )
        self.P_mean = P_mean
        self.P_std = P_std
        self.sigma_data = sigma_data

    def sample_sigma(self, n: int, like: torch.Tensor, generator=None) -> torch.Tensor:
        """(n, 1, 1, 1) noise levels."""
        return (_randn((n, 1, 1, 1), like, generator) * self.P_std + self.P_mean).exp()

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        sd = self.sigma_data
        return (sigma**2 + sd**2) / (sigma * sd) ** 2


class VELoss(_SigmaWeightedLoss):
    """VE loss: sigma log-uniform in [sigma_min, sigma_max], weight 1 / sigma^2."""

    def __init__(self, sigma_min: float = 0.02, sigma_max: float = 100.0):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(
                f"VELoss needs 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}."
            )
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def sample_sigma(self, n: int, like: torch.Tensor, generator=None) -> torch.Tensor:
        """(n, 1, 1, 1) noise levels."""
        u = _rand((n, 1, 1, 1), like, generator)
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** u

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        return 1 / sigma**2


class VPLoss(_SigmaWeightedLoss):
    """VP loss: t ~ U(epsilon_t, 1), sigma = sigma_VP(t), weight 1 / sigma^2."""

    def __init__(self, beta_d: float = 19.9, beta_min: float = 0.1, epsilon_t: float = 1e-5):
        if beta_d <= 0 or beta_min < 0 or not 0 < epsilon_t < 1:
            raise ValueError(
                f"VPLoss needs beta_d > 0, beta_min >= 0 and 0 < epsilon_t < 1, got {beta_d}, "
                f"{beta_min}, {epsilon_t}."
            )
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.epsilon_t = epsilon_t

    def sample_sigma(self, n: int, like: torch.Tensor, generator=None) -> torch.Tensor:
        """(n, 1, 1, 1) noise levels."""
        t = self.epsilon_t + (1 - self.epsilon_t) * _rand((n, 1, 1, 1), like, generator)
        return vp_sigma(t, self.beta_d, self.beta_min)

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        return 1 / sigma**2


LN2 = math.log(2.0)


def normal_kl(
    mean1: torch.Tensor, log_var1: torch.Tensor, mean2: torch.Tensor, log_var2: torch.Tensor
) -> torch.Tensor:
    """KL(N(mean1, exp(log_var1)) || N(mean2, exp(log_var2))) per element, in nats:
    (log_var2 - log_var1 + (exp(log_var1) + (mean1 - mean2)^2) / exp(log_var2) - 1) / 2."""
    return 0.5 * (
        log_var2
        - log_var1
        + torch.exp(log_var1 - log_var2)
        + (mean1 - mean2) ** 2 * torch.exp(-log_var2)
        - 1.0
    )


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor, bins: int = 256
) -> torch.Tensor:
    """log P(x) per element, in nats, of data on ``bins`` evenly spaced levels of [-1, 1] under
    N(mean, exp(log_scale)^2): the Gaussian mass of x's bin [x - h, x + h], h = 1 / (bins - 1),
    the lowest bin reaching down to -inf and the highest up to +inf. A bin's mass
    Phi(u) - Phi(l) is computed in log space from the side of the distribution it lies on, so
    that bins far in a tail keep their tiny mass instead of cancelling to 0."""
    h = 1.0 / (bins - 1)
    inv_scale = torch.exp(-log_scale)
    upper = (x - mean + h) * inv_scale
    lower = (x - mean - h) * inv_scale
    log_ndtr = torch.special.log_ndtr
    right = lower > 0  # the bin lies right of the mean: use 1 - Phi, which does not round to 0
    big = torch.where(right, log_ndtr(-lower), log_ndtr(upper))
    small = torch.where(right, log_ndtr(-upper), log_ndtr(lower))
    inner = big + torch.log((-torch.expm1(small - big)).clamp_min(1e-30))
    lowest = log_ndtr(upper)  # log Phi(upper)
    highest = log_ndtr(-lower)  # log (1 - Phi(lower))
    return torch.where(x < -1 + h, lowest, torch.where(x > 1 - h, highest, inner))


class DDPMLoss:
    """DDPM loss (SDM): t uniform in 0..num_steps-1, the in-sector MSE between predicted and
    true noise; for a model with ``learn_sigma`` the hybrid loss of Nichol & Dhariwal (2021),

        loss = L_simple + lambda_vlb L_vlb,   L_vlb = T E_t[L_t] (one t per sample),

    with L_t = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0 and the discretised
    Gaussian decoder NLL -log p(x_0 | x_1) (``bins`` levels of [-1, 1]) at t = 0, in bits per
    dimension, averaged over the sector like every loss here. p's mean is computed from a
    detached eps, so L_vlb trains the variance output only and L_simple the eps output only.
    lambda_vlb = 0.001 and bits match the published configuration.

    The noisy input is built in the sigma parameterisation, x = x_0 + sigma_t eps, which
    :class:`DDPMEpsModel` maps to x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps exactly.
    ``net`` is a :class:`DDPMEpsModel`, or a wrapper (DDP, ...) exposing it as ``net.module``.
    """

    def __init__(self, lambda_vlb: float = 0.001, bins: int = 256):
        if lambda_vlb < 0 or bins < 2:
            raise ValueError(
                f"DDPMLoss needs lambda_vlb >= 0 and bins >= 2, got {lambda_vlb}, {bins}."
            )
        self.lambda_vlb = lambda_vlb
        self.bins = bins

    def vlb_terms(
        self,
        model: DDPMEpsModel,
        x0: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        eps: torch.Tensor,
        v: torch.Tensor,
    ) -> torch.Tensor:
        """L_t per element in bits: the KL for t > 0, the decoder NLL for t = 0; p has the mean
        of ``eps`` (pass it detached) and the variance of the output ``v``."""
        mean_q = model.posterior_mean(x0, x_t, t)
        log_var_q = model.posterior_log_variance(t, x_t.shape[0])
        mean_p = model.mean_from_eps(x_t, t, eps)
        log_var_p = model.log_variance(t, (v + 1) / 2)
        kl = normal_kl(mean_q, log_var_q, mean_p, log_var_p)
        nll = -discretized_gaussian_log_likelihood(x0, mean_p, 0.5 * log_var_p, self.bins)
        first = (t == 0).reshape(-1, 1, 1, 1)
        return torch.where(first, nll, kl) / LN2

    def terms(
        self, net, images, labels, sector, generator=None, *, class_labels=None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(L_simple, L_vlb) with their graphs; L_vlb is None for a model without
        ``learn_sigma``."""
        _check_images(images)
        model = getattr(net, "module", net)
        if not isinstance(model, DDPMEpsModel):
            raise ValueError(f"DDPMLoss needs a DDPMEpsModel, got {type(model).__name__}.")
        y = images.float()
        n = y.shape[0]
        mask = sector_mask_like(sector, y)
        t = torch.randint(
            0, model.num_steps, (n,), generator=generator, device=y.device, dtype=torch.long
        )
        sigma = model.sigmas.to(y.device)[t].reshape(n, 1, 1, 1)
        eps = _randn(tuple(y.shape), y, generator)
        x = y + sigma * eps
        classes = _class_kwargs(class_labels)
        if not model.learn_sigma:
            eps_hat = net(x, sigma.flatten(), labels, return_eps=True, **classes)
            return masked_mean((eps_hat - eps) ** 2, mask), None
        eps_hat, v = net(x, sigma.flatten(), labels, return_raw=True, **classes)
        simple = masked_mean((eps_hat - eps) ** 2, mask)
        x_t = x / (1 + sigma**2).sqrt()  # what the network saw
        per_pixel = self.vlb_terms(model, y, x_t, t, eps_hat.detach(), v)
        return simple, model.num_steps * masked_mean(per_pixel, mask)

    def __call__(
        self, net, images, labels, sector, generator=None, *, class_labels=None
    ) -> LossOutput:
        simple, vlb = self.terms(net, images, labels, sector, generator, class_labels=class_labels)
        loss = simple if vlb is None else simple + self.lambda_vlb * vlb
        return loss, {"loss": loss.detach(), "mse": simple.detach()}
