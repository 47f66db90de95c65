"""SPADE group normalisation in plain torch: the reference, and the modulation step it shares.

y = GroupNorm(x; num_groups, eps, affine-free) * (1 + gamma) + beta, optionally followed by SiLU.

:func:`spade_group_norm_reference` is the ground truth that the Triton kernel is tested against,
and the path used wherever the kernel cannot run (CPU, no Triton): statistics are accumulated in
fp32 whatever the input dtype; the output has the input's dtype. Its modulation step
:func:`modulate` is also the one of the custom op's torch formulation
(:mod:`kernels.spade_norm_op`), which computes its statistics itself (it returns them for its
backward) in the fused path's accumulation dtype :func:`acc_dtype`, the dtype of the Triton
kernels too. This module imports no Triton.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["acc_dtype", "modulate", "spade_group_norm_reference"]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the fused path (the Triton kernels and the custom op's torch
    formulation) for an input dtype: fp64 for fp64, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def modulate(
    x_hat: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, silu: bool = False
) -> torch.Tensor:
    """The SPADE step ``x_hat * (1 + gamma) + beta`` (then SiLU if ``silu``) on the normalised
    ``x_hat``, computed in x_hat's dtype (gamma and beta are converted to it)."""
    acc = x_hat.dtype
    y = x_hat * (1.0 + gamma.to(acc)) + beta.to(acc)
    if silu:
        y = F.silu(y)
    return y


def spade_group_norm_reference(
    x: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    num_groups: int,
    eps: float = 1e-5,
    silu: bool = False,
) -> torch.Tensor:
    """Affine-free group norm of ``x`` (N, C, H, W) modulated by ``gamma``/``beta`` (N, C, H, W).

    Args:
        x: features (N, C, H, W).
        gamma: spatial scale, x's shape, applied as ``1 + gamma``.
        beta: spatial shift, x's shape.
        num_groups: groups of the group norm (biased variance); must divide C.
        eps: added to each group's variance.
        silu: apply SiLU to the modulated output.

    Returns:
        y in x's dtype. Everything is computed in fp32 (also for fp64 inputs, so fp64 gradient
        checks belong to the fused op, which accumulates fp64 inputs in fp64). Differentiable
        through plain autograd (double backward included). Arguments are not validated here:
        :func:`kernels.spade_group_norm` does it.
    """
    x_hat = F.group_norm(x.float(), num_groups, eps=eps)
    return modulate(x_hat, gamma, beta, silu).to(x.dtype)
