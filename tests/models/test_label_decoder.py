"""The Γ-VAE decoder with labels (``train-vae --decoder-labels``): it needs and uses the label
map, keeps ``decode(encode(x))`` equal to the reconstruction, refuses what it cannot do, and the
map-following probe tells a decoder that paints the map from one that decodes the latent."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from edmcli.data.labels import LV, MYO, OUTSIDE, SECTOR, sector_mask
from edmcli.models.gamma_vae import GammaVAE, GammaVAEConfig
from edmcli.training.reconstruction import map_following, shift_structures


def _config(**kw) -> GammaVAEConfig:
    return GammaVAEConfig(image_size=16, latent_size=4, base_channels=8, num_res_blocks=1,
                          norm_num_groups=8, **kw)  # fmt: skip


def _labels(n: int = 2, size: int = 16) -> torch.Tensor:
    labels = torch.zeros(n, size, size, dtype=torch.long)
    labels[:, 2:14, 2:14] = SECTOR
    labels[:, 5:11, 4:8] = MYO
    labels[:, 6:10, 5:7] = LV
    return labels


def test_the_decoder_takes_and_uses_the_label_map():
    torch.manual_seed(0)
    vae = GammaVAE(_config(decoder_labels=True, latent_channels=2)).eval()
    for p in vae.decoder.parameters():  # SPADE starts near the identity: make it matter
        p.data.normal_(0, 0.3)
    labels, image = _labels(), torch.rand(2, 1, 16, 16)
    sector = sector_mask(labels)
    with torch.no_grad():
        latent = vae.encode(image, sector)
        decoded = vae.decode(latent, sector, labels)
        out = vae(image, sector, sample=False, labels=labels)
        other = vae.decode(latent, sector, shift_structures(labels, 3))
    assert latent.shape == (2, 2, 4, 4) and decoded.shape == (2, 1, 16, 16)
    torch.testing.assert_close(decoded, out.recon)
    assert torch.all(decoded[sector.expand_as(decoded) == 0] == 0)
    assert float((other - decoded).abs().max()) > 1e-3  # the map changes the image
    with pytest.raises(ValueError, match="takes the label map"):
        vae.decode(latent, sector)
    with pytest.raises(ValueError, match=r"labels must be shaped \(2, 16, 16\)"):
        vae.decode(latent, sector, labels[:, :8, :8])


def test_the_paper_decoder_ignores_labels_and_refusals():
    vae = GammaVAE(_config()).eval()
    labels, image = _labels(), torch.rand(2, 1, 16, 16)
    sector = sector_mask(labels)
    with torch.no_grad():
        latent = vae.encode(image, sector)
        torch.testing.assert_close(vae.decode(latent, sector, labels), vae.decode(latent, sector))
    assert map_following(vae, image, labels) == 0.0
    with pytest.raises(ValueError, match="no bottleneck attention"):
        _config(decoder_labels=True, attention=True).validate()


def test_shift_structures_moves_the_heart_inside_a_fixed_sector():
    labels = _labels(1)
    moved = shift_structures(labels, 2)
    assert torch.equal(moved == OUTSIDE, labels == OUTSIDE)  # the sector stays
    assert torch.equal(moved[0, 6:10, 7:9], labels[0, 6:10, 5:7])  # LV two pixels right
    assert int((moved == LV).sum()) == int((labels == LV).sum())


class _Fake(torch.nn.Module):
    """encode: the image at latent size; decode: the latent upsampled (``paint=False``) or a
    picture of the map (``paint=True``)."""

    def __init__(self, paint: bool) -> None:
        super().__init__()
        self.paint = paint

    def encode(self, image, sector):
        return F.avg_pool2d(image, 4)

    def decode(self, latent, sector, labels):
        if self.paint:
            return (labels == LV).float()[:, None] + 0.5 * (labels == MYO).float()[:, None]
        return F.interpolate(latent, scale_factor=4, mode="nearest")


def test_map_following_is_one_for_a_painter_and_zero_for_a_latent_decoder():
    labels = _labels()
    image = (labels == LV).float()[:, None] + 0.5 * (labels == MYO).float()[:, None]
    assert map_following(_Fake(paint=True), image, labels, shift=2) == pytest.approx(1.0)
    assert map_following(_Fake(paint=False), image, labels, shift=2) == pytest.approx(0.0)


def test_the_decoder_width_is_a_recorded_setting():
    """The SPADE width is part of the run's settings, so a run keeps loading when the default
    changes; a checkpoint of another width is refused in one line (runs.vae_run)."""
    assert GammaVAE(_config(decoder_labels=True)).decoder.norm_out.shared.out_channels == 24
    vae = GammaVAE(_config(decoder_labels=True, decoder_hidden=8))
    assert vae.decoder.norm_out.shared.out_channels == 8
    with pytest.raises(ValueError, match="decoder_hidden must be a positive integer"):
        _config(decoder_hidden=0).validate()
