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
    """Affine-free group norm of ``x`` (N, C, H, W) modulated by ``gamma``/``beta`` (N, C, H, W)."""
    x_hat = F.group_norm(x.float(), num_groups, eps=eps)
    y = x_hat * (1.0 + gamma.float()) + beta.float()
    if silu:
        y = F.silu(y)
    return y.to(x.dtype)
