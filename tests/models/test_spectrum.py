"""The weight-free sharpness term (:mod:`edmcli.models.spectrum`) against hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from edmcli.models.gamma_vae import VAEOutput
from edmcli.models.spectrum import radial_power, spectrum_distance
from edmcli.models.vae_loss import GammaVAELoss, GammaVAELossWeights


def test_a_cosine_puts_its_power_at_its_radius():
    """cos(2π·4·x/32) over the whole image: |FFT|² = (32·32/2)² at (0, ±4), nothing elsewhere;
    the ring of radius 4 holds it (mean over the ring's frequencies)."""
    h = 32
    x = torch.arange(h, dtype=torch.float64)
    image = torch.cos(2 * math.pi * 4 * x / h).expand(h, h).reshape(1, 1, h, h)
    power = radial_power(image, torch.ones(1, 1, h, h))
    k = torch.fft.fftfreq(h) * h
    ring = (torch.sqrt(k[:, None] ** 2 + k[None, :] ** 2).round() == 4).sum()
    expected = 2 * (h * h / 2) ** 2 / float(ring)
    assert float(power[0, 3]) == pytest.approx(expected, rel=1e-5)
    others = torch.cat([power[0, :3], power[0, 4:]])
    assert float(others.max()) < 1e-6 * expected


def test_white_noise_is_flat_and_blur_removes_the_high_radii():
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(64, 1, 32, 32, generator=g)
    sector = torch.ones(64, 1, 32, 32)
    power = radial_power(noise, sector).mean(0)
    assert float(power[2:].max() / power[2:].min()) < 1.3  # flat within sampling noise
    blurred = torch.nn.functional.avg_pool2d(noise, 3, 1, 1)
    assert float(spectrum_distance(noise, noise, sector)) == 0.0
    assert float(spectrum_distance(blurred, noise, sector)) > 1.0


def test_the_gradient_restores_high_frequency_power():
    """A few gradient steps on the term lift a blurred image's power at the high radii towards
    its sharp original's, whatever the phase."""
    g = torch.Generator().manual_seed(1)
    target = torch.randn(4, 1, 32, 32, generator=g)
    sector = torch.ones(4, 1, 32, 32)
    recon = torch.nn.functional.avg_pool2d(target, 3, 1, 1).clone().requires_grad_(True)
    before = float(spectrum_distance(recon.detach(), target, sector))
    opt = torch.optim.Adam([recon], lr=0.05)
    for _ in range(50):
        opt.zero_grad()
        spectrum_distance(recon, target, sector).backward()
        opt.step()
    assert float(spectrum_distance(recon.detach(), target, sector)) < 0.2 * before


def test_the_loss_counts_it_only_when_weighted():
    image = torch.rand(2, 1, 16, 16)
    sector = torch.ones(2, 1, 16, 16)
    recon = torch.nn.functional.avg_pool2d(image, 3, 1, 1)
    ones = torch.ones(2, 1, 4, 4)
    output = VAEOutput(recon, ones * 0.5, ones, ones, ones)
    paper = GammaVAELoss(warmup_epochs=0)(image, sector, output, epoch=0)
    assert "spectrum" not in paper  # the paper's logged terms stay as they were
    weights = GammaVAELossWeights(spectrum=2.0)
    sharp = GammaVAELoss(weights=weights, warmup_epochs=0)(image, sector, output, epoch=0)
    torch.testing.assert_close(sharp["total"], paper["total"] + 2.0 * sharp["spectrum"])
    with pytest.raises(ValueError, match="'spectrum' must be a finite non-negative"):
        GammaVAELossWeights(spectrum=-1.0).validate()
