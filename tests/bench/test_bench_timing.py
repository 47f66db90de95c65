"""Timing rules on synthetic values: repeats within the budget, median and spread."""

from __future__ import annotations

import pytest

from edmcli.bench.timing import plan_repeats, summarise


def test_repeats_fit_the_budget_and_big_calls_skip_the_separate_warmup():
    assert plan_repeats(None, 3, 6.0) == (1, 3)  # nothing known yet
    assert plan_repeats(0.5, 3, 6.0) == (1, 3)
    assert plan_repeats(1.3, 3, 6.0) == (1, 3)  # 1.3 ≤ 6/4: warm-up, then (6 − 1.3) // 1.3
    assert plan_repeats(2.0, 3, 6.0) == (0, 3)  # 2 > 6/4: no warm-up, 3 fit
    assert plan_repeats(18.0, 3, 6.0) == (0, 1)  # one call over the budget: timed once
    assert plan_repeats(18.0, 3, 6.0, always_warm=True) == (1, 1)
    assert plan_repeats(5.0, 3, None) == (1, 3)


def test_median_and_spread_of_timings():
    summary = summarise([1.0, 3.0, 2.0])
    assert summary["median_s"] == 2.0 and summary["spread"] == pytest.approx(1.0)
