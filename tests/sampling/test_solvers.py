"""Solvers on the one case with a closed form: Gaussian data.

For y ~ N(mu, s^2) per pixel the ideal denoiser is D(x; sigma) = mu + s^2 / (s^2 + sigma^2)
(x - mu) and the probability-flow ODE dx/dsigma = (x - D) / sigma has the exact solution
x(sigma) = mu + (x(sigma_max) - mu) sqrt((s^2 + sigma^2) / (s^2 + sigma_max^2)). Errors are
measured in float64 against that solution, and the log-log slope of the error over the number of
steps shows each solver's order of accuracy. NFE accounting and the NFE planner are tested here
too.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from edmcli.errors import EchoSynthError
from edmcli.models.ddpm import ddpm_alphas_cumprod
from edmcli.models.registry import MODEL_NAMES, get_spec
from edmcli.sampling.nfe import NFEError, StepPlan, plan
from edmcli.sampling.schedules import ddpm_sigmas, edm_sigmas, ve_sigmas, vp_sigmas
from edmcli.sampling.solvers import (
    SOLVERS,
    ddim,
    ddpm_ancestral,
    dpmpp_2m,
    dpmpp_3m,
    euler,
    heun,
    nfe_cost,
)

F64 = torch.float64
STEPS = [8, 16, 32, 64]  # N = 4 is pre-asymptotic: 80 -> 0.002 in 4 steps spans 4.6 decades


class Gaussian:
    """Per-pixel Gaussian data with its ideal denoiser and exact ODE solution."""

    def __init__(self, shape=(2, 1, 4, 4), seed=0, s_range=(0.2, 1.0)):
        g = torch.Generator().manual_seed(seed)
        self.mu = torch.rand(shape, generator=g, dtype=F64) - 0.5
        lo, hi = s_range
        self.s = lo + (hi - lo) * torch.rand(shape, generator=g, dtype=F64)
        self.z = torch.randn(shape, generator=g, dtype=F64)
        self.calls: list[tuple[torch.Tensor, float]] = []

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        assert sigma.ndim == 0 and sigma.device == x.device
        self.calls.append((x, float(sigma)))
        return self.mu + self.s**2 / (self.s**2 + sigma**2) * (x - self.mu)

    def exact(self, x_t: torch.Tensor, sigma_t: float, sigma: float) -> torch.Tensor:
        s2 = self.s**2
        return self.mu + (x_t - self.mu) * ((s2 + sigma**2) / (s2 + sigma_t**2)).sqrt()

    def reference(self, x_t: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        """Exact ODE solution down to the last positive level, then the final step to 0 that
        every solver takes, x <- D(x; sigma_min). For the EDM schedule (sigma_min = 0.002) this
        is x(0) within sigma_min^2 / (2 s^2) <= 5e-5 relative (test_reference_is_exact_...)."""
        s_max, s_min = float(sigmas[0]), float(sigmas[-2])
        return self.denoise(self.exact(x_t, s_max, s_min), torch.tensor(s_min, dtype=F64))


def authors_heun(denoise, x, sigmas):
    """The defect of the authors' sampler (docs/reference.md), reimplemented for comparison: the
    'correction' calls the network again at the old point (x_hat, t_hat) instead of at
    (x', t_{i+1})."""
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        d = (x - denoise(x, torch.tensor(s[i], dtype=F64))) / s[i]
        x_next = x + (s[i + 1] - s[i]) * d
        if s[i + 1] > 0:
            d_prime = (x_next - denoise(x, torch.tensor(s[i], dtype=F64))) / s[i + 1]
            x_next = x + (s[i + 1] - s[i]) * 0.5 * (d + d_prime)
        x = x_next
    return x


def error_slope(solver, schedule, steps=STEPS, exact_zero=False, **options):
    data = Gaussian()
    errors = []
    for n in steps:
        sigmas = schedule(n)
        x_t = float(sigmas[0]) * data.z
        out = solver(data.denoise, x_t, sigmas, **options)
        ref = data.exact(x_t, float(sigmas[0]), 0.0) if exact_zero else data.reference(x_t, sigmas)
        errors.append(float((out - ref).abs().max()))
    slope = np.polyfit(np.log(steps), np.log(errors), 1)[0]
    return slope, errors


def test_reference_is_exact_solution_for_edm():
    data = Gaussian()
    sigmas = edm_sigmas(10)
    x_t = 80.0 * data.z
    x0 = data.exact(x_t, 80.0, 0.0)
    ref = data.reference(x_t, sigmas)
    bound = (0.002**2 / (2 * data.s**2)).max()
    assert float(((ref - x0) / (x0 - data.mu)).abs().max()) < 1.01 * float(bound) < 1e-4
    # and the exact solution really solves the ODE: dx/dsigma = (x - D) / sigma
    sig, h = 1.3, 1e-6
    dx = (data.exact(x_t, 80.0, sig + h) - data.exact(x_t, 80.0, sig - h)) / (2 * h)
    x = data.exact(x_t, 80.0, sig)
    slope = (x - data.denoise(x, torch.tensor(sig, dtype=F64))) / sig
    torch.testing.assert_close(dx, slope, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize(
    ("solver", "low", "high"),
    [(euler, -1.15, -0.85), (heun, -2.5, -1.8), (dpmpp_2m, -2.4, -1.7)],
    ids=["euler", "heun", "dpmpp_2m"],
)
def test_order_of_accuracy_edm_schedule(solver, low, high):
    slope, errors = error_slope(solver, edm_sigmas, exact_zero=True)
    assert low < slope < high, (slope, errors)


def test_dpmpp_3m_is_third_order():
    """DPM-Solver++(3M) converges at third order (N = 16..128; at 8 steps of the EDM schedule
    its extrapolation is pre-asymptotic), beats 2M at the same NFE, and its quadratic term
    matters: with half the term (the -phi_3 of some implementations) it is second order."""
    steps = [16, 32, 64, 128]
    slope, errors = error_slope(dpmpp_3m, edm_sigmas, steps=steps, exact_zero=False)
    assert -3.9 < slope < -2.8, (slope, errors)
    _, errors_2m = error_slope(dpmpp_2m, edm_sigmas, steps=steps, exact_zero=False)
    assert errors[-1] < errors_2m[-1] / 10
    slope_ve, errors_ve = error_slope(dpmpp_3m, ve_sigmas, steps=steps)
    assert slope_ve < -2.8, (slope_ve, errors_ve)

    def half_quadratic(denoise, x, sigmas):  # x' + phi_2 hB - phi_3 h^2C, phi_3 = phi_2/h - 1/2
        calls = []

        def wrapped(x, sigma):
            calls.append(float(sigma))
            return denoise(x, sigma)

        history, s = [], sigmas.tolist()
        for i in range(len(s) - 1):
            d = wrapped(x, sigmas[i])
            if s[i + 1] == 0:
                return d
            ratio, h = s[i + 1] / s[i], math.log(s[i] / s[i + 1])
            phi_2 = 1 - (1 - ratio) / h
            x = ratio * x + (1 - ratio) * d
            if len(history) == 2:
                r1, r2 = history[-1][1] / h, history[-2][1] / h
                d0, d1 = (d - history[-1][0]) / r1, (history[-1][0] - history[-2][0]) / r2
                x = (
                    x
                    + phi_2 * (d0 + (d0 - d1) * r1 / (r1 + r2))
                    - (phi_2 / h - 0.5) * ((d0 - d1) / (r1 + r2))
                )
            elif history:
                x = x + phi_2 * (d - history[-1][0]) / (history[-1][1] / h)
            history = [*history[-1:], (d, h)]
        return x

    slope_half, _ = error_slope(half_quadratic, edm_sigmas, steps=steps)
    assert slope_half > -2.6


@pytest.mark.parametrize("schedule", [ve_sigmas, vp_sigmas], ids=["ve", "vp"])
def test_heun_second_order_and_euler_first_on_ve_vp(schedule):
    slope_h, err_h = error_slope(heun, schedule)
    slope_e, err_e = error_slope(euler, schedule)
    assert -2.5 < slope_h < -1.8, (slope_h, err_h)
    assert -1.15 < slope_e < -0.85, (slope_e, err_e)
    assert err_h[-1] < err_e[-1] / 10


def test_authors_heun_defect_is_first_order():
    # At the old point the "correction" slope equals the first one, d' = d: it is Euler at
    # twice the price, one order worse than Heun.
    slope_bad, err_bad = error_slope(authors_heun, edm_sigmas, exact_zero=True)
    slope_good, err_good = error_slope(heun, edm_sigmas, exact_zero=True)
    assert -1.15 < slope_bad < -0.85, (slope_bad, err_bad)
    assert slope_good < slope_bad - 0.8
    assert err_good[-1] < err_bad[-1] / 10
    data = Gaussian()
    sigmas = edm_sigmas(12)
    x_t = 80.0 * data.z
    torch.testing.assert_close(
        authors_heun(data.denoise, x_t, sigmas), euler(data.denoise, x_t, sigmas)
    )


@pytest.mark.parametrize("name", list(SOLVERS))
def test_nfe_matches_calls_and_sigmas(name):
    data = Gaussian()
    sigmas = edm_sigmas(7)
    SOLVERS[name](data.denoise, 80.0 * data.z, sigmas)
    assert len(data.calls) == nfe_cost(name, 7)
    used = sorted({round(s, 12) for _, s in data.calls}, reverse=True)
    assert used == [round(s, 12) for s in sigmas[:-1].tolist()]  # every level, never 0


def test_heun_single_step_is_one_shot_denoise():
    data = Gaussian()
    sigmas = edm_sigmas(1)
    x_t = 80.0 * data.z
    out = heun(data.denoise, x_t, sigmas)
    torch.testing.assert_close(out, data.denoise(x_t, torch.tensor(80.0, dtype=F64)))


def test_heun_churn_is_stochastic_and_reproducible():
    data = Gaussian()
    sigmas = edm_sigmas(10)
    x_t = 80.0 * data.z

    def noise_source(seed):
        used = []

        def noise(i):
            used.append(i)
            g = torch.Generator().manual_seed(seed * 1000 + i)
            return torch.randn(x_t.shape, generator=g, dtype=F64)

        return noise, used

    def never(i):
        raise AssertionError("deterministic Heun drew noise")

    plain = heun(data.denoise, x_t, sigmas, noise=never)
    churn = {"s_churn": 10.0, "s_min": 0.05, "s_max": 50.0}
    noise_a, used_a = noise_source(1)
    churned = heun(data.denoise, x_t, sigmas, noise=noise_a, **churn)
    again = heun(data.denoise, x_t, sigmas, noise=noise_source(1)[0], **churn)
    other = heun(data.denoise, x_t, sigmas, noise=noise_source(2)[0], **churn)
    assert not torch.allclose(plain, churned)
    assert torch.equal(churned, again)
    assert not torch.allclose(churned, other)
    inside = [i for i, s in enumerate(sigmas[:-1].tolist()) if 0.05 <= s <= 50]
    assert used_a == inside and 0 < len(inside) < 10
    # churn raises each level by the factor 1 + gamma, gamma = min(S_churn / N, sqrt(2) - 1)
    for s_churn, gamma in ((10.0, math.sqrt(2) - 1), (2.0, 0.2)):
        data.calls.clear()
        heun(data.denoise, x_t, sigmas, noise=noise_source(3)[0], s_churn=s_churn, s_min=0.05)
        first_hat = data.calls[2 * inside[0]][1]  # two calls per earlier step
        assert first_hat == pytest.approx(sigmas[inside[0]].item() * (1 + gamma), rel=1e-12)


def test_heun_churn_converges_to_gaussian_statistics():
    # With the ideal denoiser the stochastic sampler lands on N(mu, s^2) as the steps grow (its
    # discretisation error inflates the spread at few steps).
    mu, s, shape = 0.3, 0.5, (1, 1, 100, 200)
    n = shape[-1] * shape[-2]

    def denoise(x, sigma):
        return mu + s**2 / (s**2 + sigma**2) * (x - mu)

    def sample(steps):
        g = torch.Generator().manual_seed(7)
        x_t = mu + math.sqrt(80.0**2 + s**2) * torch.randn(shape, generator=g, dtype=F64)
        sigmas = edm_sigmas(steps)
        return heun(denoise, x_t, sigmas, s_churn=40.0, noise=lambda i: torch.randn_like(x_t))

    torch.manual_seed(3)
    few, many = sample(16), sample(128)
    assert abs(many.mean().item() - mu) < 4 * s / math.sqrt(n)
    assert abs(many.std().item() - s) < 0.015 * s
    assert abs(few.std().item() - s) > 3 * abs(many.std().item() - s)


def test_ddim_eta0_is_euler():
    data = Gaussian()
    for sigmas in (ddpm_sigmas(25), edm_sigmas(9)):
        x_t = float(sigmas[0]) * data.z
        torch.testing.assert_close(
            ddim(data.denoise, x_t, sigmas),
            euler(data.denoise, x_t, sigmas),
            rtol=1e-12,
            atol=1e-12,
        )


def test_ddim_converges_to_ode_solution_on_ddpm_schedule():
    data = Gaussian()
    steps = [10, 30, 100, 300, 1000]
    errors, errors_zero = [], []
    for n in steps:
        sigmas = ddpm_sigmas(n)
        x_t = float(sigmas[0]) * data.z
        out = ddim(data.denoise, x_t, sigmas)
        errors.append(float((out - data.reference(x_t, sigmas)).abs().max()))
        errors_zero.append(float((out - data.exact(x_t, float(sigmas[0]), 0.0)).abs().max()))
    slope = np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert -1.15 < slope < -0.85, (slope, errors)
    assert errors[-1] < 5e-3
    # against x(0) itself the only extra error is the DDPM's smallest level (0.01), O(1e-4)
    assert abs(errors_zero[-1] - errors[-1]) < 2e-4


def textbook_ddpm(eps_model, x_T, zs):
    """Ho et al. 2020, Algorithm 2 with sigma_t^2 = beta~_t, in x_t space, t = T..1."""
    abar = ddpm_alphas_cumprod(1000)
    abar_prev = torch.cat([torch.ones(1, dtype=F64), abar[:-1]])
    betas = 1 - abar / abar_prev
    x = x_T
    for t in range(999, -1, -1):
        eps = eps_model(x, t)
        mean = (x - betas[t] / (1 - abar[t]).sqrt() * eps) / (1 - betas[t]).sqrt()
        var = (1 - abar_prev[t]) / (1 - abar[t]) * betas[t]
        x = mean + var.sqrt() * zs[999 - t] if t > 0 else mean
    return x


def test_ddpm_ancestral_equals_textbook_sampler():
    data = Gaussian()
    abar = ddpm_alphas_cumprod(1000)
    sig_t = ((1 - abar) / abar).sqrt()
    g = torch.Generator().manual_seed(5)
    zs = torch.randn((1000, *data.z.shape), generator=g, dtype=F64)

    def eps_model(x_t, t):  # the eps-prediction that D implies: x = x_t / sqrt(abar)
        x = x_t / abar[t].sqrt()
        return (x - data.denoise(x, sig_t[t])) / sig_t[t]

    x_T = data.z
    expected = textbook_ddpm(eps_model, x_T, zs)
    sigmas = ddpm_sigmas(1000)
    # the same start: x_T = z in x_t space is sqrt(1 + sigma_max^2) z in the sigma form
    x = math.sqrt(1 + float(sigmas[0]) ** 2) * x_T
    got = ddpm_ancestral(data.denoise, x, sigmas, noise=lambda i: zs[i])
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


def test_ddpm_ancestral_gaussian_statistics():
    mu, s, shape = 0.3, 0.5, (1, 1, 100, 400)
    g = torch.Generator().manual_seed(11)
    sigmas = ddpm_sigmas(1000)

    def denoise(x, sigma):
        return mu + s**2 / (s**2 + sigma**2) * (x - mu)

    x_t = math.sqrt(1 + sigmas[0].item() ** 2) * torch.randn(shape, generator=g, dtype=F64)
    out = ddpm_ancestral(
        denoise, x_t, sigmas, noise=lambda i: torch.randn(shape, generator=g, dtype=F64)
    )
    # The chain is linear-Gaussian: propagate its exact mean and variance.
    m, v = 0.0, 1 + sigmas[0].item() ** 2
    sl = sigmas.tolist()
    for i in range(1000):
        k, r2 = s**2 / (s**2 + sl[i] ** 2), (sl[i + 1] / sl[i]) ** 2
        a = k + r2 * (1 - k)
        m, v = mu + a * (m - mu), a * a * v + sl[i + 1] ** 2 * (1 - r2)
    n = out.numel()
    assert abs(m - mu) < 1e-4 and abs(math.sqrt(v) - s) < 0.01 * s  # the sampler is near exact
    assert abs(out.mean().item() - m) < 4 * math.sqrt(v / n)
    assert abs(out.var().item() - v) < 4 * v * math.sqrt(2 / (n - 1))
    assert abs(out.std().item() - s) < 0.02 * s


@pytest.mark.parametrize("name", list(SOLVERS))
def test_solvers_cause_no_host_reads_of_device_tensors(name):
    # On the meta device any .item()/.tolist()/bool() of a tensor raises: the loop is sync-free.
    x = torch.empty(2, 1, 4, 4, device="meta")
    sigmas = edm_sigmas(5)

    def denoise(x, sigma):
        assert sigma.device.type == "meta" and sigma.ndim == 0
        return 0.5 * x * sigma

    out = SOLVERS[name](denoise, x, sigmas)
    assert out.device.type == "meta" and out.shape == x.shape


def test_solver_argument_errors():
    data = Gaussian()
    sigmas = edm_sigmas(4)
    x_t = 80.0 * data.z
    with pytest.raises(ValueError, match="shape of x"):
        heun(data.denoise, x_t, sigmas, s_churn=5.0, noise=lambda i: torch.zeros(3))
    with pytest.raises(ValueError, match="eta"):
        ddim(data.denoise, x_t, sigmas, eta=1.5)
    with pytest.raises(ValueError, match="s_churn"):
        heun(data.denoise, x_t, sigmas, s_churn=-1.0)
    with pytest.raises(ValueError, match="decreasing"):
        euler(data.denoise, x_t, torch.tensor([1.0, 2.0, 0.0]))
    with pytest.raises(ValueError, match="floating-point"):
        euler(data.denoise, torch.zeros(2, dtype=torch.long), sigmas)
    with pytest.raises(ValueError, match="Unknown solver"):
        nfe_cost("rk4", 3)


# ---------------------------------------------------------------- NFE planning


@pytest.mark.parametrize(("nfe", "steps"), [(1, 1), (3, 2), (49, 25), (99, 50), (35, 18)])
def test_plan_heun_odd_budgets(nfe, steps):
    p = plan("heun", nfe)
    assert p == StepPlan(steps=steps, nfe=nfe, note=p.note)
    assert nfe_cost("heun", p.steps) == nfe
    assert f"{steps} step" in p.note and f"{nfe} NFE" in p.note


def test_plan_heun_even_budget_is_explained():
    with pytest.raises(
        ValueError,
        match=r"2N-1.*NFE 50 is not reachable; use 49 \(25 steps\) or "
        r"51 \(26 steps\)",
    ):
        plan("heun", 50)
    with pytest.raises(NFEError, match="use 1 .* or 3"):
        plan("heun", 2)


def test_plan_heun_one_nfe_is_euler_step():
    p = plan("heun", 1)
    assert (p.steps, p.nfe) == (1, 1) and "Euler" in p.note


@pytest.mark.parametrize("name", ["euler", "dpmpp_2m", "ddim", "ddpm_ancestral"])
@pytest.mark.parametrize("nfe", [1, 10, 50, 100])
def test_plan_one_nfe_per_step(name, nfe):
    p = plan(name, nfe)
    assert (p.steps, p.nfe) == (nfe, nfe)
    assert nfe_cost(name, p.steps) == nfe


def test_plan_limits():
    assert plan("ddpm_ancestral", 1000).steps == 1000
    assert "strided" in plan("ddim", 50).note
    with pytest.raises(NFEError, match="at most 1000 steps"):
        plan("ddpm_ancestral", 1001)
    with pytest.raises(NFEError, match="at most 20 steps"):
        plan("ddim", 21, max_steps=20)
    with pytest.raises(NFEError, match="at most 39"):
        plan("heun", 41, max_steps=20)
    assert plan("euler", 5000).steps == 5000  # continuous-time: no cap
    for bad in (0, -3, 2.5, True):
        with pytest.raises(NFEError, match=">= 1"):
            plan("euler", bad)
    with pytest.raises(NFEError, match="Unknown solver"):
        plan("rk4", 10)
    err = NFEError("x")
    assert isinstance(err, ValueError) and isinstance(err, EchoSynthError)


def test_default_solver_per_model():
    default = {name: get_spec(name).solver for name in MODEL_NAMES}
    assert default["sdm"] == "ddpm_ancestral"
    assert {default[m] for m in ("edm", "ve", "vp", "edm-l64", "edm-l128")} == {"heun"}
    assert set(default.values()) <= set(SOLVERS)
    assert {get_spec(name).preview_solver for name in MODEL_NAMES} <= set(SOLVERS)
