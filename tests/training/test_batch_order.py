"""The order of training samples: a pure function of (seed, epoch, rank) and the position."""

from __future__ import annotations

import pytest

from edmcli.training.batch_order import ResumableDistributedSampler


def test_sampler_is_a_pure_function_of_position():
    full = list(ResumableDistributedSampler(10, 3, seed=1))
    assert len(full) == 9 and len(set(full)) == 9
    later = ResumableDistributedSampler(10, 3, seed=1)
    later.set_position(0, 2)
    assert list(later) == full[6:]
    ranks = [ResumableDistributedSampler(10, 2, seed=1, rank=r, world_size=2) for r in (0, 1)]
    a, b = (list(s) for s in ranks)
    assert not set(a) & set(b) and len(a) == len(b) == 4
    with pytest.raises(ValueError, match="cannot fill one global batch"):
        ResumableDistributedSampler(3, 2, seed=0, world_size=2)
