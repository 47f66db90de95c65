"""Pinning the outside of the sector while sampling (``generate(..., pin_outside=True)``)."""

from __future__ import annotations

import torch
from torch import nn

from edmcli.data.labels import sector_mask
from edmcli.sampling.pipeline import generate, pin


class WildOutside(nn.Module):
    """An EDM-style denoiser that is right inside (returns the data value 0.2) and wrong outside
    the sector, where nothing trained it (returns +0.7)."""

    def __init__(self, inside: torch.Tensor) -> None:
        super().__init__()
        self.inside = inside
        self.weight = nn.Parameter(torch.zeros(()))

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def spade_cache(self, labels):
        return None

    def forward(self, x, sigma, labels=None, spade_cache=None):
        return torch.where(self.inside, torch.full_like(x, 0.2), torch.full_like(x, 0.7))


def _final_latent(pin_outside: bool) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.zeros(2, 16, 16, dtype=torch.long)
    labels[:, 2:14, 4:12] = 4
    inside = sector_mask(labels, 8) > 0
    captured = {}

    def decode(latent, sector, labels):
        captured["x0"] = latent
        return torch.zeros(latent.shape[0], 1, 16, 16)

    generate(WildOutside(inside), "edm-l64", labels, [0, 1], 8, solver="heun", steps=6,
             decode=decode, use_cache=False, pin_outside=pin_outside)  # fmt: skip
    return captured["x0"], inside


def test_pinning_carries_the_outside_to_exactly_minus_one():
    pinned, inside = _final_latent(True)
    free, _ = _final_latent(False)
    assert torch.all(pinned[~inside] == -1.0)
    torch.testing.assert_close(
        free[~inside], torch.full_like(free[~inside], 0.7), atol=1e-4, rtol=0
    )
    torch.testing.assert_close(pinned[inside], free[inside])  # inside untouched
    torch.testing.assert_close(pinned[inside], torch.full_like(pinned[inside], 0.2), atol=1e-4,
                               rtol=0)  # fmt: skip


def test_pin_keeps_tuples_and_the_inside():
    d = torch.randn(2, 1, 4, 4)
    inside = torch.rand(2, 1, 4, 4) > 0.5
    out = pin(d, inside)
    assert torch.equal(out[inside], d[inside]) and torch.all(out[~inside] == -1)
