"""Gamma-VAE: configuration, shapes, sector semantics, encode/decode, sampling gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets.autoencoderkl import AEKLDownsample

from edmcli.models.gamma_vae import (
    GammaVAE,
    GammaVAEConfig,
    VAEOutput,
    area_downsample,
    latent_sector_mask,
)
from edmcli.models.vae_loss import GammaVAELoss


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny convolutions run fastest on one thread; two threads stall on a shared, busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny(image_size: int = 32, latent_size: int = 16, **kw) -> GammaVAE:
    torch.manual_seed(0)
    cfg = GammaVAEConfig(
        image_size=image_size,
        latent_size=latent_size,
        base_channels=8,
        num_res_blocks=1,
        norm_num_groups=4,
        **kw,
    )
    return GammaVAE(cfg)


def _batch(n: int = 2, size: int = 32, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Smooth images in [0, 1] and a triangular sector (apex at the top centre), black outside."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.arange(size).view(-1, 1)
    cols = torch.arange(size).view(1, -1)
    sector = ((cols - size // 2).abs() <= rows * 0.6).view(1, 1, size, size).expand(n, 1, -1, -1)
    coarse = torch.rand(n, 1, 4, 4, generator=g)
    image = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False) * sector
    return image, sector.clone()


def test_config_levels_channels_and_validation():
    l128 = GammaVAEConfig(image_size=256, latent_size=128).validate()
    l64 = GammaVAEConfig(image_size=256, latent_size=64).validate()
    assert (l128.num_levels, l128.channels) == (2, (64, 128))
    assert (l64.num_levels, l64.channels) == (3, (64, 128, 192))
    assert GammaVAEConfig(image_size=64, latent_size=32).num_levels == 2
    assert GammaVAEConfig(image_size=64, latent_size=16).num_levels == 3
    with pytest.raises(
        ValueError, match="latent size 48 does not divide image size 256 into 2 or 4"
    ):
        GammaVAE(GammaVAEConfig(image_size=256, latent_size=48))
    with pytest.raises(ValueError, match="latent size 32 does not divide image size 256"):
        GammaVAEConfig(image_size=256, latent_size=32).validate()
    with pytest.raises(ValueError, match="multiples of norm_num_groups"):
        GammaVAEConfig(
            image_size=64, latent_size=16, base_channels=12, norm_num_groups=8
        ).validate()
    with pytest.raises(ValueError, match="prior_rate"):
        GammaVAEConfig(prior_rate=0.0).validate()
    with pytest.raises(ValueError, match="image_size"):
        GammaVAEConfig(image_size=0).validate()


@pytest.mark.parametrize(("latent", "downsamples"), [(128, 1), (64, 2)])
def test_paper_sizes_construct(latent, downsamples):
    vae = GammaVAE(GammaVAEConfig(image_size=256, latent_size=latent))
    for net in (vae.encoder, vae.decoder):
        assert sum(isinstance(m, AEKLDownsample) for m in net.modules()) == (
            downsamples if net is vae.encoder else 0
        )
    ups = [m for m in vae.decoder.modules() if type(m).__name__ == "UpSample"]
    assert len(ups) == downsamples
    assert vae.encoder.blocks[-1].out_channels == 2  # alpha and beta heads
    assert vae.decoder.blocks[0].in_channels == 1  # one latent channel


@pytest.mark.parametrize("latent_size", [16, 8])
def test_forward_shapes_small(latent_size):
    vae = _tiny(latent_size=latent_size)
    image, sector = _batch()
    out = vae(image, sector, sample=True)
    assert isinstance(out, VAEOutput)
    assert out.recon.shape == (2, 1, 32, 32)
    for t in (out.z, out.alpha, out.beta, out.latent_sector):
        assert t.shape == (2, 1, latent_size, latent_size)
    assert bool((out.alpha > 0).all() and (out.beta > 0).all())
    assert bool((out.recon >= 0).all() and (out.recon <= 1).all())


def test_latent_sector_mask_rule_and_area_downsample():
    sector = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    sector[0, 0, 0, :2] = True  # top-left block: 2 of 4 pixels -> in (>= 0.5)
    sector[0, 0, 0, 2] = True  # top-right block: 1 of 4 -> out
    sector[0, 0, 2:, 2:] = True  # bottom-right block: 4 of 4 -> in
    mask = latent_sector_mask(sector, 2)
    assert mask.dtype == torch.float32
    assert mask[0, 0].tolist() == [[1.0, 0.0], [0.0, 1.0]]
    image = torch.arange(16.0).view(1, 1, 4, 4)
    assert area_downsample(image, 2)[0, 0].tolist() == [[2.5, 4.5], [10.5, 12.5]]
    with pytest.raises(ValueError, match="cannot be downsampled to latent size 3"):
        latent_sector_mask(sector, 3)


def test_latent_is_zero_outside_sector_and_encode_minus_one():
    vae = _tiny()
    image, sector = _batch()
    latent_sector = latent_sector_mask(sector, 16)
    assert 0 < latent_sector.sum() < latent_sector.numel()
    out = vae(image, sector, sample=True)
    outside = latent_sector == 0
    assert bool((out.z[outside] == 0).all())
    assert bool((out.z[~outside] > 0).all())
    latent = vae.encode(image, sector)
    assert bool((latent[outside] == -1).all())
    assert bool((latent[~outside] > -1).all())


def test_encode_uses_the_posterior_mean_deterministically():
    vae = _tiny().train()  # train mode must not make encode stochastic
    image, sector = _batch()
    first, second = vae.encode(image, sector), vae.encode(image, sector)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    alpha, beta = vae.posterior(image, sector)
    mean = (alpha / beta) * latent_sector_mask(sector, 16)
    torch.testing.assert_close(first, (2 * mean - 1).where(mean > 0, torch.tensor(-1.0)))
    # forward: mean when asked (or in eval mode), a fresh sample otherwise
    torch.testing.assert_close(vae(image, sector, sample=False).z, (first + 1) / 2)
    torch.testing.assert_close(vae.eval()(image, sector).z, (first + 1) / 2)
    s1, s2 = vae(image, sector, sample=True).z, vae(image, sector, sample=True).z
    assert (s1 - s2).abs().max() > 1e-3


def test_decode_masks_and_inverts_encode():
    vae = _tiny().eval()
    image, sector = _batch()
    latent = torch.randn(2, 1, 16, 16) * 2  # values beyond [-1, 1], as a sampler may give
    decoded = vae.decode(latent, sector)
    assert decoded.shape == (2, 1, 32, 32)
    assert bool((decoded[~sector] == 0).all())
    assert bool((decoded[sector] > 0).all() and (decoded <= 1).all())
    # decode(encode(x)) is the reconstruction of the posterior mean
    torch.testing.assert_close(
        vae.decode(vae.encode(image, sector), sector), vae(image, sector, sample=False).recon
    )
    with pytest.raises(ValueError, match="latent must be 16x16"):
        vae.decode(torch.zeros(2, 1, 8, 8), sector)
    with pytest.raises(ValueError, match="image must be 32x32"):
        vae.encode(torch.zeros(2, 1, 16, 16), sector[..., :16, :16])


def test_rsample_gradients_flow_to_both_heads():
    vae = _tiny()
    image, sector = _batch()
    out = vae(image, sector, sample=True)
    alpha_grad, beta_grad = torch.autograd.grad(
        out.z.sum(), [out.alpha, out.beta], retain_graph=True
    )
    inside = out.latent_sector > 0
    assert bool((alpha_grad[inside] != 0).all() and (beta_grad[inside] != 0).all())
    assert bool((alpha_grad[~inside] == 0).all())
    out.recon.sum().backward()
    head = vae.encoder.blocks[-1].conv
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0


def test_attention_option_runs():
    vae = _tiny(latent_size=8, attention=True)
    assert any("Attention" in type(m).__name__ for m in vae.modules())
    assert not any("Attention" in type(m).__name__ for m in _tiny(latent_size=8).modules())
    image, sector = _batch()
    assert vae(image, sector).recon.shape == image.shape


def test_tiny_overfit_reduces_reconstruction_loss():
    vae = _tiny()
    image, sector = _batch()
    loss_fn = GammaVAELoss(warmup_epochs=0)
    opt = torch.optim.Adam(vae.parameters(), lr=2e-3)
    history = []
    for _ in range(30):
        terms = loss_fn(image, sector, vae(image, sector, sample=True), epoch=0)
        opt.zero_grad()
        terms["total"].backward()
        opt.step()
        history.append(terms["recon"].item())
    assert history[-1] < 0.25 * history[0]


def test_encode_and_decode_run_in_fp32_inside_autocast():
    """A frozen Γ-VAE encodes/decodes in fp32 under a bf16 autocast (before: bf16 latents,
    off by up to ~0.05 — far above σ_min = 0.002)."""
    vae = _tiny().eval()
    image, sector = _batch()
    with torch.no_grad():
        reference = vae.encode(image, sector)
        decoded = vae.decode(reference, sector)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            latent = vae.encode(image, sector)
            image_back = vae.decode(latent, sector)
            bf16_heads = vae.encoder(image)  # what the encoder gives without the guard
    assert bf16_heads.dtype == torch.bfloat16  # autocast is really on
    assert latent.dtype == torch.float32 and image_back.dtype == torch.float32
    torch.testing.assert_close(latent, reference, rtol=0, atol=0)
    torch.testing.assert_close(image_back, decoded, rtol=0, atol=0)
