"""Pairwise diversity on hand-made cases: the pairs inside groups, SSIM / RMS / LPIPS distances
inside a mask."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edmcli.evaluation.metrics.diversity import (
    distance_name,
    group_pairs,
    lpips_distance,
    masked_rms_distance,
    masked_ssim_distance,
    pairwise_diversity,
)


def test_group_pairs_by_hand():
    first, second = group_pairs(np.array([3, 1, 3, 1, 2, 3]))
    pairs = sorted(zip(first.tolist(), second.tolist(), strict=True))
    assert pairs == [(0, 2), (0, 5), (1, 3), (2, 5)]
    assert len(group_pairs(np.arange(4))[0]) == 0


def test_pairwise_diversity_of_copies_is_zero_and_of_noise_is_not():
    g = torch.Generator().manual_seed(6)
    base = torch.rand(4, 1, 16, 16, generator=g)
    copies = base.repeat_interleave(3, 0)  # three identical samples per group
    groups = np.repeat(np.arange(4), 3)
    for distance in ("ssim", "rms"):
        est = pairwise_diversity(copies, groups, distance=distance)
        assert est.mean == pytest.approx(0.0, abs=1e-6) and est.pairs == 12 and est.groups == 4
        noisy = (copies + 0.2 * torch.rand(copies.shape, generator=g)).clamp(0, 1)
        assert pairwise_diversity(noisy, groups, distance=distance).mean > 0.02
    assert pairwise_diversity(base, np.arange(4)) is None  # no group holds two images


def test_rms_distance_by_hand_and_masking():
    a = torch.zeros(1, 1, 8, 8)
    b = torch.full((1, 1, 8, 8), 0.5)
    b[..., :4] = 1.0  # differs more on the left half
    right = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    right[..., 4:] = True
    assert masked_rms_distance(a, b, right).item() == pytest.approx(0.5)
    assert masked_rms_distance(a, b, ~right).item() == pytest.approx(1.0)
    assert masked_ssim_distance(b, b, right).item() == pytest.approx(0.0, abs=1e-6)
    assert np.isnan(masked_rms_distance(a, b, torch.zeros_like(right)).item())


def test_lpips_distance_averages_its_map_over_the_mask():
    class AbsMap(torch.nn.Module):  # stands in for MaskedLPIPS: a per-pixel distance map
        def __init__(self) -> None:
            super().__init__()
            self.unused = torch.nn.Parameter(torch.zeros(()))

        def forward(self, a, b, sector):
            return (a - b).abs() * sector

    a = torch.zeros(2, 1, 4, 4)
    b = torch.ones(2, 1, 4, 4)
    b[1, ..., :2] = 3.0
    mask = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    mask[..., :2] = True
    fn = lpips_distance(AbsMap())
    assert distance_name(fn) == "lpips"
    assert fn(a, b, mask).tolist() == [1.0, 3.0]
    est = pairwise_diversity(torch.cat([a, b]), np.array([0, 1, 0, 1]), distance=fn)
    assert est.distance == "lpips" and est.mean == pytest.approx((1.0 + 2.0) / 2)  # no mask: all
