"""The report as text: ``report.md`` (:func:`markdown`: one table with each training dataset,
synthetic or real, and its gap to the real-trained reference; with ``evaluate --fidelity`` the
quality section, :func:`quality_markdown`) and the summaries printed on the terminal
(:func:`print_summary`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from edmcli.console import console
from edmcli.data.labels import VIEWS
from edmcli.evaluation.bootstrap import DEFAULT_CONFIDENCE
from edmcli.evaluation.correlation import downstream_targets
from edmcli.evaluation.fidelity import METRICS, SPACE_TITLES
from edmcli.evaluation.metrics.diversity import DIVERSITY_TITLES
from edmcli.evaluation.metrics.segmentation import STRUCTURES
from edmcli.evaluation.report.data import METRIC_TITLES, PERCENT, QUALITY_PERCENT

FEW_PATIENTS = 20  # below this, say that the patient bootstrap's intervals are rough


def _fmt(name: str, estimate: dict[str, Any] | None, sign: bool = False) -> str:
    """``mean ± std [lo, hi]``: paper subsets, then the patient bootstrap's interval."""
    if not estimate:
        return "–"
    scale = 100.0 if name in PERCENT else 1.0
    paper, boot = estimate["paper_subsets"], estimate["patient_bootstrap"]
    f = "+.1f" if sign else ".1f"
    m, s = paper["mean"] * scale, paper["std"] * scale
    lo, hi = boot["ci_low"] * scale, boot["ci_high"] * scale
    return f"{m:{f}} ± {s:.1f} [{lo:{f}}, {hi:{f}}]"


def _fmt_gap(name: str, estimate: dict[str, Any] | None) -> str:
    return _fmt(name, estimate, sign=True)


def _rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The one table: a row per training dataset, seg and cls columns side by side."""
    runs = report["runs"]
    tasks = report["settings"]["tasks"]
    seg_mm = any(r.get("spacing_mm") for r in runs if r["task"] == "seg")
    header = ["training data", "kind", "model", "NFE"]
    columns: list[tuple[str, str, bool]] = []  # (task, metric, is_gap)
    if "seg" in tasks:
        columns += [("seg", f"dice_{n}", False) for n in STRUCTURES]
        columns += [("seg", "dice_mean", False), ("seg", "dice_mean", True)]
        columns += [("seg", "hd_lv_px", False), ("seg", "hd95_lv_px", False)]
        if seg_mm:
            columns += [("seg", "hd_lv_mm", False), ("seg", "hd95_lv_mm", False)]
    if "cls" in tasks:
        columns += [("cls", "accuracy", False), ("cls", "balanced_accuracy", False)]
        columns += [("cls", "accuracy", True)]
    for _task, metric, gap in columns:
        title = METRIC_TITLES[metric] + (" (%)" if metric in PERCENT and not gap else "")
        header.append(f"Δ {METRIC_TITLES[metric]} vs real" if gap else title)
    rows = []
    slugs = list(dict.fromkeys(r["slug"] for r in runs))
    for slug in slugs:
        mine = {r["task"]: r for r in runs if r["slug"] == slug}
        first = next(iter(mine.values()))
        row = [first["label"], first["kind"], first["model"] or "–", str(first["nfe"] or "–")]
        for task, metric, gap in columns:
            record = mine.get(task)
            if record is None:
                row.append("–")
            elif gap:
                if record["reference"] == record["name"]:
                    row.append("reference")
                else:
                    row.append(_fmt_gap(metric, (record["gap_to_reference"] or {}).get(metric)))
            else:
                row.append(_fmt(metric, record["metrics"].get(metric)))
        rows.append(row)
    return header, rows


def markdown(report: dict[str, Any]) -> str:
    """``report.md``: the table, then the settings, validation choices and notes."""
    s, t = report["settings"], report["test"]
    header, rows = _rows(report)
    n_patients = len(t["patients"])
    iterations = s["bootstrap_iterations"]
    percent = f"{s['bootstrap_fraction'] * 100:g} %"
    confidence = f"{s.get('bootstrap_confidence', DEFAULT_CONFIDENCE) * 100:g} %"
    lines = [
        "# echo-synth evaluation",
        "",
        f"Test set: the test split of `{t['path']}` ({n_patients} held-out patients, "
        + ", ".join(f"{n} images for {task}" for task, n in t["images"].items())
        + f", {t['image_size'][0]}×{t['image_size'][1]}).",
        f"Preset `{s['preset']}`, seed {s['seed']}, device {s['device']}"
        + (f", training in {s['training_dtype']}" if s.get("training_dtype") else "")
        + (f", {s['jobs']} runs at once" if s.get("jobs", 1) > 1 else "")
        + ".",
        "",
        f"Each cell reads `mean ± std (paper subsets) [lo, hi] {confidence} patient bootstrap`: "
        f"mean ± std over {iterations} random {percent} subsets of the test images drawn "
        "without replacement (the paper's protocol, kept for comparison; it is not a "
        f"confidence interval), then the {confidence} percentile interval of a patient-level "
        f"bootstrap ({n_patients} test patients resampled with replacement {iterations} times, "
        "each with all of its images). Gaps (Δ) are run − real-trained reference per test "
        "image, on the same subsets and the same resampled patients for every run (paired).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
    ]
    if n_patients < FEW_PATIENTS:
        lines += [
            f"Only {n_patients} test patients: the patient bootstrap's intervals are rough (a "
            "percentile bootstrap over few patients is too narrow).",
            "",
        ]
    lines += [
        "## Runs",
        "",
    ]
    for r in report["runs"]:
        extra = ""
        if r["task"] == "seg":
            extra = f"; LV Hausdorff failures (an empty mask): {r['hd_failures']}"
        else:
            extra = f"; confusion matrix (rows true {'/'.join(VIEWS)}): {r['confusion_matrix']}"
        lines.append(
            f"- `{r['name']}` ({r['task']}, {r['kind']}): {r['train_images']} training images; "
            f"tested checkpoint: {r['validation'].get('chosen_by') or 'best on validation'} "
            f"(step {r['best_step']} of {r['steps']}{_trained_text(r)}){extra}."
        )
    if report["notes"]:
        lines += ["", "## Notes", "", *(f"- {n}" for n in report["notes"])]
    if report.get("quality"):
        lines += ["", *quality_markdown(report)]
    if report.get("plots"):
        lines += ["", "## Plots", "", *(f"![{Path(p).stem}]({p})" for p in report["plots"])]
    wall = f"Wall time of this call (training, testing, report): {report['wall_s']:.0f} s."
    lines += ["", wall, ""]
    return "\n".join(lines)


STOP_WORDS = {
    "patience": "its validation score stopped improving (patience)",
    "cap": "the epoch cap",
    "steps": "the step limit",
}


def _trained_text(run: dict[str, Any]) -> str:
    """``, 12.4 epochs, stopped by the epoch cap`` (empty for runs that do not record it)."""
    epochs, reason = run.get("epochs"), run.get("stop_reason")
    text = f", {epochs:.1f} epochs" if epochs is not None else ""
    return text + (f", stopped by {STOP_WORDS.get(reason, reason)}" if reason else "")


def print_summary(report: dict[str, Any]) -> None:
    """The report's table on the terminal, transposed (a column per training dataset) so that
    it fits a narrow terminal."""
    header, rows = _rows(report)
    table = Table("", *(row[0] for row in rows), title="downstream utility on real test images")
    for k, name in enumerate(header[1:], start=1):
        table.add_row(name, *(row[k] for row in rows))
    console.print(table)
    if report.get("quality"):
        print_quality_summary(report)


# --------------------------------------------------------------------------- quality (--fidelity)
def _q(value: float | None, percent: bool = False) -> str:
    """A quality number: percent with one decimal, else three significant digits."""
    if value is None or not np.isfinite(value):
        return "–"
    return f"{100 * value:.1f}" if percent else f"{value:.3g}"


def _quality_row_values(entry: dict[str, Any], spaces: list[str]) -> list[str]:
    """Label fidelity, accuracy, distances per space and diversity of one quality entry."""
    s = entry.get("summary") or {}
    cells = [
        _q(s.get("label_dice"), True),
        _q(s.get("label_hd95_lv")),
        _q(s.get("synthetic_accuracy"), True),
    ]
    for space in spaces:
        cells += [_q(s.get(f"{space}.fd")), _q(s.get(f"{space}.kid"))]
        cells.append(f"{_q(s.get(f'{space}.precision'))} / {_q(s.get(f'{space}.recall'))}")
    cells.append(_q(s.get("diversity")))
    return cells


def _judged(entry: dict[str, Any]) -> str:
    """How many images judged label fidelity and accuracy, and whose (the probe's)."""
    judged = entry.get("judged_on") or {}
    count = entry.get("images_judged", entry.get("images_scored"))
    return f"{count} (probe `{Path(judged['store']).name}`)" if judged.get("store") else str(count)


def quality_markdown(report: dict[str, Any]) -> list[str]:
    """The ``--fidelity`` section of ``report.md``: one row per synthetic store next to its
    downstream numbers, a per-view table, and the rank-correlation table with ≥ 3 stores."""
    quality = report["quality"]
    spaces = list(quality["feature_spaces"])
    short = {"segmenter": "seg", "classifier": "cls", "inception": "Inception",
             "radiomics": "radiomics"}  # fmt: skip
    real = quality["real"]
    runs = ", ".join(
        f"{task} `{Path(run).name}`" for task, run in quality["reference_runs"].items()
    )
    cap = quality["max_images"]
    lines = [
        "## Quality of the synthetic data (`--fidelity`)",
        "",
        f"Each synthetic store judged by the real-trained networks ({runs}), without training: "
        "*label Dice / HD95*: the real-trained segmenter's Dice (%) and LV HD95 (px) on the "
        "synthetic images against the label maps that conditioned them; *acc.*: the real-trained "
        "classifier's accuracy on the synthetic images; FD, KID and precision / recall on "
        + ", ".join(f"{short[s]} = the {SPACE_TITLES[s]}" for s in spaces)
        + " features, each standardised by the real images' mean and spread and clipped at "
        "±5 (FD on the "
        "radiomics features: a Fréchet radiomics distance), synthetic vs the real test images "
        "at the floor's sizes: as many synthetic images as half the real test patients hold, "
        "against the other half, averaged over the real row's draws; *diversity*: mean "
        f"{DIVERSITY_TITLES.get(quality['diversity_distance'], quality['diversity_distance'])} "
        "between samples of the same source label map. "
        + (f"At most {cap} images per store ({quality['selection']}). " if cap else "")
        + "*judged*: the images that label fidelity and accuracy are measured on, conditioned on "
        "maps of patients the judges never trained or were chosen on (a store's own, or its "
        "`--probe` store's); the distances use every scored image. "
        "The *real* row: the real-trained networks on the real test images, and the distances "
        "between two halves of the real test patients (the floor at this number of images).",
        "",
    ]
    header = ["training data", "model", "NFE", "downstream Dice (%)", "downstream acc. (%)",
              "label Dice (%)", "label HD95 LV (px)", "acc. on synthetic (%)"]  # fmt: skip
    for space in spaces:
        header += [f"FD {short[space]}", f"KID {short[space]}", f"P / R {short[space]}"]
    header += ["diversity", "images", "judged", "s"]
    targets = downstream_targets(report)
    refs = report.get("references") or {}
    ref_values: dict[str, float] = {}
    for run in report["runs"]:
        if run["name"] in refs.values():
            ref_values.update(targets.get(run["slug"], {}))
    rows = [[
        "real (test split)", "–", "–", _q(ref_values.get("dice_mean"), True),
        _q(ref_values.get("accuracy"), True), *_quality_row_values(real, spaces),
        str(real["images"]), str(real["images"]), f"{real['seconds']:.1f}",
    ]]  # fmt: skip
    for entry in quality["stores"]:
        mine = targets.get(entry["slug"], {})
        rows.append([
            entry["label"], entry["model"] or "–", str(entry["nfe"] or "–"),
            _q(mine.get("dice_mean"), True), _q(mine.get("accuracy"), True),
            *_quality_row_values(entry, spaces),
            f"{entry['images_scored']} of {entry['images_total']}", _judged(entry),
            f"{entry['seconds']['total']:.1f}",
        ])  # fmt: skip
    lines += _table(header, rows)
    lines += ["", "### Per view", ""]
    view_header = ["training data", "view", "label Dice (%)", "Dice LV / Myo / LA (%)",
                   "HD95 LV / Myo / LA (px)", "acc. (%)"]  # fmt: skip
    view_header += [f"FD {short[s]}" for s in spaces]
    view_rows = []
    for entry in [{"label": "real (test split)", **real,
                   "distances": (real.get("halves") or {}).get("distances", {})},
                  *quality["stores"]]:  # fmt: skip
        fidelity = entry.get("label_fidelity") or {}
        accuracy = entry.get("classifier_accuracy") or {}
        for view in ("all", *VIEWS):
            fid, a = fidelity.get(view), accuracy.get(view)
            if fid is None and a is None:
                continue
            row = [entry["label"], view]
            if fid:
                row += [
                    _q(fid["dice_mean"], True),
                    " / ".join(_q(v, True) for v in fid["dice"].values()),
                    " / ".join(_q(v) for v in fid["hd95_px"].values()),
                ]
            else:
                row += ["–", "–", "–"]
            row.append(_q(a["accuracy"], True) if a else "–")
            for space in spaces:
                d = (entry.get("distances") or {}).get(space, {}).get(view) or {}
                row.append(_q(d.get("fd")))
            view_rows.append(row)
    lines += _table(view_header, view_rows)
    diversity_notes = []
    for entry in quality["stores"]:
        div = entry.get("diversity") or {}
        if div.get("note"):
            diversity_notes.append(f"{entry['label']}: {div['note']}")
        elif div.get("images"):
            maps, same = div.get("label_maps"), div.get("same_map")
            text = (
                f"{entry['label']}: {_q(div['images']['mean'])} ± {_q(div['images']['std'])} "
                f"over {div['images']['pairs']} pairs of {div['images']['groups']} source maps"
            )
            if maps:
                text += f"; 1 − Dice of their conditioning maps {_q(maps['mean'])}"
            if same:
                text += f"; pairs of identical maps (noise alone): {_q(same['mean'])}"
            diversity_notes.append(text)
    if diversity_notes:
        lines += ["", "Diversity:", "", *(f"- {n}" for n in diversity_notes)]
    lines += ceiling_markdown(quality)
    lines += memorisation_markdown(quality)
    corr = quality.get("correlation")
    if corr:
        lines += ["", "### Which metric predicts utility", "",
                  f"{corr['what']}; each cell `ρ [lo, hi]`. A metric predicts well when |ρ| is "
                  "near 1 with the sign its direction expects (+ for higher-is-better metrics, − "
                  "for FD, KID and HD95) and its interval excludes 0.", ""]  # fmt: skip
        corr_rows = []
        for row in corr["rows"]:
            cells = [row["title"], "higher" if row["higher_is_better"] else "lower"]
            for target in corr["targets"]:
                est = row.get(target)
                if est is None:
                    cells.append("–")
                elif est["rho"] is None:
                    cells.append("– (a constant)")
                else:
                    cells.append(f"{est['rho']:+.2f} [{est['ci_low']:+.2f}, {est['ci_high']:+.2f}]")
            corr_rows.append(cells)
        lines += _table(["metric", "better", *corr["targets"].values()], corr_rows)
        lines += ["", f"Caveat: {corr['caveat']}." if corr.get("caveat") else ""]
    elif quality["stores"]:
        lines += ["", "The rank-correlation table needs at least 3 synthetic stores evaluated "
                  "together."]  # fmt: skip
    if quality.get("notes"):
        lines += ["", *(f"- {n}" for n in quality["notes"])]
    lines += ["", f"Quality scoring took {quality['seconds']:.1f} s in all.", ""]
    return lines


def ceiling_markdown(quality: dict[str, Any]) -> list[str]:
    """The decoder ceiling of each latent store's Γ-VAE (one line per Γ-VAE run), next to the
    real test images' own label fidelity and accuracy."""
    real = (quality.get("real") or {}).get("summary") or {}
    groups: dict[str, tuple[dict[str, Any], list[str]]] = {}  # a Γ-VAE copied into two runs: once
    for entry in quality["stores"]:
        ceiling = entry.get("decoder_ceiling")
        if ceiling:
            key = ceiling.get("checkpoint_sha256") or ceiling["vae_run"]
            groups.setdefault(key, (ceiling, []))[1].append(entry["label"])
    if not groups:
        return []
    lines = ["", "### Decoder ceiling of the latent models", "",
             "The real test images encoded and decoded by the store's Γ-VAE, judged by the same "
             "networks: what a perfect generator of that latent space would reach. A label Dice "
             "far below the real images' shows the Γ-VAE, not the diffusion model, limiting the "
             "synthetic data.", ""]  # fmt: skip
    for c, labels in groups.values():
        fid = (c.get("label_fidelity") or {}).get("all")
        acc = (c.get("classifier_accuracy") or {}).get("all")
        parts = [f"PSNR {c['psnr_db']:.1f} dB"]
        if fid:
            parts.append(f"label Dice {_q(fid['dice_mean'], True)} % (real images "
                         f"{_q(real.get('label_dice'), True)} %)")  # fmt: skip
        if acc:
            parts.append(f"acc. {_q(acc['accuracy'], True)} % (real images "
                         f"{_q(real.get('synthetic_accuracy'), True)} %)")  # fmt: skip
        run = Path(c["vae_run"])
        names = ", ".join(f"`{name}`" for name in labels)
        lines.append(f"- Γ-VAE `{run.parent.name}/{run.name}` ({names}): " + "; ".join(parts))
    return lines


def memorisation_markdown(quality: dict[str, Any]) -> list[str]:
    """Per store and space: the share of images flagged at the 1st and 5th percentile of new
    real patients, per view, and how often the nearest training image is the source patient's."""
    checked = [(e["label"], e["memorisation"]) for e in quality["stores"] if e.get("memorisation")]
    if not checked:
        return []
    first = checked[0][1]
    lines = ["", "### Memorisation", "",
             "Share of synthetic images closer to a training image of their generator (its "
             "diffusion and Γ-VAE training patients) than the 1st / 5th percentile of the real "
             f"test images of new patients ({first['reference']['images']} images of "
             f"{first['reference']['patients']} patients). Statistic: nearest distance / mean of "
             f"the {first['k']} nearest; new patients show about 1 % / 5 %, a copying generator "
             "far more. Own: the nearest training image is of the image's source patient.",
             ""]  # fmt: skip
    rows = []
    for label, memo in checked:
        for space, check in memo["spaces"].items():
            cells = [
                "–" if check["flagged"].get(p, {}).get(v) is None
                else _q(check["flagged"][p][v], True)
                for p in ("1.0", "5.0") for v in ("all", "A2C", "A4C")
            ]  # fmt: skip
            own = check.get("nearest_is_own_source_patient")
            rows.append([label, space, *cells, _q(own, True)])
    lines += _table(["store", "space", "P1 all", "P1 A2C", "P1 A4C", "P5 all", "P5 A2C",
                     "P5 A4C", "own %"], rows)  # fmt: skip
    grids = [f"`{Path(m['grid']).name}` ({label})" for label, m in checked if m.get("grid")]
    if grids:
        lines += ["", "Closest synthetic (top) / training (bottom) pairs: " + ", ".join(grids)
                  + " in plots/."]  # fmt: skip
    return lines


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def print_quality_summary(report: dict[str, Any]) -> None:
    """The main quality numbers on the terminal, a column per synthetic store."""
    stores = report["quality"]["stores"]
    if not stores:
        return
    table = Table("", *(s["label"] for s in stores), title="quality (--fidelity)")
    keys = [k for k in METRICS if any(k in s["summary"] for s in stores)]
    for key in keys:
        table.add_row(
            METRICS[key][0],
            *(_q(s["summary"].get(key), key in QUALITY_PERCENT) for s in stores),
        )
    table.add_row("seconds", *(f"{s['seconds']['total']:.1f}" for s in stores))
    console.print(table)
