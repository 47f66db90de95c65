"""The correlation table of ``evaluate --fidelity`` and the report's quality section: stores whose
label fidelity falls as their downstream Dice falls rank the metric first."""

from __future__ import annotations

import pytest
from fake_reports import fake_report, fake_run
from fidelity_fakes import PNG, label_copy_store, real_test_set, reference_nets

from edmcli.evaluation.correlation import correlation_table
from edmcli.evaluation.fidelity import real_reference_entry, score_images
from edmcli.evaluation.image_sets import load_synthetic
from edmcli.evaluation.report import write_report


def _run(name, task, model=None, nfe=None, kind="synthetic", **metrics):
    return fake_run(name, task, kind, model, nfe, spacing_mm=False, **metrics)


@pytest.mark.slow
def test_correlation_table_and_report_section(phantom_store, tmp_path):
    real, real_out = real_test_set(phantom_store)
    quality_stores, runs = (
        [],
        [
            _run("seg-real", "seg", kind="real", dice_mean=0.9),
            _run("cls-real", "cls", kind="real", accuracy=0.9, balanced_accuracy=0.9),
        ],
    )
    for k, shift in enumerate((0, 1, 2, 4)):  # more NFE, fewer misplaced pixels, better Dice
        nfe = (99, 35, 9, 5)[k]
        store = label_copy_store(phantom_store, tmp_path / f"n{nfe}.zarr", shift=shift, seed=k,
                                 noise=0.02 * k, nfe=nfe)  # fmt: skip
        data = load_synthetic([str(store)], None, seed=0)
        entry = score_images(reference_nets(32), data, real_out, real)
        quality_stores.append({"label": f"edm-l64 {nfe}", "slug": f"s{nfe}",
                               "model": "edm-l64", "nfe": nfe, "solver": "heun",
                               "stores": [str(store)], **entry})  # fmt: skip
        runs.append(_run(f"seg-s{nfe}", "seg", "edm-l64", nfe, dice_mean=0.85 - 0.1 * k))
        runs.append(_run(f"cls-s{nfe}", "cls", "edm-l64", nfe, accuracy=0.8, balanced_accuracy=0.8))
    report = fake_report(runs)
    quality = {
        "reference_runs": {"seg": "runs/seg-real", "cls": "runs/cls-real"}, "max_images": None,
        "selection": "every image", "diversity_distance": "ssim", "notes": ["a note"],
        "feature_spaces": {"segmenter": "segmenter bottleneck",
                           "classifier": "classifier penultimate layer"},
        "real": real_reference_entry(real, real_out),
        "stores": quality_stores, "seconds": 1.0, "correlation": None,
    }  # fmt: skip
    real_entry = quality["real"]
    assert real_entry["images"] == len(real.images) and "halves" in real_entry
    assert 0.0 <= real_entry["summary"]["label_dice"] < 1.0  # echoes are not label codes
    corr = correlation_table(quality, report, iterations=200)
    rows = {r["metric"]: r for r in corr["rows"]}
    assert rows["label_dice"]["dice_mean"]["rho"] == pytest.approx(1.0)  # the same ranking
    assert rows["label_hd95_lv"]["dice_mean"]["rho"] == pytest.approx(-1.0)
    assert rows["label_dice"]["accuracy"]["rho"] is None  # constant accuracies: no ρ (null)
    assert "best" not in corr and "by chance" in corr["caveat"]  # no argmax over ~30 metrics
    assert correlation_table({**quality, "stores": quality_stores[:2]}, report) is None
    report["quality"] = {**quality, "correlation": corr}
    written = {p.name for p in write_report(report, tmp_path / "out")}
    assert {"quality_vs_nfe.png", "quality_vs_dice.png"} <= written
    for name in ("quality_vs_nfe", "quality_vs_dice"):
        assert (tmp_path / "out" / "plots" / f"{name}.png").read_bytes()[:4] == PNG
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Quality of the synthetic data (`--fidelity`)" in md
    assert "### Which metric predicts utility" in md and "label fidelity: mean Dice" in md
    assert "| edm-l64 99 | edm-l64 | 99 | 85.0 |" in md  # next to its downstream Dice
    assert "Tracks best" not in md and "Caveat:" in md
