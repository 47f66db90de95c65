"""Torch reference for the fused SPADE normalisation.

y = GroupNorm(x; num_groups, eps, affine-free) * (1 + gamma) + beta, optionally followed by SiLU.
Statistics are accumulated in fp32 whatever the input dtype; the output has the input's dtype.
This is the ground truth that the Triton kernel is tested against, and the path used wherever
the kernel cannot run (CPU, no Triton).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
    y = x_hat * (1.0 + gamma.float()) + beta.float()
    if silu:
        y = F.silu(y)
    return y.to(x.dtype)
