"""The closed-form Gamma KL against torch.distributions, in both directions."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.distributions import Gamma, kl_divergence

from edmcli.models.gamma_kl import KL_DIRECTIONS, gamma_kl, gamma_vae_kl

SHAPES = (0.05, 0.5, 1.0, 3.75, 12.0, 80.0)
RATES = (0.1, 1.0, 10.8, 250.0)


def _grid() -> tuple[torch.Tensor, ...]:
    pairs = list(itertools.product(SHAPES, RATES))
    a, b = zip(*itertools.product(pairs, pairs), strict=True)
    alpha_a, beta_a = torch.tensor(a, dtype=torch.float64).T
    alpha_b, beta_b = torch.tensor(b, dtype=torch.float64).T
    return alpha_a, beta_a, alpha_b, beta_b


def test_gamma_kl_matches_torch_distributions_over_grid():
    alpha_a, beta_a, alpha_b, beta_b = _grid()
    ours = gamma_kl(alpha_a, beta_a, alpha_b, beta_b)
    ref = kl_divergence(Gamma(alpha_a, beta_a), Gamma(alpha_b, beta_b))
    assert ours.shape == (len(SHAPES) ** 2 * len(RATES) ** 2,)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    # Swapping the arguments is the other direction, and it differs.
    swapped = gamma_kl(alpha_b, beta_b, alpha_a, beta_a)
    torch.testing.assert_close(
        swapped,
        kl_divergence(Gamma(alpha_b, beta_b), Gamma(alpha_a, beta_a)),
        rtol=1e-10,
        atol=1e-10,
    )
    assert (swapped - ours).abs().max() > 1.0


def test_gamma_kl_zero_on_equal_and_positive_otherwise():
    alpha_a, beta_a, alpha_b, beta_b = _grid()
    same = gamma_kl(alpha_a, beta_a, alpha_a, beta_a)
    torch.testing.assert_close(same, torch.zeros_like(same), rtol=0, atol=1e-9)
    differ = (alpha_a != alpha_b) | (beta_a != beta_b)
    assert bool((gamma_kl(alpha_a, beta_a, alpha_b, beta_b)[differ] > 0).all())


@pytest.mark.parametrize("direction", KL_DIRECTIONS)
def test_gamma_vae_kl_directions(direction):
    prior_shape, prior_rate = 3.75, 10.8
    alpha = torch.tensor([[0.3, 3.75, 9.0], [40.0, 1.0, 2.5]], dtype=torch.float64)
    beta = torch.tensor([[0.5, 10.8, 30.0], [100.0, 2.0, 11.0]], dtype=torch.float64)
    q = Gamma(alpha, beta)
    p = Gamma(torch.full_like(alpha, prior_shape), torch.full_like(beta, prior_rate))
    ref = kl_divergence(q, p) if direction == "posterior-first" else kl_divergence(p, q)
    ours = gamma_vae_kl(alpha, beta, prior_shape, prior_rate, direction)
    assert ours.dtype == torch.float64 and ours.shape == alpha.shape
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    assert ours[0, 1].abs() < 1e-12  # posterior == prior


def test_prior_first_is_eq5_as_printed():
    # Eq. 5 literally, p = prior, q = posterior; log((a - 1)!) = lgamma(a).
    a_p, b_p = torch.tensor(3.75, dtype=torch.float64), torch.tensor(10.8, dtype=torch.float64)
    a_q, b_q = torch.tensor(2.2, dtype=torch.float64), torch.tensor(4.0, dtype=torch.float64)
    eq5 = (
        (a_p - a_q) * torch.digamma(a_p)
        - torch.lgamma(a_p)
        + torch.lgamma(a_q)
        + a_q * (b_p.log() - b_q.log())
        + a_p * (b_q - b_p) / b_p
    )
    torch.testing.assert_close(gamma_vae_kl(a_q, b_q, 3.75, 10.8, "prior-first"), eq5)
    assert not torch.allclose(gamma_vae_kl(a_q, b_q, 3.75, 10.8, "posterior-first"), eq5)


def test_gamma_kl_gradients_match_autograd_of_reference():
    params = [torch.tensor([0.7, 4.0], dtype=torch.float64, requires_grad=True) for _ in range(4)]
    torch.autograd.gradcheck(gamma_kl, params)
    ours = torch.autograd.grad(gamma_kl(*params).sum(), params)
    a_a, b_a, a_b, b_b = params
    ref = torch.autograd.grad(kl_divergence(Gamma(a_a, b_a), Gamma(a_b, b_b)).sum(), params)
    for g, r in zip(ours, ref, strict=True):
        torch.testing.assert_close(g, r)


def test_gamma_vae_kl_rejects_bad_arguments():
    x = torch.ones(2)
    with pytest.raises(ValueError, match="posterior-first, prior-first"):
        gamma_vae_kl(x, x, 3.75, 10.8, "q||p")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="positive"):
        gamma_vae_kl(x, x, 0.0, 10.8)
