"""The scales a bench measures for a device and its options."""

from __future__ import annotations

from edmcli.bench.scales import plan_scales


def test_the_cpu_default_pairs_paper_ratios_with_a_tiny_sweep():
    scales, notes = plan_scales("cpu", "auto", False, None, None, None, True)
    assert [(s.name, s.batch, s.compile) for s in scales] == [("paper", 1, False),
                                                               ("tiny", 4, False)]  # fmt: skip
    assert any("compilation off" in n for n in notes)
    (cuda,), _ = plan_scales("cuda", "auto", False, None, None, None, True)
    assert (cuda.name, cuda.batch, cuda.compile) == ("paper", None, True)
    (tiny,), _ = plan_scales("cpu", "tiny", False, 2, 1, True, False)
    assert (tiny.batch, tiny.repeats, tiny.compile, tiny.peer) == (2, 1, True, False)
