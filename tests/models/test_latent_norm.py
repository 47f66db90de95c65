"""Normalised latents (:mod:`edmcli.models.latent_norm`): the map, its inverse, its records, and
the decoder that undoes it."""

from __future__ import annotations

import pytest
import torch

from edmcli.models.gamma_vae import GammaVAE, GammaVAEConfig
from edmcli.models.latent_norm import LatentNorm
from edmcli.runs.diffusion_run import latent_decoder
from edmcli.runs.vae_run import LoadedVAE


def _latents(seed: int = 0, mean: float = -0.3, std: float = 0.22):
    """Γ-VAE-like diffusion latents: −1 outside a sector, N(mean, std²) inside."""
    g = torch.Generator().manual_seed(seed)
    sector = torch.zeros(6, 1, 8, 8)
    sector[:, :, 1:7, 2:7] = 1
    inside = mean + std * torch.randn(6, 1, 8, 8, generator=g)
    return torch.where(sector.bool(), inside, torch.full_like(inside, -1.0)), sector


def test_identity_is_the_papers_model_space():
    latent, sector = _latents()
    norm = LatentNorm.identity()
    assert norm.is_identity and norm.outside_value == -1.0
    assert norm.normalise(latent, sector) is latent and norm.denormalise(latent) is latent
    assert LatentNorm.from_record(None) == norm


@pytest.mark.parametrize("sigma_data", [0.5, 0.226, 1.0])
def test_centred_latents_have_mean_zero_and_std_sigma_data_in_the_sector(sigma_data):
    latent, sector = _latents()
    inside = latent[sector.bool()].double()
    mean, std = float(inside.mean()), float(inside.std(unbiased=False))
    x = LatentNorm.centred(mean, std, sigma_data).normalise(latent, sector)
    values = x[sector.bool()].double()
    assert abs(float(values.mean())) < 1e-6
    assert float(values.std(unbiased=False)) == pytest.approx(sigma_data, rel=1e-5)


def test_outside_value_mean_or_normalised_background():
    latent, sector = _latents()
    outside = ~sector.bool()
    mean_zero = LatentNorm.centred(-0.3, 0.2, 0.5, outside="mean")
    assert torch.all(mean_zero.normalise(latent, sector)[outside] == 0.0)
    background = LatentNorm.centred(-0.3, 0.2, 0.5, outside="background")
    assert background.outside_value == pytest.approx((-1 + 0.3) * 2.5)
    x = background.normalise(latent, sector)
    torch.testing.assert_close(x[outside], torch.full_like(x[outside], -1.75))


@pytest.mark.parametrize("outside", ["mean", "background"])
def test_round_trip_is_exact_inside_the_sector(outside):
    """Inside the sector denormalise(normalise(z)) = z to float32 rounding (a few ulp)."""
    latent, sector = _latents(seed=3)
    norm = LatentNorm.centred(-0.2871, 0.2264, 0.5, outside=outside)
    back = norm.denormalise(norm.normalise(latent, sector))
    inside = sector.bool()
    ulp = torch.finfo(torch.float32).eps * latent[inside].abs().clamp_min(1.0)
    assert torch.all((back[inside] - latent[inside]).abs() <= 4 * ulp)


def test_records_round_trip_and_refuse_nonsense():
    norm = LatentNorm.centred(-0.31, 0.226, 0.5, outside="background")
    assert LatentNorm.from_record(norm.record()) == norm
    assert norm.record() == {"shift": -0.31, "scale": 0.5 / 0.226, "outside": "background"}
    with pytest.raises(ValueError, match="positive scale"):
        LatentNorm(shift=0.0, scale=0.0)
    with pytest.raises(ValueError, match="positive scale"):
        LatentNorm(shift=float("nan"), scale=1.0)
    with pytest.raises(ValueError, match="must be positive"):
        LatentNorm.centred(0.0, 0.0, 0.5)
    with pytest.raises(ValueError, match="latent outside 'edge'"):
        LatentNorm(outside="edge")


def test_the_decoder_undoes_the_normalisation():
    """decode(normalise(encode(x))) through :func:`latent_decoder` is the Γ-VAE's own
    reconstruction decode(encode(x)), whatever the outside holds."""
    torch.manual_seed(0)
    config = GammaVAEConfig(image_size=16, latent_size=4, base_channels=8, num_res_blocks=1,
                            norm_num_groups=8)  # fmt: skip
    model = GammaVAE(config).eval()
    vae = LoadedVAE(model, None, None, None, "")  # only .model is used
    image = torch.rand(3, 1, 16, 16)
    sector = torch.zeros(3, 1, 16, 16)
    sector[:, :, 2:14, 3:13] = 1
    with torch.no_grad():
        latent = model.encode(image, sector)
        expected = model.decode(latent, sector)
        for outside in ("mean", "background"):
            norm = LatentNorm.centred(-0.4, 0.3, 0.5, outside=outside)
            x = norm.normalise(latent, model.latent_sector(sector))
            torch.testing.assert_close(latent_decoder(vae, norm)(x, sector), expected,
                                       atol=1e-6, rtol=0)  # fmt: skip
    assert latent_decoder(vae, LatentNorm.identity()) == model.decode
    assert latent_decoder(None, LatentNorm.identity()) is None
