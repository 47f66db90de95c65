"""SPADE normalisation and its plain group-norm counterpart.

SPADE (Park et al. 2019) replaces a normalisation layer by an affine-free group norm whose
per-pixel scale and shift come from the semantic label map m:

    y = GroupNorm(x) * (1 + gamma(m)) + beta(m)

``gamma``/``beta`` are produced by a small conv MLP from the label map at the feature size (class
fractions per pixel, the one resize rule of :mod:`edmcli.data.labels`): 3x3 conv to ``hidden``
channels + ReLU, then one 3x3 conv for each of gamma and beta (docs/reference.md). They depend on
the label map only, so :meth:`SPADE.modulation` is kept apart from :meth:`SPADE.forward`: a network
can compute them once per label map and reuse them at every noise level.

The normalisation itself goes through :func:`echo_synth_kernels.spade_group_norm` (the repository's
``kernels/``), the single entry point shared by the torch reference (CPU) and the fused Triton
kernel (CUDA), which also fuses the SiLU that follows the norm in a residual block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from echo_synth_kernels import spade_group_norm

__all__ = ["SPADE", "GroupNormAct", "resolve_num_groups"]


def resolve_num_groups(num_channels: int, num_groups: int, min_channels_per_group: int = 4) -> int:
    """Number of groups actually used for ``num_channels``: at most ``num_groups``, at least
    ``min_channels_per_group`` channels per group (as EDM's GroupNorm), and a divisor of
    ``num_channels``."""
    if num_channels < 1 or num_groups < 1:
        raise ValueError(
            f"num_channels ({num_channels}) and num_groups ({num_groups}) must be positive."
        )
    groups = max(1, min(num_groups, num_channels // min_channels_per_group))
    while num_channels % groups:
        groups -= 1
    return groups


class SPADE(nn.Module):
    """Spatially-adaptive group normalisation.

    Args:
        num_channels: channels of the normalised features.
        num_groups: group-norm groups; must divide ``num_channels``.
        label_classes: channels of the one-hot label map (5 in this project, docs/design.md).
        hidden: channels of the shared hidden layer of the modulation MLP (128 as the authors).
        eps: group-norm epsilon.

    A network that owns SPADE layers records in ``resolution`` the feature size each one
    normalises at and in ``key`` its dotted name (the key of its cached gamma/beta).
    """

    def __init__(
        self,
        num_channels: int,
        num_groups: int,
        label_classes: int = 5,
        hidden: int = 128,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if num_channels < 1 or num_groups < 1 or num_channels % num_groups:
            raise ValueError(
                f"num_groups ({num_groups}) must be positive and divide num_channels "
                f"({num_channels})."
            )
        if label_classes < 1 or hidden < 1:
            raise ValueError(
                f"label_classes ({label_classes}) and hidden ({hidden}) must be positive."
            )
        self.num_channels = num_channels
        self.num_groups = num_groups
        self.label_classes = label_classes
        self.eps = eps
        self.resolution = 0
        self.key = ""
        self.shared = nn.Conv2d(label_classes, hidden, 3, padding=1)
        self.to_gamma = nn.Conv2d(hidden, num_channels, 3, padding=1)
        self.to_beta = nn.Conv2d(hidden, num_channels, 3, padding=1)

    def modulation(self, label_onehot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(gamma, beta)``, each (N, C, h, w), from a one-hot label map (N, K, h, w) already
        resized to the feature size."""
        if label_onehot.ndim != 4 or label_onehot.shape[1] != self.label_classes:
            raise ValueError(
                f"label_onehot must have shape (N, {self.label_classes}, h, w), got "
                f"{tuple(label_onehot.shape)}."
            )
        hidden = F.relu(self.shared(label_onehot))
        return self.to_gamma(hidden), self.to_beta(hidden)

    def forward(
        self, x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, silu: bool = False
    ) -> torch.Tensor:
        """``GroupNorm(x) * (1 + gamma) + beta``, followed by SiLU when ``silu``."""
        if gamma.shape != x.shape or beta.shape != x.shape:
            raise ValueError(
                f"gamma {tuple(gamma.shape)} and beta {tuple(beta.shape)} must match x "
                f"{tuple(x.shape)}."
            )
        return spade_group_norm(x, gamma, beta, self.num_groups, self.eps, silu)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, groups={self.num_groups}, classes={self.label_classes}"


class GroupNormAct(nn.Module):
    """Plain affine group norm (the non-SPADE places), optionally followed by SiLU.

    ``scale``/``shift`` (broadcastable to the output, e.g. (N, C, 1, 1) from the noise embedding)
    are applied as ``y * (1 + scale) + shift`` before the activation, the ADM scale-shift norm.
    """

    def __init__(self, num_channels: int, num_groups: int, eps: float = 1e-5) -> None:
        super().__init__()
        if num_channels < 1 or num_groups < 1 or num_channels % num_groups:
            raise ValueError(
                f"num_groups ({num_groups}) must be positive and divide num_channels "
                f"({num_channels})."
            )
        self.num_groups = num_groups
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(
        self,
        x: torch.Tensor,
        silu: bool = False,
        scale: torch.Tensor | None = None,
        shift: torch.Tensor | None = None,
    ) -> torch.Tensor:
        weight, bias = self.weight.to(x.dtype), self.bias.to(x.dtype)
        y = F.group_norm(x, self.num_groups, weight, bias, self.eps)
        if scale is not None and shift is not None:
            y = torch.addcmul(shift, y, scale + 1)
        return F.silu(y) if silu else y
