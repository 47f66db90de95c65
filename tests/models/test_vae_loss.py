"""Gamma-VAE loss: every term masked and normalised by the in-sector count (hand-computed)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.distributions import Gamma, kl_divergence

from edmcli.models.gamma_vae import VAEOutput, latent_sector_mask
from edmcli.models.masked import masked_mean
from edmcli.models.vae_loss import GammaVAELoss, GammaVAELossWeights

PRIOR = (3.75, 10.8)

# 4x4 sector with 9 pixels in; latent 2x2: top-left block 4/4 in, top-right 1/4 (out),
# bottom-left 0/4 (out), bottom-right 4/4 in.
SECTOR = torch.tensor(
    [[1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 1, 1], [0, 0, 1, 1]], dtype=torch.bool
).view(1, 1, 4, 4)
IMAGE = torch.tensor(
    [
        [0.1, 0.2, 0.9, 0.9],  # 0.9: garbage outside the sector, must not count
        [0.3, 0.4, 0.5, 0.9],
        [0.9, 0.9, 0.6, 0.7],
        [0.9, 0.9, 0.8, 1.0],
    ]
).view(1, 1, 4, 4)
RECON = torch.tensor(
    [[0.0, 0.4, 0.0, 0.0], [0.3, 0.1, 0.5, 0.0], [0.0, 0.0, 0.2, 0.7], [0.0, 0.0, 0.8, 0.5]]
).view(1, 1, 4, 4)
ALPHA = torch.tensor([[2.0, 5.0], [1.0, 3.0]]).view(1, 1, 2, 2)
BETA = torch.tensor([[4.0, 10.0], [2.0, 6.0]]).view(1, 1, 2, 2)
Z = torch.tensor([[0.3, 0.0], [0.0, 0.8]]).view(1, 1, 2, 2)


def _output() -> VAEOutput:
    return VAEOutput(RECON, Z, ALPHA, BETA, latent_sector_mask(SECTOR, 2))


def _expected() -> dict[str, float]:
    inside = [(r, c) for r in range(4) for c in range(4) if SECTOR[0, 0, r, c]]
    assert len(inside) == 9
    img, rec = IMAGE[0, 0], RECON[0, 0]
    recon = sum(float(img[r, c] - rec[r, c]) ** 2 for r, c in inside) / 9
    perceptual = sum(abs(float(img[r, c] - rec[r, c])) for r, c in inside) / 9
    kl_tl = kl_divergence(Gamma(2.0, 4.0), Gamma(*PRIOR))
    kl_br = kl_divergence(Gamma(3.0, 6.0), Gamma(*PRIOR))
    kl = float(kl_tl + kl_br) / 2
    mean_tl = (0.1 + 0.2 + 0.3 + 0.4) / 4
    mean_br = (0.6 + 0.7 + 0.8 + 1.0) / 4
    latent = ((0.3 - mean_tl) ** 2 + (0.8 - mean_br) ** 2) / 2
    return {"recon": recon, "perceptual": perceptual, "kl": kl, "latent": latent}


class _AbsDiff(nn.Module):
    """Stand-in perceptual module: |image - recon| per pixel, counting its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, image, recon, sector):
        self.calls += 1
        return (image - recon).abs()


def test_masked_mean():
    values = torch.tensor([[1.0, 2.0], [3.0, 10.0]])
    mask = torch.tensor([[True, True], [True, False]])
    assert masked_mean(values, mask).item() == pytest.approx(2.0)
    assert masked_mean(values, torch.zeros(2, 2)).item() == 0.0  # no NaN on empty masks
    # A (N, 1, H, W) mask over (N, 3, H, W) values counts every channel.
    three = torch.arange(12.0).view(1, 3, 2, 2)
    one = torch.tensor([[1.0, 0.0], [0.0, 0.0]]).view(1, 1, 2, 2)
    assert masked_mean(three, one).item() == pytest.approx((0 + 4 + 8) / 3)
    with pytest.raises(ValueError, match="does not broadcast"):
        masked_mean(values, torch.ones(3))


def test_terms_hand_computed_and_warm_up():
    perceptual = _AbsDiff()
    loss = GammaVAELoss(*PRIOR, perceptual=perceptual, warmup_epochs=5)
    expected = _expected()
    cold = loss(IMAGE, SECTOR, _output(), epoch=4)
    assert perceptual.calls == 0 and cold["perceptual"].item() == 0.0
    for name in ("recon", "kl", "latent"):
        assert cold[name].item() == pytest.approx(expected[name], rel=1e-5), name
    assert cold["total"].item() == pytest.approx(
        10 * expected["recon"] + 1e-3 * expected["kl"], rel=1e-5
    )
    warm = loss(IMAGE, SECTOR, _output(), epoch=5)
    assert perceptual.calls == 1
    for name, value in expected.items():
        assert warm[name].item() == pytest.approx(value, rel=1e-5), name
    total = (
        10 * expected["recon"]
        + 1e-3 * expected["perceptual"]
        + 1e-3 * expected["kl"]
        + 1e-2 * expected["latent"]
    )
    assert warm["total"].item() == pytest.approx(total, rel=1e-5)


def test_normalised_by_count_not_by_frame():
    """Padding the frame with background, or repeating the batch, leaves every term unchanged."""
    loss = GammaVAELoss(*PRIOR, perceptual=_AbsDiff(), warmup_epochs=0)
    base = loss(IMAGE, SECTOR, _output(), epoch=0)

    def pad(x: torch.Tensor, value: float = 0.0) -> torch.Tensor:  # doubles the side
        return torch.nn.functional.pad(x, (0, x.shape[-1], 0, x.shape[-2]), value=value)

    out = _output()
    big = VAEOutput(
        pad(RECON), pad(Z), pad(ALPHA, 7.0), pad(BETA, 0.5), latent_sector_mask(pad(SECTOR), 4)
    )
    # Posterior parameters and image values outside the sector are garbage: they must not count.
    padded = loss(pad(IMAGE, 0.5), pad(SECTOR), big, epoch=0)
    batch = loss(
        IMAGE.repeat(3, 1, 1, 1),
        SECTOR.repeat(3, 1, 1, 1),
        VAEOutput(*(t.repeat(3, 1, 1, 1) for t in out)),
        epoch=0,
    )
    for name, value in base.items():
        assert padded[name].item() == pytest.approx(value.item(), rel=1e-5), name
        assert batch[name].item() == pytest.approx(value.item(), rel=1e-5), name


def test_kl_direction_and_weights():
    out = _output()
    prior_first = GammaVAELoss(*PRIOR, kl_direction="prior-first")(IMAGE, SECTOR, out, epoch=0)
    expected = float(
        kl_divergence(Gamma(*PRIOR), Gamma(2.0, 4.0))
        + kl_divergence(Gamma(*PRIOR), Gamma(3.0, 6.0))
    )
    assert prior_first["kl"].item() == pytest.approx(expected / 2, rel=1e-5)
    weights = GammaVAELossWeights(recon=0.0, perceptual=0.0, kl=2.0, latent=0.0)
    only_kl = GammaVAELoss(*PRIOR, weights=weights, warmup_epochs=0)(IMAGE, SECTOR, out, epoch=9)
    assert only_kl["total"].item() == pytest.approx(2 * _expected()["kl"], rel=1e-5)


def test_gradients_reach_reconstruction_and_posterior():
    out = _output()
    recon, alpha, beta, z = (t.clone().requires_grad_(True) for t in (out.recon, ALPHA, BETA, Z))
    terms = GammaVAELoss(*PRIOR, warmup_epochs=0)(
        IMAGE, SECTOR, VAEOutput(recon, z, alpha, beta, out.latent_sector), epoch=0
    )
    terms["total"].backward()
    assert recon.grad[~SECTOR].abs().sum() == 0 and recon.grad[SECTOR].abs().sum() > 0
    inside = out.latent_sector > 0
    assert alpha.grad[~inside].abs().sum() == 0 and alpha.grad[inside].abs().sum() > 0
    assert z.grad[inside].abs().sum() > 0


def test_rejects_bad_settings():
    with pytest.raises(ValueError, match="loss weight 'kl'"):
        GammaVAELoss(weights=GammaVAELossWeights(kl=-1.0))
    with pytest.raises(ValueError, match="posterior-first, prior-first"):
        GammaVAELoss(kl_direction="backwards")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="warmup_epochs"):
        GammaVAELoss(warmup_epochs=-1)
    with pytest.raises(ValueError, match="same shape"):
        GammaVAELoss()(IMAGE[..., :2, :2], SECTOR[..., :2, :2], _output(), epoch=0)
