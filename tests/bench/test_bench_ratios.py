"""The ratios of the cost study next to their ceilings, and the utility-per-cost frontier, on
synthetic bench entries."""

from __future__ import annotations

import pytest

from edmcli.bench.plot import cheapest_within, frontier_points, pareto_front
from edmcli.bench.ratios import FITTING, RATIO_NFE, matched_label, ratio_rows
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


def _matched(entry, batch, per_nfe, fixed, noise=0.0):
    """``entry`` with a ``matched`` record: its cost model at ``batch``."""
    cost = {"batch": batch, "per_nfe_s": per_nfe, "fixed_s": fixed, "noise_per_step_s": noise,
            "per_nfe_path": "nfe_cached_eager"}  # fmt: skip
    return {**entry, "matched": {"batch": batch, "same_as_fitting": batch == entry["batch"],
                                 "cost_model": cost}}  # fmt: skip


def test_ratios_between_models_come_at_the_batch_that_fits_and_at_the_matched_batch():
    """On CUDA a latent model fits a far larger batch than a pixel model: its ratios at its own
    batch mix batch efficiency into model cost; the matched rows compare equal batches."""
    flops = {"cached": 1e9, "uncached": 2e9, "spade": 1e9}
    l64 = _matched(_entry("edm-l64", 0.64, 2.56, batch=256, **flops), 16, 0.08, 0.32)
    edm = _matched(_entry("edm", 0.4, 0.8, batch=16, **flops), 16, 0.4, 0.8)
    sdm = _matched(_entry("sdm", 0.4, 0.8, batch=16, **flops), 16, 0.4, 0.8, noise=0.01)
    rows = {r["name"]: r for r in ratio_rows([l64, edm, sdm], {"bf16": None, "fp32": None}, 16)}
    label = matched_label(16)
    assert label == "at matched batch 16"
    fits = rows["edm-l64 / edm per NFE (γ/β cached, eager)"]
    matched = rows[f"edm-l64 / edm per NFE (γ/β cached, eager) {label}"]
    assert fits["batch"] == FITTING and fits["batches"] == {"edm-l64": 256, "edm": 16}
    assert fits["value"] == pytest.approx(0.4 * 256 / (0.64 * 16))  # 10×: per image at 256
    assert matched["batch"] == label and set(matched["batches"].values()) == {16}
    assert matched["value"] == pytest.approx(0.4 / 0.08)  # 5×: the same 16 images each
    assert matched["ceiling"] == fits["ceiling"]
    at_100 = rows[f"edm-l64 / edm images/s {label}"]
    assert at_100["value"] == pytest.approx((0.8 + 100 * 0.4) / (0.32 + 100 * 0.08))
    vs_sdm = rows[f"edm-l64 at {RATIO_NFE} NFE / sdm at {SDM_NFE} NFE (images/s) {label}"]
    sdm_1000 = 0.8 + SDM_NFE * 0.4 + (SDM_NFE - 1) * 0.01  # its per-step noise included
    assert vs_sdm["value"] == pytest.approx(sdm_1000 / (0.32 + 100 * 0.08))
    assert set(vs_sdm["batches"].values()) == {16}
    # a model not measured at the matched batch (out of memory) has no matched rows
    l64["matched"] = {"batch": 16, "cost_model": None, "skipped": "out of memory"}
    names = {r["name"] for r in ratio_rows([l64, edm], {"bf16": None, "fp32": None}, 16)}
    assert "edm-l64 / edm images/s" in names and f"edm-l64 / edm images/s {label}" not in names


def test_the_reference_check_is_a_row_of_measured_over_predicted():
    sdm = _entry("sdm", 0.2, 0.3, cached=1, uncached=2, spade=1)
    sdm["reference_check"] = {"reference_nfe": SDM_NFE, "nfe": 50, "solver": "ddpm_ancestral",
                              "measured_s": 12.0, "predicted_s": 10.0}  # fmt: skip
    (row,) = [r for r in ratio_rows([sdm], {"bf16": None, "fp32": None})
              if "measured / predicted" in r["name"]]  # fmt: skip
    assert row["value"] == pytest.approx(1.2) and row["at"] == "50 NFE"
    assert f"{SDM_NFE}-NFE prediction" in row["name"] and row["source"] == "measured"


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


def test_a_student_and_another_solver_are_their_own_series_at_the_teachers_cost():
    entry = _entry("edm-l64", 0.02, 0.1, cached=1, uncached=2, spade=1, batch=4)

    def run(solver, nfe, value):
        return {"task": "seg", "kind": "synthetic", "model": "edm-l64", "nfe": nfe,
                "solver": solver, "metrics": {"dice_mean": {"value": value}}}  # fmt: skip

    report = {"_path": "r.json", "runs": [run("heun", 2, 0.5), run("consistency", 2, 0.75),
                                          run("dpmpp_3m", 2, 0.6), run(None, 35, 0.8)]}  # fmt: skip
    points, _, _ = frontier_points([report], [entry])
    at2 = {p["series"]: p for p in points if p["nfe"] == 2}
    assert set(at2) == {"edm-l64", "edm-l64 student", "edm-l64 dpmpp_3m"} and len(points) == 4
    assert at2["edm-l64 student"]["dice_mean"] == 0.75
    # the same network at the same NFE costs the same, whichever sampler
    assert len({p["images_per_s"] for p in at2.values()}) == 1
    assert cheapest_within(points, tol=0.06)["series"] == "edm-l64 student"


def test_two_runs_of_one_model_are_two_series_named_by_their_folders():
    entry = _entry("edm-l64", 0.02, 0.1, cached=1, uncached=2, spade=1, batch=4)

    def run(folder, solver, value):
        store = {"provenance": {"run": f"/x/runs/{folder}"}}
        return {"task": "seg", "kind": "synthetic", "model": "edm-l64", "nfe": 1,
                "solver": solver, "train_stores": [store],
                "metrics": {"dice_mean": {"value": value}}}  # fmt: skip

    report = {"_path": "r.json", "runs": [run("a-student", "consistency", 0.7),
                                          run("b-student", "consistency", 0.8)]}  # fmt: skip
    points, _, _ = frontier_points([report], [entry])
    assert {p["series"]: p["dice_mean"] for p in points} == {"a-student": 0.7, "b-student": 0.8}
