"""The DDPM model (edmcli.models.ddpm): its linear schedule against a hand computation, the
sigma parameterisation and x_0 prediction; the SDM baseline as published (echo_from_noise):
cosine schedule, learned variance, hybrid loss, clipped x_0; and the original DDPM kept as an
option that still gives today's results.

Closed forms are computed here independently of the model: the cosine abar by hand, the
Gaussian KL with ``torch.distributions.kl_divergence``, the decoder likelihood with the CDF of
``torch.distributions.Normal``.
"""

from __future__ import annotations

import math
from dataclasses import asdict

import pytest
import torch
from tiny_nets import randomize_zero_init, small_config
from torch import nn
from torch.distributions import Normal, kl_divergence

from edmcli.errors import EchoSynthError
from edmcli.models.ddpm import DDPMEpsModel, ddpm_alphas_cumprod, ddpm_betas
from edmcli.models.diffusion_loss import (
    DDPMLoss,
    discretized_gaussian_log_likelihood,
    normal_kl,
)
from edmcli.models.registry import build_loss, build_model, precond_settings, unet_config
from edmcli.models.unet import SpadeUNet
from edmcli.runs.diffusion_run import DiffusionSettings, build_network
from edmcli.sampling.pipeline import SampleNoise, model_sigmas, start_scale
from edmcli.sampling.solvers import SOLVERS
from edmcli.settings import resolve
from edmcli.training.diffusion_plan import diffusion_run_settings

F64 = torch.float64
LEGACY = {"noise_schedule": "linear", "learn_sigma": False, "clip_denoised": False}


def tiny_model(num_steps: int = 1000, **params) -> DDPMEpsModel:
    torch.manual_seed(0)
    out = 2 if params.get("learn_sigma") else 1
    net = SpadeUNet(small_config(image_size=8, spade_hidden=8, out_channels=out))
    return DDPMEpsModel(randomize_zero_init(net), num_steps=num_steps, **params).eval()


def grid_batch(n: int = 6, seed: int = 0):
    """Images on the 256 levels of [-1, 1] (with both extremes), labels, sector."""
    gen = torch.Generator().manual_seed(seed)
    levels = torch.randint(0, 256, (n, 1, 8, 8), generator=gen)
    levels[0, 0, 4, :2] = torch.tensor([0, 255])
    images = levels.float() / 255 * 2 - 1
    labels = torch.randint(1, 5, (n, 8, 8), generator=gen)
    labels[:, :, :2] = 0
    return images, labels, labels > 0


def label_maps(n: int = 2, size: int = 8) -> torch.Tensor:
    return torch.randint(0, 5, (n, size, size), generator=torch.Generator().manual_seed(3))


# ---------------------------------------------------------------------------- the DDPM model
def test_ddpm_schedule_matches_hand_computation():
    abar = ddpm_alphas_cumprod(1000, 1e-4, 0.02)
    prod, hand = 1.0, []
    for i in range(1000):
        prod *= 1 - (1e-4 + (0.02 - 1e-4) * i / 999)
        hand.append(prod)
    torch.testing.assert_close(abar, torch.tensor(hand, dtype=torch.float64), rtol=1e-12, atol=0)
    assert abar[0].item() == pytest.approx(1 - 1e-4)
    assert abar[-1].item() == pytest.approx(4.04e-5, rel=1e-2)  # the well-known DDPM endpoint
    model = tiny_model()
    torch.testing.assert_close(model.alphas_cumprod, abar.float())
    torch.testing.assert_close(model.betas[[0, -1]], torch.tensor([1e-4, 0.02]))
    torch.testing.assert_close(torch.cumprod(1 - model.betas.double(), 0), abar, rtol=1e-6, atol=0)
    sig = ((1 - abar) / abar).sqrt().float()
    torch.testing.assert_close(model.sigmas, sig)
    torch.testing.assert_close(model.sigma(torch.tensor([0, 999])), sig[[0, 999]])
    assert model.sigma_min == pytest.approx(sig[0].item()) and model.sigma_max > 150


def test_ddpm_timestep_of_every_discrete_sigma_is_exact():
    model = tiny_model()
    assert torch.equal(model.timestep(model.sigmas), torch.arange(1000))
    assert torch.equal(model.round_sigma(model.sigmas[[3, 500]] * 1.0001), model.sigmas[[3, 500]])


def test_ddpm_sigma_parameterisation_and_x0_prediction():
    model = tiny_model()
    x0, eps = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    t = torch.tensor([10, 700])
    abar = model.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    # x = x_t / sqrt(abar) = x0 + sigma_t eps.
    sigma = model.sigma(t).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(x_t / abar.sqrt(), x0 + sigma * eps)
    # x0_from_eps inverts the forward noising.
    torch.testing.assert_close(model.x0_from_eps(x_t, t, eps), x0, rtol=1e-4, atol=1e-4)
    lab = label_maps()
    with torch.no_grad():
        eps_hat = model.predict_eps(x_t, t, lab)
        x0_hat = model.predict_x0(x_t, t, lab)
        torch.testing.assert_close(x0_hat, (x_t - (1 - abar).sqrt() * eps_hat) / abar.sqrt())
        # The uniform denoiser: D(x; sigma_t) = x - sigma_t eps_hat(x_t, t) = x0_hat.
        x = x_t / abar.sqrt()
        torch.testing.assert_close(model(x, sigma.flatten(), lab), x0_hat, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(
            model(x, sigma.flatten(), lab, return_eps=True), eps_hat, rtol=1e-4, atol=1e-4
        )
    with pytest.raises(ValueError, match="integer timesteps"):
        model.predict_eps(x_t, torch.tensor([1.0, 2.0]), lab)
    with pytest.raises(ValueError, match="0..999"):
        model.predict_eps(x_t, torch.tensor([0, 1000]), lab)


# ---------------------------------------------------------------------------- cosine schedule
def test_cosine_alphas_cumprod_by_hand():
    T, s = 1000, 0.008

    def f(t):
        return math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2

    abar = ddpm_alphas_cumprod(T, noise_schedule="cosine")
    for t in (0, 1, 10, 250, 500, 900, 998):  # abar of x_{t+1} = f(t + 1) / f(0)
        assert abar[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-10)
    assert abar[0].item() == pytest.approx(1 - (1 - f(1) / f(0)), rel=1e-12)
    betas = ddpm_betas(T, "cosine")
    assert bool((betas <= 0.999).all()) and bool((betas > 0).all())
    assert betas[-1].item() == 0.999  # 1 - f(T) / f(T - 1) = 1, clipped
    assert abar[-1].item() == pytest.approx(f(T - 1) / f(0) * 0.001, rel=1e-10)
    torch.testing.assert_close(torch.cumprod(1 - betas, 0), abar, rtol=1e-12, atol=0)
    model = tiny_model(noise_schedule="cosine")
    torch.testing.assert_close(model.alphas_cumprod, abar.float())
    torch.testing.assert_close(model.sigmas, ((1 - abar) / abar).sqrt().float())
    assert model.sigma_max > 1e4 and model.sigma_min == pytest.approx(6.4e-3, rel=0.01)
    with pytest.raises(ValueError, match="noise_schedule"):
        ddpm_betas(10, "quadratic")


def test_learned_variance_interpolation_at_v_minus_one_zero_one():
    model = tiny_model(noise_schedule="cosine", learn_sigma=True)
    abar = ddpm_alphas_cumprod(1000, noise_schedule="cosine")
    abar_prev = torch.cat([torch.ones(1, dtype=F64), abar[:-1]])
    beta = 1 - abar / abar_prev
    tilde = (1 - abar_prev) / (1 - abar) * beta
    t = torch.tensor([0, 1, 17, 500, 999])
    tilde_clipped = tilde[t.clamp(min=1)]  # log beta~ at t = 0 taken from t = 1
    for v, expected in ((-1.0, tilde_clipped), (0.0, (beta[t] * tilde_clipped).sqrt()),
                        (1.0, beta[t])):  # fmt: skip
        frac = torch.full((5, 1, 1, 1), (v + 1) / 2)
        got = model.log_variance(t, frac).exp().flatten().double()
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=0)
    with pytest.raises(ValueError, match="output channels"):
        DDPMEpsModel(SpadeUNet(small_config(image_size=8)), learn_sigma=True)


def test_gaussian_kl_matches_torch_distributions():
    gen = torch.Generator().manual_seed(1)
    m1, m2 = torch.randn(50, generator=gen, dtype=F64), torch.randn(50, generator=gen, dtype=F64)
    lv1, lv2 = torch.randn(50, generator=gen, dtype=F64), torch.randn(50, generator=gen, dtype=F64)
    expected = kl_divergence(Normal(m1, (0.5 * lv1).exp()), Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), expected, rtol=1e-10, atol=1e-12)
    assert normal_kl(m1, lv1, m1, lv1).abs().max() < 1e-12


def test_discretised_decoder_likelihood_matches_normal_cdf():
    h = 1 / 255
    x = torch.tensor(
        [-1.0, -1 + 2 * h, -0.3 + 0.6 * h, 0.0 + h, 0.5 - h, 1 - 2 * h, 1.0], dtype=F64
    )
    x = (torch.round((x + 1) / 2 * 255) / 255) * 2 - 1  # on the 256 levels
    gen = torch.Generator().manual_seed(2)
    for scale in (0.003, 0.02, 0.3):
        mean = x + scale * torch.randn(x.shape, generator=gen, dtype=F64)
        normal = Normal(mean, torch.full_like(mean, scale))
        upper, lower = normal.cdf(x + h), normal.cdf(x - h)
        mass = upper - lower
        mass[0] = upper[0]  # the lowest bin reaches -inf
        mass[-1] = 1 - lower[-1]  # the highest +inf
        got = discretized_gaussian_log_likelihood(x, mean, torch.full_like(mean, math.log(scale)))
        torch.testing.assert_close(got, mass.log(), rtol=1e-7, atol=1e-9)
    # a bin far in the tail keeps its (tiny) mass instead of cancelling to 0
    far = discretized_gaussian_log_likelihood(
        torch.tensor([0.5], dtype=F64),
        torch.tensor([0.0], dtype=F64),
        torch.tensor([-3.0], dtype=F64),
    )
    lo, hi = (0.5 - 1 / 255) / math.exp(-3), (0.5 + 1 / 255) / math.exp(-3)
    tail = 0.5 * (math.erfc(lo / math.sqrt(2)) - math.erfc(hi / math.sqrt(2)))  # about 1e-23
    assert far.item() == pytest.approx(math.log(tail), rel=1e-9)


# ---------------------------------------------------------------------------- hybrid loss
def reference_hybrid(model, images, labels, sector, seed, lam=0.001):
    """The hybrid loss recomputed from the same draws with torch.distributions."""
    n, T = images.shape[0], model.num_steps
    gen = torch.Generator().manual_seed(seed)
    t = torch.randint(0, T, (n,), generator=gen)
    eps = torch.randn(images.shape, generator=gen)
    betas = ddpm_betas(T, model.noise_schedule)
    abar = torch.cumprod(1 - betas, 0)
    abar_prev = torch.cat([torch.ones(1, dtype=F64), abar[:-1]])
    tilde = (1 - abar_prev) / (1 - abar) * betas

    def at(table):  # noqa: E306
        return table[t].reshape(-1, 1, 1, 1).float()

    x_t = at(abar).sqrt() * images + at(1 - abar).sqrt() * eps
    with torch.no_grad():
        out = model.net(x_t, t.float(), labels=labels)
    eps_hat, v = out[:, :1], out[:, 1:]
    mask = sector[:, None].float()
    simple = ((eps_hat - eps) ** 2 * mask).sum() / mask.sum()
    x0_hat = (x_t - at(1 - abar).sqrt() * eps_hat) / at(abar).sqrt()
    c0 = at(abar_prev.sqrt() * betas / (1 - abar))
    ct = at((1 - betas).sqrt() * (1 - abar_prev) / (1 - abar))
    mean_q, mean_p = c0 * images + ct * x_t, c0 * x0_hat + ct * x_t
    frac = (v + 1) / 2
    log_tilde = torch.cat([tilde[1:2], tilde[1:]]).log()
    var_p = (frac * at(betas.log()) + (1 - frac) * at(log_tilde)).exp()
    kl = kl_divergence(
        Normal(mean_q, at(tilde).clamp_min(1e-30).sqrt()), Normal(mean_p, var_p.sqrt())
    )
    p = Normal(mean_p, var_p.sqrt())
    h = 1 / 255
    mass = p.cdf(images + h) - p.cdf(images - h)
    mass = torch.where(images < -1 + h, p.cdf(images + h), mass)
    mass = torch.where(images > 1 - h, 1 - p.cdf(images - h), mass)
    per_pixel = torch.where((t == 0).reshape(-1, 1, 1, 1), -mass.log(), kl) / math.log(2)
    vlb = T * (per_pixel * mask).sum() / mask.sum()
    return simple, vlb, simple + lam * vlb, t


def test_hybrid_loss_is_simple_plus_lambda_vlb():
    model = tiny_model(num_steps=10, noise_schedule="cosine", learn_sigma=True)
    images, labels, sector = grid_batch()
    seed = 4
    simple, vlb, total, t = reference_hybrid(model, images, labels, sector, seed)
    assert 0 in t.tolist() and (t > 0).any()  # both the KL and the decoder term are exercised
    loss_fn = DDPMLoss()
    with torch.no_grad():
        loss, logs = loss_fn(model, images, labels, sector, torch.Generator().manual_seed(seed))
        got_simple, got_vlb = loss_fn.terms(
            model, images, labels, sector, torch.Generator().manual_seed(seed)
        )
    torch.testing.assert_close(got_simple, simple, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_vlb, vlb, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss, total, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss, got_simple + 0.001 * got_vlb, rtol=1e-6, atol=0)
    assert set(logs) == {"loss", "mse"} and torch.equal(logs["mse"], got_simple)
    assert float(vlb) > 0
    with pytest.raises(ValueError, match="lambda_vlb"):
        DDPMLoss(lambda_vlb=-1)


def test_vlb_gradient_reaches_the_variance_output_only():
    model = tiny_model(num_steps=10, noise_schedule="cosine", learn_sigma=True).train()
    images, labels, sector = grid_batch()
    seen = {}

    def keep(_module, _inputs, output):
        output.retain_grad()
        seen["out"] = output

    model.net.register_forward_hook(keep)
    simple, vlb = DDPMLoss().terms(model, images, labels, sector, torch.Generator().manual_seed(4))
    vlb.backward(retain_graph=True)
    grad = seen["out"].grad
    assert grad[:, :1].abs().max() == 0  # stop-gradient: the vlb's mean uses a detached eps
    assert grad[:, 1:].abs().max() > 0
    seen["out"].grad = None
    simple.backward()
    grad = seen["out"].grad
    assert grad[:, 1:].abs().max() == 0 and grad[:, :1].abs().max() > 0


def test_loss_and_sampling_of_the_published_sdm_are_finite():
    model = build_model("sdm", "tiny", image_size=8, channel_mult=(1,), spade_hidden=8)
    assert (model.noise_schedule, model.learn_sigma, model.clip_denoised) == ("cosine", True, True)
    assert model.net.config.out_channels == 2
    randomize_zero_init(model)
    images, labels, sector = grid_batch(n=2)
    loss, _ = build_loss("sdm")(model, images, labels, sector, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)
    loss.backward()
    # clipping: D stays in [-1, 1] and equals the clamped estimate of the unclipped model
    model.eval()
    x = 30 * torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        clipped = model(x, 20.0, labels)
        model.clip_denoised = False
        raw = model(x, 20.0, labels)
    assert clipped.abs().max() <= 1 and raw.abs().max() > 1
    torch.testing.assert_close(clipped, raw.clamp(-1, 1))


# ---------------------------------------------------------------------------- the old option
def _golden_model(**precond) -> nn.Module:
    torch.manual_seed(0)
    model = build_model("sdm", "tiny", image_size=8, channel_mult=(1,), spade_hidden=8, **precond)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


def test_linear_fixed_variance_option_gives_todays_results():
    """Numbers recorded with the code before the published SDM became the default."""
    model = _golden_model(**LEGACY)
    assert isinstance(model, DDPMEpsModel) and model.net.config.out_channels == 1
    torch.testing.assert_close(model.alphas_cumprod, ddpm_alphas_cumprod().float())
    # an old checkpoint (betas, alphas_cumprod, sigmas and the UNet) loads strictly
    assert {k for k in model.state_dict() if not k.startswith("net.")} == {
        "betas", "alphas_cumprod", "sigmas",
    }  # fmt: skip
    gen = torch.Generator().manual_seed(2)
    images = torch.rand(2, 1, 8, 8, generator=gen) * 2 - 1
    labels = torch.randint(1, 5, (2, 8, 8), generator=gen)
    labels[:, :, :2] = 0
    loss, _ = build_loss("sdm")(model, images, labels, labels > 0, torch.Generator().manual_seed(3))
    assert loss.item() == pytest.approx(1.6158651113510132, rel=1e-5)
    golden = {("ddpm_ancestral", 5): (-4476.599874019623, 17324.97438287735),
              ("ddim", 4): (-4246.983191668987, 17108.60940104723)}  # fmt: skip
    with torch.no_grad():
        for (solver, steps), (total, absolute) in golden.items():
            sigmas = model_sigmas("sdm", model, steps)
            noise = SampleNoise([7, 8], (1, 8, 8), torch.device("cpu"))
            x = noise.draw() * start_scale("sdm", float(sigmas[0]))
            out = SOLVERS[solver](lambda x, s: model(x, s, labels), x, sigmas, noise=noise)
            assert out.double().sum().item() == pytest.approx(total, rel=1e-4)
            assert out.double().abs().sum().item() == pytest.approx(absolute, rel=1e-4)


def test_run_settings_record_and_rebuild_the_preconditioning(phantom_store):
    published = precond_settings("sdm")
    assert published == {"num_steps": 1000, "beta_start": 1e-4, "beta_end": 0.02,
                         "noise_schedule": "cosine", "learn_sigma": True,
                         "clip_denoised": True}  # fmt: skip
    assert precond_settings("sdm", **LEGACY)["noise_schedule"] == "linear"
    # a run recorded before the field existed (no precond) rebuilds the original DDPM
    legacy_unet = asdict(unet_config("sdm", image_size=8, precond=LEGACY))
    old = DiffusionSettings(model="sdm", data="d", preset="tiny", image_size=8, net_size=8,
                            unet=legacy_unet)  # fmt: skip
    net = build_network(old)
    assert (net.noise_schedule, net.learn_sigma, net.clip_denoised) == ("linear", False, False)
    new = DiffusionSettings(**{**asdict(old), "precond": published,
                               "unet": asdict(unet_config("sdm", image_size=8))})  # fmt: skip
    net = build_network(new)
    assert (net.noise_schedule, net.learn_sigma, net.clip_denoised) == ("cosine", True, True)
    # train-diffusion: the settings layer accepts the options and the run records them
    values = resolve("diffusion", "tiny", {"learn_sigma": False, "noise_schedule": "linear"})
    assert values["learn_sigma"] is False
    settings, _ = diffusion_run_settings("sdm", phantom_store, "tiny", None, {}, dict(LEGACY))
    assert settings.precond == {**published, **LEGACY} and settings.unet["out_channels"] == 1
    settings, _ = diffusion_run_settings("sdm", phantom_store, "tiny", None, {})
    assert settings.precond == published and settings.unet["out_channels"] == 2
    edm, _ = diffusion_run_settings("edm", phantom_store, "tiny", None, {})
    assert edm.precond == {"sigma_data": 0.5, "sigma_min": 0.002, "sigma_max": 80.0}
    with pytest.raises(EchoSynthError, match="learn_sigma"):
        diffusion_run_settings("edm", phantom_store, "tiny", None, {}, {"learn_sigma": True})
    with pytest.raises(EchoSynthError, match="noise_schedule"):
        diffusion_run_settings("sdm", phantom_store, "tiny", None, {}, {"noise_schedule": "sq"})
