"""Quick sample grids while a diffusion model trains: the preview callback that the training
stage takes (``train_diffusion(..., preview=preview_samples)``); training never imports
sampling."""

from __future__ import annotations

import torch
from torch import nn

from edmcli.models.registry import get_spec
from edmcli.runs.diffusion_run import latent_decoder
from edmcli.runs.memory import PREVIEW_CHUNK
from edmcli.sampling.pipeline import generate

PREVIEW_STEPS = 8


def preview_samples(
    net: nn.Module,
    labels: torch.Tensor,
    settings,
    vae,
    class_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Images in [0, 1] for ``labels`` with fixed seeds 0..N−1: :data:`PREVIEW_STEPS` steps of
    the model's preview solver (Euler; DDIM for DDPM models). ``class_labels`` (N,): the classes
    of a class-conditional model (the maps' own; None for a map-only model), sampled as
    ``sample`` does by default (guidance scale 1: the conditional model)."""
    student = bool(getattr(settings, "consistency", None))  # a distilled student: 2 steps
    was_training = net.training
    net.eval()
    chunks = []
    try:
        for lo in range(0, labels.shape[0], PREVIEW_CHUNK):  # bounded memory; per-sample seeds
            hi = lo + PREVIEW_CHUNK
            chunks.append(generate(
                net,
                settings.model,
                labels[lo:hi],
                seeds=range(lo, min(hi, labels.shape[0])),
                net_size=settings.net_size,
                solver="consistency" if student else get_spec(settings.model).preview_solver,
                steps=PREVIEW_STEPS,
                levels=settings.student_levels(2) if student else None,
                decode=latent_decoder(vae, settings.norm),
                outside_value=settings.norm.outside_value,
                channels=settings.channels,
                class_labels=None if class_labels is None else class_labels[lo:hi],
            ))  # fmt: skip
        return torch.cat(chunks)
    finally:
        net.train(was_training)
