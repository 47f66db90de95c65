"""Diffusion losses: noise-level distributions, weighting, sector masking, reproducibility."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_nets import randomize_zero_init, small_config
from torch import nn
from torch.distributions import LogNormal, Uniform

from edmcli.models.diffusion_loss import DDPMLoss, EDMLoss, VELoss, VPLoss, sector_mask_like
from edmcli.models.preconditioning import (
    EDMPrecond,
    edm_coefficients,
    ve_coefficients,
    vp_coefficients,
    vp_sigma_inv,
)
from edmcli.models.registry import MODEL_NAMES, build_loss, build_model
from edmcli.models.spade import SPADE
from edmcli.models.unet import SpadeUNet

SIGMAS = torch.tensor([0.002, 0.05, 0.5, 1.0, 4.0, 80.0])


class PixelwiseDenoiser(nn.Module):
    """A stand-in denoiser that acts on each pixel alone, so that pixels outside the sector
    cannot reach the in-sector error through a receptive field."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(0.7))

    def forward(self, x, sigma, labels=None, spade_cache=None):
        sigma = torch.as_tensor(sigma).reshape(-1, 1, 1, 1)
        return self.gain * x / (1 + sigma**2)


def batch(n: int = 2, size: int = 8, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 1, size, size, generator=gen) * 2 - 1
    labels = torch.randint(0, 5, (n, size, size), generator=gen)
    sector = labels > 0
    return images, labels, sector


def ks_statistic(samples: torch.Tensor, cdf) -> float:
    """Kolmogorov-Smirnov distance between the samples' empirical CDF and ``cdf``."""
    x, _ = samples.double().flatten().sort()
    n = x.numel()
    f = cdf(x)
    upper = torch.arange(1, n + 1, dtype=torch.float64) / n - f
    lower = f - torch.arange(0, n, dtype=torch.float64) / n
    return float(torch.maximum(upper, lower).max())


# ---------------------------------------------------------------------------- weighting
def test_edm_weight_times_c_out_squared_is_one():
    """The effective weight on the raw network output F is lambda(sigma) c_out(sigma)^2 = 1."""
    loss = EDMLoss()
    _, c_out, _, _ = edm_coefficients(SIGMAS, 0.5)
    torch.testing.assert_close(loss.weight(SIGMAS) * c_out**2, torch.ones_like(SIGMAS))
    hand = (SIGMAS**2 + 0.25) / (SIGMAS * 0.5) ** 2
    torch.testing.assert_close(loss.weight(SIGMAS), hand)


def test_ve_vp_weight_times_c_out_squared_is_one():
    for loss, coefficients in ((VELoss(), ve_coefficients), (VPLoss(), vp_coefficients)):
        c_out = coefficients(SIGMAS)[1]
        torch.testing.assert_close(loss.weight(SIGMAS) * c_out**2, torch.ones_like(SIGMAS))


# ---------------------------------------------------------------------------- noise levels
N_SAMPLES = 20000
KS_LIMIT = 0.015  # the 5 % critical value at n = 20000 is 1.36 / sqrt(n) = 0.0096


def test_edm_sigma_is_lognormal():
    gen = torch.Generator().manual_seed(1)
    sigma = EDMLoss().sample_sigma(N_SAMPLES, torch.empty(0), gen)
    assert sigma.shape == (N_SAMPLES, 1, 1, 1)
    assert ks_statistic(sigma, LogNormal(-1.2, 1.2).cdf) < KS_LIMIT


def test_ve_sigma_is_log_uniform():
    gen = torch.Generator().manual_seed(2)
    sigma = VELoss().sample_sigma(N_SAMPLES, torch.empty(0), gen)
    assert 0.02 <= sigma.min() and sigma.max() <= 100
    dist = Uniform(math.log(0.02), math.log(100))
    assert ks_statistic(sigma.log(), lambda v: dist.cdf(v.clamp(dist.low, dist.high))) < KS_LIMIT


def test_vp_time_is_uniform_on_epsilon_t_to_one():
    gen = torch.Generator().manual_seed(3)
    sigma = VPLoss().sample_sigma(N_SAMPLES, torch.empty(0), gen)
    t = vp_sigma_inv(sigma.double()).float()
    dist = Uniform(1e-5, 1.0)
    assert ks_statistic(t, lambda v: dist.cdf(v.clamp(1e-5, 1.0))) < KS_LIMIT


# ---------------------------------------------------------------------------- masking
def test_edm_loss_equals_hand_computation_over_in_sector_pixels():
    images, labels, sector = batch(n=2)
    sector[1] = False
    sector[1, :3, :3] = True  # samples with very different sector sizes
    net = PixelwiseDenoiser()
    loss, logs = EDMLoss()(net, images, labels, sector, torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)
    sigma = (torch.randn(2, 1, 1, 1, generator=gen) * 1.2 - 1.2).exp()
    noise = torch.randn(images.shape, generator=gen) * sigma
    weight = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    err = weight * (net(images + noise, sigma) - images) ** 2
    mask = sector[:, None].float()
    # One mean over every in-sector pixel of the batch (docs/design.md), not a mean of means.
    hand = (err * mask).sum() / mask.sum()
    torch.testing.assert_close(loss, hand)
    assert logs["loss"] == loss.detach()


@pytest.mark.parametrize("loss_fn", [EDMLoss(), VELoss(), VPLoss()])
def test_pixels_outside_the_sector_do_not_change_the_loss(loss_fn):
    images, labels, sector = batch()
    net = PixelwiseDenoiser()
    changed = torch.where(sector[:, None], images, torch.full_like(images, 50.0))
    a, _ = loss_fn(net, images, labels, sector, torch.Generator().manual_seed(7))
    b, _ = loss_fn(net, changed, labels, sector, torch.Generator().manual_seed(7))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    inverted, _ = loss_fn(net, changed, labels, ~sector, torch.Generator().manual_seed(7))
    assert not torch.allclose(a, inverted)


def test_empty_sector_gives_zero_and_sector_is_resized_to_latents():
    images, labels, sector = batch(size=8)
    net = PixelwiseDenoiser()
    zero, _ = EDMLoss()(net, images, labels, torch.zeros_like(sector), torch.Generator())
    assert zero.item() == 0.0
    big = sector.repeat_interleave(4, 1).repeat_interleave(4, 2)  # 32² sector for 8² latents
    assert torch.equal(sector_mask_like(big, images), sector[:, None].float())
    a, _ = EDMLoss()(net, images, labels, big, torch.Generator().manual_seed(1))
    b, _ = EDMLoss()(net, images, labels, sector, torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="sector must have shape"):
        EDMLoss()(net, images, labels, sector[:1], torch.Generator())


# ---------------------------------------------------------------------------- DDPM
def test_ddpm_loss_is_eps_mse_of_the_ddpm_forward_process():
    model = build_model("sdm", "tiny", image_size=8, channel_mult=(1,), spade_hidden=8)
    randomize_zero_init(model).eval()
    images, labels, sector = batch(size=8)
    with torch.no_grad():
        # sdm learns its variance: the eps-MSE is the hybrid loss's simple term, logged as mse
        _, logs = DDPMLoss()(model, images, labels, sector, torch.Generator().manual_seed(9))
        loss = logs["mse"]
        gen = torch.Generator().manual_seed(9)
        t = torch.randint(0, 1000, (2,), generator=gen)
        eps = torch.randn(images.shape, generator=gen)
        abar = model.alphas_cumprod[t].reshape(-1, 1, 1, 1)
        x_t = abar.sqrt() * images + (1 - abar).sqrt() * eps
        err = (model.predict_eps(x_t, t, labels) - eps) ** 2
        mask = sector[:, None].float()
        torch.testing.assert_close(loss, (err * mask).sum() / mask.sum(), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="DDPMEpsModel"):
        DDPMLoss()(PixelwiseDenoiser(), images, labels, sector)


# ---------------------------------------------------------------------------- real networks
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_loss_is_reproducible_with_a_generator(name):
    torch.manual_seed(0)
    model = build_model(name, "tiny", image_size=8, channel_mult=(1,), spade_hidden=8)
    randomize_zero_init(model).eval()
    loss_fn = build_loss(name)
    images, labels, sector = batch(size=8)
    a, logs = loss_fn(model, images, labels, sector, torch.Generator().manual_seed(11))
    b, _ = loss_fn(model, images, labels, sector, torch.Generator().manual_seed(11))
    c, _ = loss_fn(model, images, labels, sector, torch.Generator().manual_seed(12))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.ndim == 0 and torch.isfinite(a) and set(logs) == {"loss", "mse"}
    a.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_gradient_of_the_loss_reaches_every_spade_mlp():
    torch.manual_seed(0)
    config = small_config(image_size=8, spade_hidden=8)
    model = EDMPrecond(randomize_zero_init(SpadeUNet(config)))
    images, labels, sector = batch(size=8)
    loss, _ = EDMLoss()(model, images, labels, sector, torch.Generator().manual_seed(0))
    loss.backward()
    layers = [m for m in model.modules() if isinstance(m, SPADE)]
    assert layers
    for layer in layers:
        for name, p in layer.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{layer.key}.{name}"


def test_loss_rejects_bad_images():
    _, labels, sector = batch()
    with pytest.raises(ValueError, match="floating-point batch"):
        EDMLoss()(PixelwiseDenoiser(), torch.zeros(2, 8, 8), labels, sector)
    with pytest.raises(ValueError, match="Unknown loss parameter"):
        build_loss("edm", sigma_min=3)
