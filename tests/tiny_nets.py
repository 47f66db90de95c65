"""The small SPADE UNet configuration, helpers shared by the model tests, and the tiny regression
dataset of the training-engine tests."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

from edmcli.models.unet import SpadeUNetConfig


def small_config(**overrides) -> SpadeUNetConfig:
    """16² input, 16 channels, two levels, one block, no attention but the middle block."""
    values = dict(
        image_size=16,
        model_channels=16,
        channel_mult=(1, 2),
        num_blocks=1,
        attention_resolutions=(),
        dropout=0.0,
        attention_head_channels=16,
        spade_hidden=16,
    )
    values.update(overrides)
    return SpadeUNetConfig(**values)


def randomize_zero_init(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give the zero-initialised layers (conv1, attention proj, out_conv) random weights, as a
    trained network has: with them at zero the output ignores everything upstream."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return module


class Points(Dataset):
    """32 seeded points (x in R³, y = w·x + b): the engine tests' regression data."""

    def __init__(self, n=32):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, generator=g)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5]) + 0.1

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}
