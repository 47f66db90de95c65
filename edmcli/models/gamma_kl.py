"""Closed-form Kullback-Leibler divergence between two Gamma distributions.

Gamma distributions are parameterised by shape ``alpha`` and rate ``beta`` (density
``beta^alpha x^(alpha-1) exp(-beta x) / Gamma(alpha)``, mean ``alpha / beta``). For
``a = Gamma(alpha_a, beta_a)`` and ``b = Gamma(alpha_b, beta_b)``::

    KL(a || b) = (alpha_a - alpha_b) psi(alpha_a) - ln Gamma(alpha_a) + ln Gamma(alpha_b)
                 + alpha_b (ln beta_a - ln beta_b) + alpha_a (beta_b - beta_a) / beta_a

with ``psi`` the digamma function. This is eq. 5 of the paper with ``a = p`` (the prior) and
``b = q`` (the approximate posterior), i.e. the paper prints KL(p || q). The ELBO's term is
KL(q || p): the same formula with the arguments swapped. :func:`gamma_vae_kl` picks the order:
``"posterior-first"`` (default, the ELBO) or ``"prior-first"`` (eq. 5 as printed).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

__all__ = ["KL_DIRECTIONS", "KLDirection", "gamma_kl", "gamma_vae_kl"]

KLDirection = Literal["posterior-first", "prior-first"]
KL_DIRECTIONS: tuple[str, ...] = get_args(KLDirection)


def gamma_kl(
    alpha_a: torch.Tensor | float,
    beta_a: torch.Tensor | float,
    alpha_b: torch.Tensor | float,
    beta_b: torch.Tensor | float,
) -> torch.Tensor:
    """KL(Gamma(alpha_a, beta_a) || Gamma(alpha_b, beta_b)), element-wise (shape, rate).

    Args:
        alpha_a: shape of the first distribution (> 0).
        beta_a: rate of the first distribution (> 0).
        alpha_b: shape of the second distribution (> 0).
        beta_b: rate of the second distribution (> 0).

    Returns:
        The divergence, broadcast over the arguments' shapes; differentiable in all four.
        Python floats take the dtype and device of the first tensor argument. Parameters are not
        checked (that would synchronise with the device): non-positive values give NaN.
    """
    args = (alpha_a, beta_a, alpha_b, beta_b)
    ref = next((v for v in args if isinstance(v, torch.Tensor)), None)
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.get_default_dtype()
    device = ref.device if ref is not None else None
    alpha_a, beta_a, alpha_b, beta_b = (
        v if isinstance(v, torch.Tensor) else torch.tensor(v, dtype=dtype, device=device)
        for v in args
    )
    return (
        (alpha_a - alpha_b) * torch.digamma(alpha_a)
        - torch.lgamma(alpha_a)
        + torch.lgamma(alpha_b)
        + alpha_b * (torch.log(beta_a) - torch.log(beta_b))
        + alpha_a * (beta_b - beta_a) / beta_a
    )


def gamma_vae_kl(
    alpha: torch.Tensor,
    beta: torch.Tensor,
    prior_shape: float,
    prior_rate: float,
    direction: KLDirection = "posterior-first",
) -> torch.Tensor:
    """Per-element KL between the posterior Gamma(alpha, beta) and the prior Gamma.

    Args:
        alpha: posterior shapes, e.g. (N, 1, h, w).
        beta: posterior rates, same shape as ``alpha``.
        prior_shape: shape of the prior (paper: 3.75).
        prior_rate: rate of the prior (paper: 10.8).
        direction: ``"posterior-first"`` gives KL(q || p), the ELBO's term (default);
            ``"prior-first"`` gives KL(p || q), eq. 5 of the paper as printed.

    Returns:
        A tensor shaped like ``alpha``, unreduced (the loss masks it to the sector).

    Raises:
        ValueError: for an unknown ``direction`` or a non-positive prior parameter.
    """
    if direction not in KL_DIRECTIONS:
        raise ValueError(f"KL direction {direction!r} is not one of {', '.join(KL_DIRECTIONS)}.")
    if not (prior_shape > 0 and prior_rate > 0):
        raise ValueError(
            f"prior shape and rate must be positive, got ({prior_shape}, {prior_rate})."
        )
    if direction == "posterior-first":
        return gamma_kl(alpha, beta, prior_shape, prior_rate)
    return gamma_kl(prior_shape, prior_rate, alpha, beta)
