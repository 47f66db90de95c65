"""Which images of a synthetic store are scored: whole source groups, seeded."""

from __future__ import annotations

import numpy as np

from edmcli.evaluation.image_sets import select_groups


def test_the_selection_keeps_whole_source_groups():
    groups = np.repeat(np.arange(20), 5)
    rows = select_groups(groups, len(groups), 23, seed=1)
    assert len(rows) == 25 and np.all(np.diff(rows) > 0)  # five whole groups, sorted
    assert np.all(np.bincount(groups[rows], minlength=20) % 5 == 0)
    assert np.array_equal(rows, select_groups(groups, len(groups), 23, seed=1))
    assert len(select_groups(groups, len(groups), None, seed=1)) == 100
    assert len(select_groups(None, 100, 30, seed=1)) == 30
