"""The linear cost model and the pure rules around it, on synthetic timings: fitting,
prediction, the ratios and their ceilings, repeat and batch planning, the frontier."""

from __future__ import annotations

import numpy as np
import pytest

from edmcli.bench.bench import RATIO_NFE, SDM_NFE, plan_scales, ratio_rows
from edmcli.bench.plot import cheapest_within, frontier_points, pareto_front
from edmcli.bench.throughput import (
    CostModel,
    check_solver,
    fit_batch,
    fit_cost_model,
    pick_check_nfes,
    relative_error,
)
from edmcli.bench.timing import plan_repeats, summarise


def test_images_per_second_is_batch_over_fixed_plus_nfe_times_per_nfe():
    model = CostModel(batch=8, per_nfe_s=0.05, fixed_s=0.4)
    assert model.seconds(10) == pytest.approx(0.9)
    assert model.images_per_s(10) == pytest.approx(8 / 0.9)
    # many NFEs: the fixed cost vanishes; one NFE costs at least the fixed part
    assert model.images_per_s(1e9) * 1e9 == pytest.approx(8 / 0.05, rel=1e-6)
    assert model.images_per_s(0) == pytest.approx(8 / 0.4)


def test_fit_recovers_the_model_from_synthetic_timings():
    truth = CostModel(4, per_nfe_s=0.031, fixed_s=0.27)
    nfes = [1, 2, 5, 10, 20, 50]
    exact = fit_cost_model(nfes[:2], [truth.seconds(n) for n in nfes[:2]], batch=4)
    assert exact.per_nfe_s == pytest.approx(0.031) and exact.fixed_s == pytest.approx(0.27)
    noise = np.array([1, -1, 1, -1, 1, -1]) * 1e-3  # zero-mean, orthogonal to nothing in NFE
    noisy = fit_cost_model(nfes, [truth.seconds(n) + e for n, e in zip(nfes, noise, strict=True)],
                           batch=4)  # fmt: skip
    assert noisy.per_nfe_s == pytest.approx(0.031, rel=0.01)
    assert noisy.fixed_s == pytest.approx(0.27, abs=2e-3)
    with pytest.raises(ValueError):
        fit_cost_model([10, 10], [1.0, 1.1], batch=4)
    assert relative_error(1.1, 1.0) == pytest.approx(0.1)


def test_ratio_of_two_models_goes_from_fixed_to_per_nfe_ratio():
    fast = CostModel(8, per_nfe_s=0.01, fixed_s=0.2)
    slow = CostModel(8, per_nfe_s=0.14, fixed_s=0.1)
    ratio = [fast.images_per_s(n) / slow.images_per_s(n) for n in (1, 10, 100, 10**6)]
    assert ratio[0] == pytest.approx(0.24 / 0.21)
    assert ratio[-1] == pytest.approx(14.0, rel=1e-3)
    assert ratio == sorted(ratio)  # the per-NFE advantage shows more with more NFEs


def _entry(model, per_nfe, fixed, cached, uncached, spade, decode=0.0, batch=2, label=None,
           measured=None):  # fmt: skip
    """A bench entry with a given cost model and FLOP count (per image)."""
    timings = {"nfe_cached_eager": {"median_s": per_nfe}}
    if measured:
        timings |= {k: {"median_s": v} for k, v in measured.items()}
    return {
        "label": label or model, "model": model, "preset": "paper", "batch": batch,
        "precision": "fp32",
        "flops_per_image": {"cached": cached, "uncached": uncached, "spade_cache": spade,
                            "decode": decode},
        "cost_model": {"batch": batch, "per_nfe_s": per_nfe, "fixed_s": fixed,
                       "per_nfe_path": "nfe_cached_eager"},
        "timings": timings,
        "throughput": [{"nfe": n, "images_per_s": batch / (fixed + n * per_nfe)}
                       for n in (1, RATIO_NFE, SDM_NFE)],
    }  # fmt: skip


def test_ratio_rows_give_each_ratio_and_its_flop_ceiling():
    l64 = _entry("edm-l64", 0.02, 0.1, cached=219e9, uncached=325e9, spade=106e9, decode=89e9,
                 measured={"nfe_uncached_eager": 0.029})  # fmt: skip
    edm = _entry("edm", 0.3, 0.5, cached=3123e9, uncached=4657e9, spade=1534e9)
    sdm = _entry("sdm", 0.2, 0.3, cached=2238e9, uncached=3431e9, spade=1194e9)
    rows = {r["name"]: r for r in ratio_rows([l64, edm, sdm], {"bf16": None, "fp32": None})}
    per_nfe = rows["edm-l64 / edm per NFE (γ/β cached, eager)"]
    assert per_nfe["value"] == pytest.approx(15.0) and per_nfe["source"] == "measured"
    assert per_nfe["ceiling"] == pytest.approx(3123 / 219)
    at_100 = rows["edm-l64 / edm images/s"]
    assert at_100["value"] == pytest.approx((0.5 + 100 * 0.3) / (0.1 + 100 * 0.02))
    assert at_100["ceiling"] == pytest.approx((1534 + 100 * 3123) / (106 + 89 + 100 * 219))
    vs_sdm = rows[f"edm-l64 at {RATIO_NFE} NFE / sdm at {SDM_NFE} NFE (images/s)"]
    assert vs_sdm["value"] == pytest.approx((0.3 + 1000 * 0.2) / (0.1 + 100 * 0.02))
    assert "predicted" in vs_sdm["source"]
    cache = rows["edm-l64: γ/β cached vs recomputed"]
    assert cache["value"] == pytest.approx(0.029 / 0.02)
    assert cache["ceiling"] == pytest.approx(325 / 219)
    assert "edm-l64 / edm-l128 images/s" not in rows  # no edm-l128 entry: no such ratio


def test_frontier_names_the_fastest_setting_within_one_dice_point():
    points = [
        {"model": "sdm", "nfe": 1000, "images_per_s": 0.05, "dice_mean": 0.880},
        {"model": "edm", "nfe": 35, "images_per_s": 1.0, "dice_mean": 0.885},
        {"model": "edm-l64", "nfe": 35, "images_per_s": 14.0, "dice_mean": 0.878},
        {"model": "edm-l64", "nfe": 5, "images_per_s": 60.0, "dice_mean": 0.850},
    ]
    assert cheapest_within(points)["images_per_s"] == 14.0  # 0.878 ≥ 0.885 − 0.01
    assert cheapest_within(points, tol=0.001)["model"] == "edm"
    front = pareto_front(points, "dice_mean")
    assert [p["images_per_s"] for p in front] == [1.0, 14.0, 60.0]  # sdm is dominated by edm
    assert cheapest_within([], "dice_mean") is None


def test_frontier_points_pair_report_runs_with_the_bench_cost_model():
    entry = _entry("edm-l64", 0.02, 0.1, cached=1, uncached=2, spade=1, batch=4)

    def run(task, kind, model, nfe, value):
        metric = "dice_mean" if task == "seg" else "accuracy"
        return {"task": task, "kind": kind, "model": model, "nfe": nfe,
                "metrics": {metric: {"value": value}}}  # fmt: skip

    report = {"_path": "r.json", "runs": [
        run("seg", "synthetic", "edm-l64", 5, 0.8), run("cls", "synthetic", "edm-l64", 5, 0.9),
        run("seg", "synthetic", "vp", 35, 0.7), run("seg", "real", None, None, 0.86),
    ]}  # fmt: skip
    points, real, notes = frontier_points([report], [entry])
    assert len(points) == 1 and points[0]["dice_mean"] == 0.8 and points[0]["accuracy"] == 0.9
    assert points[0]["images_per_s"] == pytest.approx(4 / (0.1 + 5 * 0.02))
    assert real == {"dice_mean": 0.86}
    assert notes and "vp 35 NFE" in notes[0]


def test_repeats_fit_the_budget_and_big_calls_skip_the_separate_warmup():
    assert plan_repeats(None, 3, 6.0) == (1, 3)  # nothing known yet
    assert plan_repeats(0.5, 3, 6.0) == (1, 3)
    assert plan_repeats(1.3, 3, 6.0) == (1, 3)  # 1.3 ≤ 6/4: warm-up, then (6 − 1.3) // 1.3
    assert plan_repeats(2.0, 3, 6.0) == (0, 3)  # 2 > 6/4: no warm-up, 3 fit
    assert plan_repeats(18.0, 3, 6.0) == (0, 1)  # one call over the budget: timed once
    assert plan_repeats(18.0, 3, 6.0, always_warm=True) == (1, 1)
    assert plan_repeats(5.0, 3, None) == (1, 3)


def test_batch_is_the_largest_power_of_two_that_fits():
    gib = 2**30
    # 8 GiB fixed + 2 GiB per image: 40 GiB fit (40 − 8) / 2 = 16 images
    assert fit_batch(10 * gib, 12 * gib, 40 * gib) == 16
    assert fit_batch(10 * gib, 12 * gib, 54 * gib) == 16  # 23 fit → 16
    assert fit_batch(10 * gib, 12 * gib, 5 * gib) == 1
    assert fit_batch(1, 2, 1e12, cap=256) == 256


def test_check_nfes_spread_within_the_budget():
    def seconds(n):
        return 0.1 + 0.01 * n

    assert pick_check_nfes([1, 2, 5, 10, 20, 50, 100, 200], seconds, budget_s=2.0) == [1, 10, 100]
    assert pick_check_nfes([1, 2, 5], seconds, budget_s=0.12) == [1]
    assert pick_check_nfes([5, 10], seconds, budget_s=0.1) == []
    assert check_solver("edm") == "euler" and check_solver("sdm") == "ddpm_ancestral"


def test_median_and_spread_of_timings():
    summary = summarise([1.0, 3.0, 2.0])
    assert summary["median_s"] == 2.0 and summary["spread"] == pytest.approx(1.0)


def test_the_cpu_default_pairs_paper_ratios_with_a_tiny_sweep():
    scales, notes = plan_scales("cpu", "auto", False, None, None, None, True)
    assert [(s.name, s.batch, s.compile) for s in scales] == [("paper", 1, False),
                                                               ("tiny", 4, False)]  # fmt: skip
    assert any("compilation off" in n for n in notes)
    (cuda,), _ = plan_scales("cuda", "auto", False, None, None, None, True)
    assert (cuda.name, cuda.batch, cuda.compile) == ("paper", None, True)
    (tiny,), _ = plan_scales("cpu", "tiny", False, 2, 1, True, False)
    assert (tiny.batch, tiny.repeats, tiny.compile, tiny.peer) == (2, 1, True, False)
