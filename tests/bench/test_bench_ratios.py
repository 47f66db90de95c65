"""The ratios of the cost study next to their ceilings, and the utility-per-cost frontier, on
synthetic bench entries."""

from __future__ import annotations

import pytest

from edmcli.bench.plot import cheapest_within, frontier_points, pareto_front
from edmcli.bench.ratios import RATIO_NFE, ratio_rows
from edmcli.models.registry import get_spec

SDM_NFE = get_spec("sdm").paper_reference_nfe


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
