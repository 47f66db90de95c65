"""Means restricted to the ultrasound sector.

Every loss of a generative model is computed inside the sector only (docs/design.md): the per-pixel
loss is multiplied by the sector mask, summed, and divided by the number of in-sector elements.
Dividing by the in-sector count (and not by the whole image size) keeps a loss independent of how
much of the frame the sector covers, so that images with small and large sectors weigh alike
per pixel.
"""

from __future__ import annotations

import torch

__all__ = ["masked_mean"]


def masked_mean(per_pixel: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``per_pixel`` over the elements where ``mask`` is set.

    ``sum(per_pixel * mask) / max(sum(mask), 1)``, where ``mask`` is broadcast to the shape of
    ``per_pixel`` first (a (N, 1, H, W) sector mask applied to (N, C, H, W) values counts each
    of the C channels). The ``max(., 1)`` keeps an all-background batch at 0 instead of NaN.

    Args:
        per_pixel: values to average, any shape (e.g. (N, C, H, W) squared errors).
        mask: bool or {0, 1} float tensor broadcastable to ``per_pixel``'s shape; a float mask
            with other non-negative values acts as per-element weights.

    Returns:
        A 0-dim tensor in ``per_pixel``'s dtype, differentiable with respect to ``per_pixel``.

    Raises:
        ValueError: if ``mask`` does not broadcast to ``per_pixel``'s shape.
    """
    try:
        weights = torch.broadcast_to(mask, per_pixel.shape)
    except RuntimeError as err:
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not broadcast to the values' shape "
            f"{tuple(per_pixel.shape)}."
        ) from err
    weights = weights.to(per_pixel.dtype)
    return (per_pixel * weights).sum() / weights.sum().clamp_min(1.0)
