"""A C-channel Γ-VAE (``train-vae --latent-channels C``): shapes, the KL summed over channels, the
latent term on channel 0, and the paper's C = 1 unchanged."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Gamma, kl_divergence

from edmcli.models.gamma_vae import GammaVAE, GammaVAEConfig, VAEOutput
from edmcli.models.vae_loss import GammaVAELoss


def _vae(channels: int) -> GammaVAE:
    torch.manual_seed(0)
    return GammaVAE(GammaVAEConfig(image_size=16, latent_size=4, base_channels=8,
                                   num_res_blocks=1, norm_num_groups=8,
                                   latent_channels=channels)).eval()  # fmt: skip


def _batch():
    image = torch.rand(2, 1, 16, 16)
    sector = torch.zeros(2, 1, 16, 16)
    sector[:, :, 2:14, 3:13] = 1
    return image, sector


def test_c_channel_latents_encode_and_decode():
    vae = _vae(3)
    image, sector = _batch()
    with torch.no_grad():
        alpha, beta = vae.posterior(image, sector)
        latent = vae.encode(image, sector)
        out = vae(image, sector, sample=False)
        recon = vae.decode(latent, sector)
    assert alpha.shape == beta.shape == latent.shape == (2, 3, 4, 4)
    inside = vae.latent_sector(sector).bool().expand_as(latent)
    assert torch.all(latent[~inside] == -1.0) and torch.all(latent[inside] > -1.0)
    torch.testing.assert_close(recon, out.recon)
    with pytest.raises(ValueError, match=r"latent must be shaped \(N, 3, H, W\)"):
        vae.decode(latent[:, :1], sector)
    with pytest.raises(ValueError, match="latent_channels must be a positive integer"):
        GammaVAEConfig(image_size=16, latent_size=4, latent_channels=0).validate()


@pytest.mark.parametrize("direction", ["posterior-first", "prior-first"])
def test_kl_is_the_sum_over_channels_of_per_element_gamma_kls(direction):
    """The loss's KL: at each in-sector latent position the sum over the C channels of
    KL(Gamma(α, β) || Gamma(3.75, 10.8)) from torch.distributions, averaged over positions."""
    torch.manual_seed(1)
    n, c, h = 2, 4, 4
    alpha, beta = torch.rand(n, c, h, h) * 5 + 0.5, torch.rand(n, c, h, h) * 20 + 1
    latent_sector = torch.zeros(n, 1, h, h)
    latent_sector[:, :, 1:3, :] = 1
    output = VAEOutput(torch.zeros(n, 1, 16, 16), alpha / beta, alpha, beta, latent_sector)
    loss = GammaVAELoss(kl_direction=direction)
    terms = loss(torch.zeros(n, 1, 16, 16), torch.ones(n, 1, 16, 16), output, epoch=0)
    q, p = Gamma(alpha.double(), beta.double()), Gamma(torch.tensor(3.75).double(),
                                                       torch.tensor(10.8).double())  # fmt: skip
    per_element = kl_divergence(q, p) if direction == "posterior-first" else kl_divergence(p, q)
    expected = per_element.sum(1, keepdim=True)[latent_sector.bool()].mean()
    torch.testing.assert_close(terms["kl"].double(), expected, rtol=1e-5, atol=1e-6)


def test_latent_term_ties_only_channel_zero_to_the_image():
    n, h = 1, 4
    image = torch.rand(n, 1, 16, 16)
    sector = torch.ones(n, 1, 16, 16)
    small = torch.nn.functional.avg_pool2d(image, 4)
    z = torch.cat([small, torch.rand(n, 2, h, h)], dim=1)  # channel 0 exact, the rest anything
    ones = torch.ones(n, 3, h, h)
    output = VAEOutput(image.clone(), z, ones, ones, torch.ones(n, 1, h, h))
    terms = GammaVAELoss(warmup_epochs=0)(image, sector, output, epoch=0)
    assert float(terms["latent"]) < 1e-10 and float(terms["recon"]) == 0.0
    bad = VAEOutput(image, z, ones, ones[:, :2], torch.ones(n, 1, h, h))
    with pytest.raises(ValueError, match="must have the same shape"):
        GammaVAELoss()(image, sector, bad, epoch=0)
