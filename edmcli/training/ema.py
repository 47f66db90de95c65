"""Exponential moving average of weights, used for evaluation and sampling."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """``ema ← d·ema + (1−d)·θ`` with ``d = min(decay, (1 + step) / (10 + step))``: the warm-up
    keeps early averages from being dominated by the random initialisation. Buffers are copied."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = min(self.decay, (1.0 + step) / (10.0 + step))
        ema_params, params = list(self.model.parameters()), list(model.parameters())
        if len(ema_params) != len(params):
            raise ValueError(f"EMA holds {len(ema_params)} parameters, the model {len(params)}")
        # one fused call over all tensors: the same values as a lerp_ per tensor (tested)
        torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1.0 - d)
        for ema_b, b in zip(self.model.buffers(), model.buffers(), strict=True):
            ema_b.copy_(b)

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)
