"""The demo's front page: the two answers computed from hand-made report and bench records."""

from __future__ import annotations

import pytest
from fake_reports import fake_run

from edmcli.demo import DEMO, front_page, gap_rows, throughput_line

LATENT, PIXEL = DEMO["model"], DEMO["pixel_model"]


def _gap(value):
    return {"value": value, "patient_bootstrap": {"ci_low": value - 0.01, "ci_high": value + 0.01}}


def _report():
    seg_syn = fake_run("seg-syn", "seg", dice_mean=0.80)
    seg_syn["gap_to_reference"] = {"dice_mean": _gap(-0.1)}
    cls_syn = fake_run("cls-syn", "cls", accuracy=0.5)
    cls_syn["gap_to_reference"] = {"accuracy": _gap(-0.45)}
    runs = [fake_run("seg-real", "seg", "real", dice_mean=0.90), seg_syn,
            fake_run("cls-real", "cls", "real", accuracy=0.95), cls_syn]  # fmt: skip
    return {"runs": runs, "test": {"patients": [f"p{i}" for i in range(20)],
                                   "images": {"seg": 80, "cls": 80}}}  # fmt: skip


def _entry(model, batch, fixed_s, per_nfe_s, cached, decode=0.0):
    flops = {"spade_cache": 0.0, "decode": decode, "cached": cached}
    costs = {"batch": batch, "fixed_s": fixed_s, "per_nfe_s": per_nfe_s}
    return {"model": model, "label": model, "batch": batch, "cost_model": costs,
            "flops_per_image": flops}  # fmt: skip


def test_gap_rows_read_values_and_patient_intervals():
    rows = gap_rows(_report())
    assert rows[0] == ["segmentation: mean Dice (%)", "90.0 [88.0, 92.0]", "80.0 [78.0, 82.0]",
                       "-10.0 [-11.0, -9.0]"]  # fmt: skip
    assert rows[1][0] == "A2C/A4C view accuracy (%)" and rows[1][3] == "-45.0 [-46.0, -44.0]"


def test_throughput_line_is_the_ratio_of_the_cost_models():
    # latent: 4 images in 1 + 35 × 0.1 s = 4.5 s; pixel: 4 in 1 + 35 × 1.0 s = 36 s → 8×
    result = {"environment": {"device_name": "test CPU"}, "settings": {"device": "cpu"},
              "scales": [{"entries": [_entry(LATENT, 4, 1.0, 0.1, 10.0, decode=5.0),
                                      _entry(PIXEL, 4, 1.0, 1.0, 100.0)]}]}  # fmt: skip
    line = throughput_line(result, nfe=35)
    assert "**8.0× faster**" in line
    assert f"FLOP ratio {3500 / 355:.1f}×" in line and "test CPU" in line
    one = {**result, "scales": [{"entries": result["scales"][0]["entries"][:1]}]}
    assert "only one of the two models" in throughput_line(one)


def test_front_page_answers_first_and_links_only_existing_pictures(tmp_path):
    result = {"environment": {}, "settings": {"device": "cpu"},
              "scales": [{"entries": [_entry(LATENT, 4, 1.0, 0.1, 1.0),
                                      _entry(PIXEL, 4, 1.0, 1.0, 1.0)]}]}  # fmt: skip
    report = {**_report(), "plots": ["plots/dice.png", "plots/missing.png"]}
    (tmp_path / "evaluation" / "plots").mkdir(parents=True)
    (tmp_path / "evaluation" / "plots" / "dice.png").write_bytes(b"png")
    page = front_page(report, result, tmp_path)
    first = page.index("## 1."), page.index("## 2."), page.index("## Pictures")
    assert first == tuple(sorted(first))
    assert "20 held-out real patients" in page and f"NFE {DEMO['nfe']}" in page
    assert "![dice](evaluation/plots/dice.png)" in page and "missing" not in page
    assert "EDM-L64 conditioned on the label map and the view" in page
    assert "EDM-L64 (map only, as in the paper)" in front_page(report, result, tmp_path, "none")
    assert "Wall time" not in page
    timed = front_page(report, result, tmp_path, stage_seconds={"prepare": 1.2, "evaluate": 118.8})
    assert "Wall time of this call: 2.0 min (prepare 1 s, evaluate 119 s)" in timed


@pytest.mark.parametrize("kind", ["seg", "cls"])
def test_gap_rows_without_a_real_reference(kind):
    report = {"runs": [fake_run(f"{kind}-syn", kind, dice_mean=0.8, accuracy=0.5)]}
    (row,) = gap_rows(report)
    assert row[1] == "–" and row[3] == "–"


def test_quality_lines_state_each_metric_next_to_the_real_value_and_the_decoder_ceiling():
    from edmcli.demo import quality_lines

    store = {"label": "edm-l64-nfe35", "images_scored": 600, "images_judged": 80,
             "seconds": {"total": 12.0},
             "summary": {"label_dice": 0.583, "synthetic_accuracy": 0.745, "radiomics.fd": 3.5},
             "judged_on": {"store": "probe.zarr"},
             "decoder_ceiling": {"label_fidelity": {"all": {"dice_mean": 0.75}}}}  # fmt: skip
    floor = {"radiomics": {"all": {"fd": 1.25, "spread": {"fd": 0.5}}}}
    quality = {"real": {"summary": {"label_dice": 0.868}, "halves": {"distances": floor}},
               "stores": [store]}  # fmt: skip
    lines = quality_lines({"quality": quality})
    assert lines[0].startswith("`edm-l64-nfe35` (600 images scored in 12 s;")
    assert "58.3 % (real test images: 86.8 %), on 80 images of its probe store" in lines[1]
    assert "on synthetic images: 74.5 %, on 80 images" in lines[2]  # no real value given
    assert (
        "radiomics distance" in lines[3]
        and "3.5 (two halves of the real test patients: 1.25 ± 0.5)" in lines[3]
    )
    assert "decoder ceiling" in lines[4] and "label fidelity 75.0 %" in lines[4]
    store["decoder_ceiling"] = None  # a pixel-space model has none
    assert not any("decoder ceiling" in line for line in quality_lines({"quality": quality}))
    store["judged_on"] = {"store": None, "note": "edm-l64-nfe35: label fidelity ... --probe P"}
    del store["summary"]["label_dice"], store["summary"]["synthetic_accuracy"]
    assert any("--probe" in line for line in quality_lines({"quality": quality}))
    assert quality_lines({}) == []


def test_quality_lines_state_the_memorisation_check():
    from edmcli.demo import quality_lines

    pixel = {"flagged": {"1.0": {"all": 0.038}, "5.0": {"all": 0.118}},
             "nearest_is_own_source_patient": 0.076}  # fmt: skip
    store = {"label": "s", "images_scored": 5, "seconds": {"total": 1.0}, "summary": {},
             "memorisation": {"spaces": {"pixel": pixel}}}  # fmt: skip
    line = quality_lines({"quality": {"real": {}, "stores": [store]}})[-1]
    assert line.startswith("- memorisation: 3.8 % / 11.8 % of its images")
    assert "own source patient nearest: 7.6 %" in line
    source = {"flagged": {"1.0": {"all": 0.538}, "5.0": {"all": 0.624}}}
    store["memorisation"]["spaces"]["source_image"] = source
    line = quality_lines({"quality": {"real": {}, "stores": [store]}})[-1]
    assert "its probe's images are to theirs: 53.8 % / 62.4 %" in line
