"""Ancestral sampling of the published SDM: learned variance, respacing, clipping.

For Gaussian data y ~ N(mu, s^2) every reverse step has a closed form: from x = y + sigma n to
sigma' the true conditional is Gaussian with mean mu + (s^2 + sigma'^2) / (s^2 + sigma^2)
(x - mu), which is the posterior mean at D = E[y | x], and variance
V* = (s^2 + sigma'^2) (sigma^2 - sigma'^2) / (s^2 + sigma^2). An oracle that outputs the
interpolation fraction v' giving exactly V* makes the learned-variance sampler exact at any
number of steps, where the fixed variances (beta~: too small, beta: too large) are not.
"""

from __future__ import annotations

import math

import pytest
import torch
from tiny_nets import small_config

from edmcli.models.ddpm import DDPMEpsModel, ddpm_alphas_cumprod
from edmcli.models.unet import SpadeUNet
from edmcli.sampling.pipeline import generate, solver_options_for
from edmcli.sampling.schedules import ddpm_sigmas, ddpm_timesteps
from edmcli.sampling.solvers import ddpm_ancestral

F64 = torch.float64


def cosine_sigmas(n: int) -> torch.Tensor:
    return ddpm_sigmas(n, alphas_cumprod=ddpm_alphas_cumprod(noise_schedule="cosine"))


def step_variances(sig: float, nxt: float) -> tuple[float, float]:
    """(beta~, beta) of the step sigma -> sigma' in the sigma form, (1 + sigma'^2) Sigma."""
    small = nxt**2 * (sig**2 - nxt**2) / sig**2
    large = (sig**2 - nxt**2) * (1 + nxt**2) / (1 + sig**2)
    return small, large


def gaussian_oracle(mu: float, s: float, levels: torch.Tensor, clip: bool = False):
    """denoise(x, sigma) -> (D, v') of Gaussian data, v' the fraction that gives V* exactly."""
    following = dict(zip(levels[:-1].tolist(), levels[1:].tolist(), strict=True))

    def denoise(x, sigma):
        sig = float(sigma)
        nxt = following[sig]
        denoised = mu + s**2 / (s**2 + sig**2) * (x - mu)
        if clip:
            denoised = denoised.clamp(-1, 1)
        if nxt == 0:
            return denoised, torch.zeros_like(x)
        exact = (s**2 + nxt**2) * (sig**2 - nxt**2) / (s**2 + sig**2)
        small, large = step_variances(sig, nxt)
        frac = math.log(exact / small) / math.log(large / small)
        return denoised, torch.full_like(x, frac)

    return denoise


def sample(denoise, sigmas, variance, shape=(1, 1, 100, 400), seed=11):
    g = torch.Generator().manual_seed(seed)
    x = math.sqrt(1 + sigmas[0].item() ** 2) * torch.randn(shape, generator=g, dtype=F64)
    return ddpm_ancestral(
        denoise, x, sigmas, variance=variance,
        noise=lambda i: torch.randn(shape, generator=g, dtype=F64),
    )  # fmt: skip


def textbook_learned(eps_frac_model, x_T, zs, abar):
    """Improved DDPM's sampler in x_t space: mean (x_t - beta_t / sqrt(1 - abar_t) eps) /
    sqrt(alpha_t), variance exp(v' log beta_t + (1 - v') log beta~_t), t = T-1..0."""
    abar_prev = torch.cat([torch.ones(1, dtype=F64), abar[:-1]])
    betas = 1 - abar / abar_prev
    tilde = (1 - abar_prev) / (1 - abar) * betas
    x = x_T
    for t in range(len(abar) - 1, -1, -1):
        eps, frac = eps_frac_model(x, t)
        mean = (x - betas[t] / (1 - abar[t]).sqrt() * eps) / (1 - betas[t]).sqrt()
        if t == 0:
            return mean
        log_var = frac * betas[t].log() + (1 - frac) * tilde[t].log()
        x = mean + (0.5 * log_var).exp() * zs[len(abar) - 1 - t]
    return x


def test_learned_variance_sampler_equals_improved_ddpm_textbook():
    mu, s = 0.1, 0.4
    abar = ddpm_alphas_cumprod(1000, noise_schedule="cosine")
    sig_t = ((1 - abar) / abar).sqrt()
    shape = (2, 1, 4, 4)
    g = torch.Generator().manual_seed(5)
    zs = torch.randn((1000, *shape), generator=g, dtype=F64)
    x_T = torch.randn(shape, generator=g, dtype=F64)

    def frac_of(x_t):  # any learned output, a function of what the network sees
        return 0.5 + 0.4 * torch.tanh(x_t)

    def denoise_of(x, sigma):
        return mu + s**2 / (s**2 + sigma**2) * (x - mu)

    def eps_frac_model(x_t, t):
        x = x_t / abar[t].sqrt()
        return (x - denoise_of(x, sig_t[t])) / sig_t[t], frac_of(x_t)

    expected = textbook_learned(eps_frac_model, x_T, zs, abar)
    sigmas = cosine_sigmas(1000)

    def denoise(x, sigma):
        return denoise_of(x, sigma), frac_of(x / (1 + sigma**2).sqrt())

    x = math.sqrt(1 + float(sigmas[0]) ** 2) * x_T
    got = ddpm_ancestral(denoise, x, sigmas, noise=lambda i: zs[i], variance="learned")
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-8)


def test_respaced_variance_interpolates_beta_and_beta_tilde_of_the_strided_chain():
    abar = ddpm_alphas_cumprod(1000, noise_schedule="cosine")
    steps = 10
    taus = ddpm_timesteps(steps)  # 999, 888, ..., 0
    sigmas = cosine_sigmas(steps)
    i = 3
    t, s_ = int(taus[i]), int(taus[i + 1])
    beta = 1 - abar[t] / abar[s_]  # beta recomputed from abar at the strided timesteps
    tilde = (1 - abar[s_]) / (1 - abar[t]) * beta
    sub = torch.cat([sigmas[i : i + 2], sigmas.new_zeros(1)])  # sigma_i -> sigma_{i+1} -> 0
    nxt = float(sigmas[i + 1])
    for v, expected in ((-1.0, tilde), (0.0, (beta * tilde).sqrt()), (1.0, beta)):
        frac = (v + 1) / 2
        calls, draws = [], []

        def denoise(x, sigma, frac=frac, calls=calls):
            calls.append(float(sigma))  # D = 0 first; then D = x, so the last step keeps x
            return (torch.zeros_like(x) if len(calls) == 1 else x), torch.full_like(x, frac)

        def noise(k, draws=draws):
            draws.append(k)
            return torch.ones(1, 1, 1, 1, dtype=F64)

        x0 = torch.zeros(1, 1, 1, 1, dtype=F64)
        out = ddpm_ancestral(denoise, x0, sub, noise=noise, variance="learned")
        assert draws == [0]  # no noise on the last step, to sigma = 0
        # after the noisy step x = sqrt(V), V = (1 + sigma'^2) Sigma in the sigma form
        assert out.item() ** 2 / (1 + nxt**2) == pytest.approx(expected.item(), rel=1e-9)


@pytest.mark.parametrize("steps", [10, 1000])
def test_learned_variance_oracle_reproduces_the_data_statistics(steps):
    mu, s = 0.3, 0.5
    sigmas = cosine_sigmas(steps)
    out = sample(gaussian_oracle(mu, s, sigmas), sigmas, "learned")
    n = out.numel()
    final = s**4 / (s**2 + sigmas[-2].item() ** 2)  # the last step returns D(x; sigma_min)
    assert abs(out.mean().item() - mu) < 4 * s / math.sqrt(n)
    assert abs(out.var().item() - final) < 4 * final * math.sqrt(2 / (n - 1))
    if steps == 10:  # the fixed variances are off at 10 steps: beta~ too small, beta too large

        def plain(x, sigma):
            return gaussian_oracle(mu, s, sigmas)(x, sigma)[0]

        small, large = sample(plain, sigmas, "small"), sample(plain, sigmas, "large")
        assert small.std().item() < 0.8 * s and large.std().item() > 1.08 * s


def test_clipping_keeps_samples_in_range():
    mu, s = 0.8, 0.3  # a fifth of the data lies above 1
    sigmas = cosine_sigmas(25)
    clipped = sample(gaussian_oracle(mu, s, sigmas, clip=True), sigmas, "learned")
    free = sample(gaussian_oracle(mu, s, sigmas), sigmas, "learned")
    assert clipped.min() >= -1 and clipped.max() <= 1
    assert (free > 1).double().mean().item() > 0.15
    assert (clipped == 1).double().mean().item() > 0.1  # much of the mass above 1 lands on 1


class GaussianOracleNet(SpadeUNet):
    """A 'UNet' that outputs the exact (eps, v) of Gaussian data on the full 1000-step chain."""

    def __init__(self, abar: torch.Tensor, mu: float, s: float) -> None:
        super().__init__(small_config(image_size=8, model_channels=8, channel_mult=(1,),
                                      attention_head_channels=8,
                                      spade_hidden=8, out_channels=2))  # fmt: skip
        self.abar, self.mu, self.s = abar, mu, s

    def spade_cache(self, labels, max_bytes=None):
        return None

    def forward(self, x, noise_labels, labels=None, spade_cache=None):
        t = noise_labels.long().cpu()
        abar = self.abar[t].reshape(-1, 1, 1, 1)
        abar_prev = torch.where(t > 0, self.abar[(t - 1).clamp(min=0)], 1.0).reshape(-1, 1, 1, 1)
        a, b2, s2 = abar.sqrt(), 1 - abar, self.s**2
        x = x.double()
        eps = b2.sqrt() * (x - a * self.mu) / (abar * s2 + b2)
        beta = 1 - abar / abar_prev
        tilde = (1 - abar_prev) / (1 - abar) * beta
        prior = abar_prev * s2 + 1 - abar_prev  # Var(x_{t-1})
        exact = prior * beta / ((1 - beta) * prior + beta)  # Var(x_{t-1} | x_t)
        frac = torch.where(t.reshape(-1, 1, 1, 1) > 0,
                           (exact / tilde).log() / (beta / tilde).log(), 0.0)  # fmt: skip
        return torch.cat([eps, (2 * frac - 1).expand_as(eps)], dim=1).float()


def test_generate_samples_a_learned_variance_model_with_its_variance():
    mu, s = 0.1, 0.3
    model = DDPMEpsModel(
        GaussianOracleNet(ddpm_alphas_cumprod(1000, noise_schedule="cosine"), mu, s),
        noise_schedule="cosine", learn_sigma=True, clip_denoised=True,
    ).eval()  # fmt: skip
    assert solver_options_for(model, "ddpm_ancestral", None) == {"variance": "learned"}
    assert solver_options_for(model, "ddpm_ancestral", {"variance": "small"}) == {
        "variance": "small"
    }
    assert solver_options_for(model, "ddim", None) == {}
    labels = torch.full((8, 16, 16), 4, dtype=torch.long)  # all sector
    images = generate(model, "sdm", labels, list(range(8)), 16, solver="ddpm_ancestral",
                      steps=1000)  # fmt: skip
    y = images.double() * 2 - 1  # back to [-1, 1]
    n = y.numel()
    assert abs(y.mean().item() - mu) < 4 * s / math.sqrt(n)
    assert abs(y.std().item() - s) < 0.06 * s
    # the few-step DDIM preview path takes the clipped denoiser alone
    preview = generate(model, "sdm", labels[:2], [0, 1], 16, solver="ddim", steps=8)
    assert preview.shape == (2, 1, 16, 16) and torch.isfinite(preview).all()


def test_learned_variance_needs_the_pair():
    sigmas = cosine_sigmas(4)
    with pytest.raises(ValueError, match="learned"):
        ddpm_ancestral(lambda x, s: x, torch.zeros(2), sigmas, variance="learned")
    with pytest.raises(ValueError, match="variance must be"):
        ddpm_ancestral(lambda x, s: x, torch.zeros(2), sigmas, variance="huge")
