"""Quick sample grids while a diffusion model trains (a few Euler/DDIM steps)."""

from __future__ import annotations

import torch
from torch import nn

from edmcli.sampling.pipeline import generate


def preview_samples(net: nn.Module, labels: torch.Tensor, settings, vae, steps: int = 8):
    """Images in [0, 1] for ``labels`` with fixed seeds 0..N−1: 8 Euler steps (DDIM for SDM)."""
    was_training = net.training
    net.eval()
    try:
        return generate(
            net,
            settings.model,
            labels,
            seeds=range(labels.shape[0]),
            net_size=settings.net_size,
            solver="ddim" if settings.model == "sdm" else "euler",
            steps=steps,
            decode=vae.model.decode if vae is not None else None,
        )
    finally:
        net.train(was_training)
