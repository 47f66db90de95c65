"""Preconditionings against the closed forms of Karras et al. (docs/reference.md)."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_nets import small_config
from torch import nn

from edmcli.models.ddpm import DDPMEpsModel
from edmcli.models.preconditioning import (
    EDMPrecond,
    VEPrecond,
    VPPrecond,
    edm_coefficients,
    ve_coefficients,
    vp_coefficients,
    vp_sigma,
    vp_sigma_inv,
)
from edmcli.models.unet import SpadeUNet

SIGMAS = [0.002, 0.03, 0.5, 1.0, 7.3, 80.0]


def small_net(seed: int = 0) -> SpadeUNet:
    torch.manual_seed(seed)
    net = SpadeUNet(small_config(image_size=8, spade_hidden=8))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # random weights where the init is zero, as a trained network
        for p in net.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return net.eval()


def labels(n: int = 2, size: int = 8) -> torch.Tensor:
    return torch.randint(0, 5, (n, size, size), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("sigma", SIGMAS)
def test_edm_coefficients_closed_form(sigma):
    sd = 0.5
    c_skip, c_out, c_in, c_noise = edm_coefficients(torch.tensor(sigma), sd)
    root = math.sqrt(sigma**2 + sd**2)
    assert c_skip.item() == pytest.approx(sd**2 / (sigma**2 + sd**2), rel=1e-6)
    assert c_out.item() == pytest.approx(sigma * sd / root, rel=1e-6)
    assert c_in.item() == pytest.approx(1 / root, rel=1e-6)
    assert c_noise.item() == pytest.approx(math.log(sigma) / 4, rel=1e-6, abs=1e-7)
    # Unit variance of the network input and of its training target (EDM's design rule):
    # Var(c_in (y + n)) = c_in^2 (sd^2 + sigma^2) = 1.
    assert (c_in.item() ** 2) * (sd**2 + sigma**2) == pytest.approx(1, rel=1e-6)


@pytest.mark.parametrize("sigma", SIGMAS)
def test_ve_coefficients_closed_form(sigma):
    c_skip, c_out, c_in, c_noise = ve_coefficients(torch.tensor(sigma))
    assert (c_skip.item(), c_in.item()) == (1.0, 1.0)
    assert c_out.item() == pytest.approx(sigma, rel=1e-6)
    assert c_noise.item() == pytest.approx(math.log(sigma / 2), rel=1e-6)


@pytest.mark.parametrize("sigma", SIGMAS)
def test_vp_coefficients_closed_form(sigma):
    beta_d, beta_min, M = 19.9, 0.1, 1000
    c_skip, c_out, c_in, c_noise = vp_coefficients(torch.tensor(sigma), beta_d, beta_min, M)
    t = (math.sqrt(beta_min**2 + 2 * beta_d * math.log(1 + sigma**2)) - beta_min) / beta_d
    assert c_skip.item() == 1.0
    assert c_out.item() == pytest.approx(-sigma, rel=1e-6)
    assert c_in.item() == pytest.approx(1 / math.sqrt(sigma**2 + 1), rel=1e-6)
    assert c_noise.item() == pytest.approx((M - 1) * t, rel=1e-5)


def test_vp_sigma_schedule_round_trip():
    t = torch.tensor([1e-5, 1e-3, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64)
    sigma = vp_sigma(t)
    hand = [math.sqrt(math.exp(0.5 * 19.9 * s**2 + 0.1 * s) - 1) for s in t.tolist()]
    hand = torch.tensor(hand, dtype=torch.float64)
    torch.testing.assert_close(sigma.double(), hand, rtol=1e-5, atol=0)
    torch.testing.assert_close(vp_sigma_inv(sigma).double(), t, rtol=1e-4, atol=1e-9)


def test_vp_sigma_range():
    precond = VPPrecond(small_net())
    assert precond.sigma_min == pytest.approx(math.sqrt(math.expm1(0.5 * 19.9e-10 + 1e-6)))
    assert precond.sigma_max == pytest.approx(math.sqrt(math.expm1(10.05)), rel=1e-9)
    assert precond.sigma_min == pytest.approx(1e-3, rel=1e-2)
    assert 150 < precond.sigma_max < 153


@pytest.mark.parametrize("cls", [EDMPrecond, VEPrecond, VPPrecond])
def test_denoiser_wires_the_coefficients_around_the_network(cls):
    net = small_net()
    precond = cls(net)
    x = torch.randn(2, 1, 8, 8)
    sigma = torch.tensor([0.05, 3.0])
    lab = labels()
    with torch.no_grad():
        c_skip, c_out, c_in, c_noise = precond.coefficients(sigma.reshape(-1, 1, 1, 1))
        expected = c_skip * x + c_out * net(c_in * x, c_noise.flatten(), lab)
        torch.testing.assert_close(precond(x, sigma, lab), expected)
        # A scalar sigma is broadcast to every sample.
        torch.testing.assert_close(precond(x, 0.7, lab), precond(x, torch.tensor([0.7, 0.7]), lab))
        cache = precond.spade_cache(lab)
        assert torch.equal(precond(x, sigma, spade_cache=cache), precond(x, sigma, lab))
    with pytest.raises(ValueError, match="one value per sample"):
        precond(x, torch.ones(3), lab)


def test_precond_rejects_bad_arguments():
    with pytest.raises(ValueError, match="SpadeUNet"):
        EDMPrecond(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="sigma_data"):
        EDMPrecond(small_net(), sigma_data=0)
    with pytest.raises(ValueError, match="sigma_min"):
        VEPrecond(small_net(), sigma_min=5, sigma_max=1)
    with pytest.raises(ValueError, match="epsilon_t"):
        VPPrecond(small_net(), epsilon_t=0)
    with pytest.raises(ValueError, match="beta_start"):
        DDPMEpsModel(small_net(), beta_start=0.1, beta_end=0.01)
