"""``echo-synth bench`` end to end with tiny configurations: table, JSON, plots; bad options are
one line and exit 2."""

from __future__ import annotations

import json

import pytest
import torch

from edmcli.cli import main

QUICK = ["bench", "--preset", "tiny", "--nfe", "1,3", "--batch", "1", "--repeats", "1",
         "--device", "cpu", "--json"]  # fmt: skip


def _report(path, runs):
    path.mkdir()
    (path / "report.json").write_text(json.dumps({"format": "echo-synth-evaluation", "runs": runs}))
    return path


def _run(task, kind, model, nfe, value):
    metric = "dice_mean" if task == "seg" else "accuracy"
    return {"task": task, "kind": kind, "model": model, "nfe": nfe,
            "metrics": {metric: {"value": value}}}  # fmt: skip


def test_quick_bench_writes_json_and_plots_and_the_frontier(tmp_path, capsys):
    reports = _report(tmp_path / "evaluation", [
        _run("seg", "synthetic", "edm-l64", 1, 0.70), _run("seg", "synthetic", "edm-l64", 3, 0.795),
        _run("seg", "synthetic", "edm-l64", 9, 0.80), _run("cls", "synthetic", "edm-l64", 3, 0.9),
        _run("seg", "real", None, None, 0.85),
    ])  # fmt: skip
    out = tmp_path / "bench"
    code = main([*QUICK, "--models", "edm-l64", "--no-compile", "--no-peer", "--out", str(out),
                 "--reports", str(reports)])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)  # stdout is the JSON only; the tables went to stderr
    assert "images/s by NFE" in captured.err and "Ratios" in captured.err
    assert (out / "bench.json").is_file() and (out / "throughput.png").is_file()
    assert (out / "frontier.png").is_file()
    assert json.loads((out / "bench.json").read_text())["complete"] is True
    (scale,) = result["scales"]
    (entry,) = scale["entries"]
    assert entry["model"] == "edm-l64" and entry["net_size"] == 16 and entry["batch"] == 1
    assert "random" in entry["weights"]
    # the cost model: its parts, and each timed NFE next to its prediction
    cost = entry["cost_model"]
    parts = cost["fixed_parts_s"]
    assert set(parts) == {"spade_cache", "decode", "store_write", "start_noise"}
    assert cost["fixed_s"] == pytest.approx(sum(parts.values()))
    assert cost["noise_per_step_s"] == 0.0  # Euler/Heun draw no noise per step
    assert "step_noise" not in entry["timings"]
    # one model: its batch is the matched batch, measured once
    assert scale["matched_batch"] == 1 and entry["matched"]["same_as_fitting"]
    assert entry["matched"]["cost_model"] == cost and entry["reference_check"] is None
    assert cost["per_nfe_s"] == entry["timings"]["nfe_cached_eager"]["median_s"]
    checks = [c for c in entry["checks"] if "measured_s" in c]
    assert [c["nfe"] for c in checks] == [1, 3]
    for c in checks:
        assert c["predicted_s"] == pytest.approx(cost["fixed_s"] + c["nfe"] * cost["per_nfe_s"])
    rows = {r["nfe"]: r for r in entry["throughput"]}
    assert rows[3]["images_per_s"] == pytest.approx(1 / (cost["fixed_s"] + 3 * cost["per_nfe_s"]))
    assert rows[3]["measured_images_per_s"] == pytest.approx(1 / checks[1]["measured_s"])
    flops = entry["flops_per_image"]
    assert flops["uncached"] == flops["cached"] + flops["spade_cache"] and flops["decode"] > 0
    assert any(r["name"] == "edm-l64: γ/β cached vs recomputed" for r in scale["ratios"])
    assert "nfe_cached_compiled" in entry["skipped"]
    # the frontier: Dice 0.795 is within 1 point of the best 0.80 and faster (3 NFE < 9 NFE)
    frontier = result["frontier"]
    assert frontier["cheapest_within_1_dice_point"]["nfe"] == 3
    assert frontier["real"] == {"dice_mean": 0.85}


@pytest.mark.slow
def test_bench_with_sdm_and_the_monai_peer(tmp_path, capsys):
    out = tmp_path / "bench"
    code = main([*QUICK, "--models", "edm-l64,sdm", "--no-compile", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    (scale,) = json.loads(captured.out)["scales"]
    sdm = next(e for e in scale["entries"] if e["model"] == "sdm")
    at_1000 = next(r for r in sdm["throughput"] if r["nfe"] == 1000)
    assert at_1000["relative_to_sdm_1000"] == 1.0 and at_1000["measured_images_per_s"] is None
    assert any("/ sdm at 1000 NFE" in r["name"] for r in scale["ratios"])
    peer = scale["peer"]
    assert peer["model"] == "edm-l64"
    match = peer["match"]
    assert abs(match["monai"]["flops_rel_to_ours_uncached"]) <= 0.02  # matched FLOPs per NFE
    assert match["monai"]["flops"] != match["monai_at_our_channels"]["flops"]
    assert {r["name"] for r in peer["ratios"]} >= {"MONAI / ours, γ/β cached, eager"}


@pytest.mark.slow
def test_bench_reports_ratios_at_a_matched_batch_and_checks_sdms_prediction(
    tmp_path, capsys, monkeypatch
):
    """Each model at the batch that fits (here --batch 2) and at --matched-batch 1, both ratio
    sets labelled; SDM run end to end at a reduced NFE next to its prediction; its per-step
    noise (drawn on the device) in its cost model."""
    import edmcli.bench.throughput as throughput

    monkeypatch.setattr(throughput, "REFERENCE_CHECK_NFES", (4,))  # cheap, and not a check NFE
    out = tmp_path / "bench"
    code = main(["bench", "--preset", "tiny", "--models", "edm-l64,sdm", "--nfe", "1,2",
                 "--batch", "2", "--matched-batch", "1", "--repeats", "1", "--no-peer",
                 "--no-compile", "--device", "cpu", "--json", "--out", str(out)])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    assert result == json.loads((out / "bench.json").read_text())
    assert result["settings"]["matched_batch"] == 1
    (scale,) = result["scales"]
    assert scale["matched_batch"] == 1 and scale["matched_batch_from"] == "--matched-batch"
    entries = {e["model"]: e for e in scale["entries"]}
    for entry in entries.values():
        assert entry["batch"] == 2 and entry["cost_model"]["batch"] == 2
        matched = entry["matched"]
        assert matched["batch"] == 1 and not matched["same_as_fitting"]
        assert matched["cost_model"]["batch"] == 1
        assert matched["cost_model"]["per_nfe_path"] == entry["cost_model"]["per_nfe_path"]
        assert matched["timings"]["nfe_cached_eager"]["median_s"] > 0
    # the ratios between models: once at each model's own batch, once at the matched batch
    rows = {r["name"]: r for r in scale["ratios"]}
    fits = rows["edm-l64 at 100 NFE / sdm at 1000 NFE (images/s)"]
    matched = rows["edm-l64 at 100 NFE / sdm at 1000 NFE (images/s) at matched batch 1"]
    assert fits["batch"] == "at the batch that fits" and fits["batches"] == {"edm-l64": 2, "sdm": 2}
    assert matched["batch"] == "at matched batch 1"
    assert matched["batches"] == {"edm-l64": 1, "sdm": 1}

    def ips(cost, nfe):
        return cost["batch"] / (cost["fixed_s"] + nfe * cost["per_nfe_s"]
                                + (nfe - 1) * cost["noise_per_step_s"])  # fmt: skip

    l64, sdm = entries["edm-l64"]["matched"]["cost_model"], entries["sdm"]["matched"]["cost_model"]
    assert matched["value"] == pytest.approx(ips(l64, 100) / ips(sdm, 1000))
    # ancestral DDPM's per-step noise is in SDM's cost model, drawn on the device
    assert entries["sdm"]["cost_model"]["noise_per_step_s"] > 0
    assert entries["sdm"]["timings"]["step_noise"]["median_s"] > 0
    assert entries["edm-l64"]["cost_model"]["noise_per_step_s"] == 0.0
    # SDM at 1000 NFE is predicted; run end to end at NFE 4 to check the prediction
    check = scale["reference_check"]
    assert check["label"] == "sdm" and check["nfe"] == 4 and check["reference_nfe"] == 1000
    assert check["solver"] == "ddpm_ancestral" and check["measured_s"] > 0
    assert check["predicted_s"] == pytest.approx(
        entries["sdm"]["cost_model"]["batch"] / ips(entries["sdm"]["cost_model"], 4)
    )
    assert check["measured_over_predicted"] == pytest.approx(
        check["measured_s"] / check["predicted_s"]
    )
    assert check["predicted_reference_images_per_s"] == pytest.approx(
        ips(entries["sdm"]["cost_model"], 1000)
    )
    assert any(c.get("reference") and c["nfe"] == 4 for c in entries["sdm"]["checks"])
    assert any("checks its 1000-NFE prediction" in name for name in rows)
    # the tables say which batch each ratio is at, and the check
    assert "matched batch 1 (--matched-batch)" in captured.err
    assert "checked end to end at NFE 4" in captured.err
    assert "matched 1" in captured.err and "fits (2 vs 2)" in captured.err


@pytest.mark.slow
def test_bench_times_the_compiled_denoiser(tmp_path, capsys):
    code = main([*QUICK, "--models", "edm-l64", "--compile", "--no-peer", "--nfe", "2",
                 "--out", str(tmp_path / "b")])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    (entry,) = json.loads(captured.out)["scales"][0]["entries"]
    compiled = entry["timings"]["nfe_cached_compiled"]
    assert compiled["warmup_s"] and entry["cost_model"]["per_nfe_path"] == "nfe_cached_compiled"
    assert any(r["name"] == "edm-l64: compiled vs eager" for r in
               json.loads(captured.out)["scales"][0]["ratios"])  # fmt: skip


BAD = [
    (["--models", "edm-l32"], "edm-l32"),
    (["--nfe", "0"], "--nfe 0"),
    (["--nfe", "ten"], "--nfe 'ten'"),
    (["--batch", "0"], "--batch 0"),
    (["--matched-batch", "0"], "--matched-batch 0"),
    (["--repeats", "0"], "--repeats 0"),
    (["--reports", "missing"], "--reports missing"),
    (["--run", "norun", "--models", "edm"], "--models and --run"),
    (["--run", "norun"], "no trained run at"),
]


@pytest.mark.parametrize("extra, expected", BAD, ids=[b[1] for b in BAD])
def test_bad_options_are_one_line_and_exit_2(extra, expected, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(["bench", "--device", "cpu", "--out", str(tmp_path / "b"), *extra])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), err
    assert expected in lines[0]
    assert not (tmp_path / "b").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_a_gpu_is_refused(tmp_path, capsys):
    code = main(["bench", "--device", "cuda", "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "no GPU is available" in err
    assert not (tmp_path / "b").exists()
