"""The report of ``echo-synth evaluate``: ``report.json`` (every number, every setting, the
stores' provenance and the per-image metrics), ``report.md`` (one table: each training dataset,
synthetic or real, with its gap to the real-trained reference) and PNG plots (per-structure
Dice, accuracy, example predictions on real test images and, with several synthetic datasets,
Dice / HD / accuracy against NFE per model with the real-trained line, as the paper's Fig. 3).
With ``evaluate --fidelity`` a quality section follows (:mod:`edmcli.evaluation.fidelity`: label
fidelity, classifier accuracy on synthetic images, feature distances, diversity, and with ≥ 3
synthetic stores each metric's rank correlation with the downstream numbers), with its plots:
each metric against NFE per model, and against the downstream mean Dice.

Every number comes three ways (:mod:`edmcli.evaluation.bootstrap`): its value on the whole
test set; mean ± std over random 80 % subsets of the test images (the paper's protocol, kept to
compare with the paper; not a confidence interval); and a 95 % interval from a patient-level
bootstrap with replacement (the test patients resampled, each with all of its images). Gaps are
*run − reference* per test image, on the same subsets and the same resampled patients for every
run (paired): a negative Dice or accuracy gap means the synthetic data trains worse than the real
data, a positive HD gap likewise.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from edmcli.console import console
from edmcli.data.labels import VIEWS
from edmcli.data.store import jsonable
from edmcli.evaluation.bootstrap import (
    DEFAULT_CONFIDENCE,
    BootstrapEstimate,
    PatientBootstrapEstimate,
    bootstrap_mean,
    bootstrap_statistic,
    patient_bootstrap,
)
from edmcli.evaluation.metrics import STRUCTURE_SHORT, STRUCTURES, balanced_accuracy

SEG_METRICS = (
    *(f"dice_{name}" for name in STRUCTURES),
    "dice_mean", "hd_lv_px", "hd95_lv_px", "hd_lv_mm", "hd95_lv_mm",
)  # fmt: skip
CLS_METRICS = ("accuracy", "balanced_accuracy")
PERCENT = {"dice_mean", "accuracy", "balanced_accuracy", *(f"dice_{n}" for n in STRUCTURES)}
METRIC_TITLES = {
    **{f"dice_{n}": f"Dice {STRUCTURE_SHORT[n]}" for n in STRUCTURES},
    "dice_mean": "mean Dice",
    "hd_lv_px": "HD LV (px)",
    "hd95_lv_px": "HD95 LV (px)",
    "hd_lv_mm": "HD LV (mm)",
    "hd95_lv_mm": "HD95 LV (mm)",
    "accuracy": "accuracy",
    "balanced_accuracy": "balanced accuracy",
}
LABEL_COLOURS = {1: (0.95, 0.25, 0.2), 2: (0.2, 0.8, 0.3), 3: (0.25, 0.45, 0.95)}
FEW_PATIENTS = 20  # below this, say that the patient bootstrap's intervals are rough


def paper_protocol(fraction: float) -> str:
    """What ``paper_subsets`` holds, in words (stored next to the numbers)."""
    return (
        f"paper protocol: {fraction * 100:g} % subsets of the test images drawn without "
        "replacement; mean ± std over the subsets, not a confidence interval"
    )


def patient_protocol(confidence: float) -> str:
    """What ``patient_bootstrap`` holds, in words (stored next to the numbers)."""
    return (
        f"{confidence * 100:g} % percentile interval of a patient-level bootstrap: the test "
        "patients resampled with replacement, each with all of its images, the same resamples "
        "for every run (paired)"
    )


def estimate_entry(paper: BootstrapEstimate, patients: PatientBootstrapEstimate) -> dict:
    """One metric (or gap) of ``report.json``: ``value`` on all test images, ``paper_subsets``
    (mean/std) and ``patient_bootstrap`` (ci_low/ci_high), each labelled with its protocol."""
    return {
        "value": patients.value,
        "n": patients.n,
        "paper_subsets": {
            "protocol": paper_protocol(paper.fraction),
            "mean": paper.mean,
            "std": paper.std,
            "fraction": paper.fraction,
            "subset_size": paper.subset_size,
            "iterations": paper.iterations,
        },
        "patient_bootstrap": {
            "protocol": patient_protocol(patients.confidence),
            "ci_low": patients.ci_low,
            "ci_high": patients.ci_high,
            "confidence": patients.confidence,
            "standard_error": patients.standard_error,
            "method": patients.method,
            "patients": patients.patients,
            "iterations": patients.iterations,
        },
    }


def _test_patients(test_data: dict[str, Any], task: str, n: int) -> np.ndarray:
    """The patient id of each test image of ``task`` (the order of the per-image metrics)."""
    patients = getattr(test_data[task], "patients", None)
    if patients is None or len(patients) != n:
        got = "none" if patients is None else len(patients)
        raise ValueError(f"the {task} test data must carry a patient id per image ({n}), got {got}")
    return np.asarray(patients)


# --------------------------------------------------------------------------- numbers
def build_report(
    results: list[tuple[dict[str, Any], dict[str, Any]]],
    test_store: str,
    test_data: dict[str, Any],
    settings: dict[str, Any],
    notes: list[str],
    wall_s: float,
) -> dict[str, Any]:
    """Bootstrap every run's per-image metrics, pair each run with its task's real-trained
    reference and gather settings and provenance into one JSON-able dict."""
    from edmcli.data.store import DatasetStore

    paper = {
        "fraction": settings["bootstrap_fraction"],
        "iterations": settings["bootstrap_iterations"],
        "seed": settings["seed"],
    }
    resample = {
        "iterations": settings["bootstrap_iterations"],
        "seed": settings["seed"],
        "confidence": settings.get("bootstrap_confidence", DEFAULT_CONFIDENCE),
    }

    def of_mean(values: np.ndarray, groups: np.ndarray) -> dict[str, Any]:
        return estimate_entry(
            bootstrap_mean(values, **paper), patient_bootstrap(values, groups, **resample)
        )

    def of_balanced_accuracy(preds: list[np.ndarray], truth: np.ndarray, groups: np.ndarray):
        """Balanced accuracy of one prediction, or the gap ``preds[0] − preds[1]``."""

        def stat(columns: np.ndarray) -> float:
            scores = [balanced_accuracy(columns[:, k], columns[:, -1]) for k in range(len(preds))]
            return scores[0] - scores[1] if len(scores) == 2 else scores[0]

        columns = np.stack([*preds, truth], axis=1)
        return estimate_entry(
            bootstrap_statistic(lambda idx: stat(columns[idx]), len(truth), **paper),
            patient_bootstrap(columns, groups, statistic=stat, **resample),
        )

    runs: list[dict[str, Any]] = []
    per_image_of: dict[str, dict[str, np.ndarray]] = {}
    for plan, scored in results:
        spec, task = plan["spec"], plan["task"]
        per_image = {k: np.asarray(v) for k, v in scored["per_image"].items()}
        metrics: dict[str, Any] = {}
        if task == "seg":
            groups = _test_patients(test_data, task, len(per_image["dice_mean"]))
            for name in SEG_METRICS:
                if name in per_image:
                    metrics[name] = of_mean(per_image[name], groups)
        else:
            truth = np.asarray(test_data["cls"].views)
            groups = _test_patients(test_data, task, len(truth))
            pred = np.asarray(scored["predicted_view"])
            metrics["accuracy"] = of_mean(per_image["correct"], groups)
            metrics["balanced_accuracy"] = of_balanced_accuracy([pred], truth, groups)
        name = plan["run_dir"].name
        per_image_of[name] = per_image if task == "seg" else {**per_image, "predicted_view": pred}
        record = {
            "name": name,
            "task": task,
            "label": spec.label,
            "slug": spec.slug,
            "kind": spec.kind,
            "model": spec.model,
            "nfe": spec.nfe,
            "solver": spec.solver,
            "train_stores": [
                {
                    "path": store,
                    "provenance": prov,
                    "image_size": list(DatasetStore(store).image_size),
                    "train_patients": len(DatasetStore(store).patients("train")),
                }
                for store, prov in zip(spec.stores, spec.provenance, strict=True)
            ],
            "train_images": plan["n_train"],
            "validation": {
                "store": plan["settings"].val_store,
                "split": plan["settings"].val_split,
                "checkpoint": getattr(plan["settings"], "checkpoint", "best"),
                "chosen_by": plan.get("checkpoint_chosen_by"),
            },
            "run_dir": str(plan["run_dir"]),
            "settings": plan["settings"].as_dict(),
            "train_config": jsonable(vars(plan["config"])),
            "steps": plan.get("steps_done"),
            "epochs": plan.get("epochs_done"),
            "stop_reason": plan.get("stop_reason"),  # patience, cap or steps
            "resumed_from": plan.get("resumed_from"),
            "train_wall_s": plan.get("train_wall_s"),
            "test_wall_s": plan.get("test_wall_s"),
            "best_step": scored["best_step"],
            "best_validation": scored["best_validation"],
            "metrics": metrics,
            "per_image": {k: v.tolist() for k, v in per_image.items()},
        }
        if task == "seg":
            record["hd_failures"] = int(per_image["hd_failed"].sum())
            record["spacing_mm"] = bool(scored.get("spacing_mm"))
        else:
            record["confusion_matrix"] = scored["confusion_matrix"]
        runs.append(record)

    references: dict[str, str | None] = {}
    for task in settings["tasks"]:
        real = [r for r in runs if r["task"] == task and r["kind"] == "real"]
        references[task] = real[0]["name"] if real else None
    for record in runs:
        ref = references.get(record["task"])
        record["reference"] = ref
        record["gap_to_reference"] = None
        if ref is None or ref == record["name"]:
            continue
        mine, theirs = per_image_of[record["name"]], per_image_of[ref]
        gaps = {}
        if record["task"] == "seg":
            groups = _test_patients(test_data, "seg", len(mine["dice_mean"]))
            for key in (k for k in SEG_METRICS if k in mine and k in theirs):
                gaps[key] = of_mean(mine[key] - theirs[key], groups)
        else:
            truth = np.asarray(test_data["cls"].views)
            groups = _test_patients(test_data, "cls", len(truth))
            gaps["accuracy"] = of_mean(mine["correct"] - theirs["correct"], groups)
            gaps["balanced_accuracy"] = of_balanced_accuracy(
                [mine["predicted_view"], theirs["predicted_view"]], truth, groups
            )
        record["gap_to_reference"] = gaps

    test_reader = DatasetStore(test_store)
    test_info = {
        "path": test_store,
        "split": "test",
        "image_size": list(test_reader.image_size),
        "patients": test_reader.patients("test"),
        "images": {task: len(data) for task, data in test_data.items()},
        "provenance": test_reader.info.get("provenance", {}),
    }
    return {
        "format": "echo-synth-evaluation",
        "format_version": 2,
        "settings": settings,
        "uncertainty": {
            "paper_subsets": paper_protocol(paper["fraction"]),
            "patient_bootstrap": patient_protocol(resample["confidence"]),
        },
        "test": test_info,
        "references": references,
        "notes": notes,
        "wall_s": wall_s,
        "runs": runs,
    }


# --------------------------------------------------------------------------- text
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


def _paper_mean_std(estimate: dict[str, Any] | None) -> tuple[float, float]:
    """(mean, std) over the paper's subsets, NaN when the metric is missing (for the plots)."""
    if not estimate:
        return float("nan"), float("nan")
    return estimate["paper_subsets"]["mean"], estimate["paper_subsets"]["std"]


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
        f"Preset `{s['preset']}`, seed {s['seed']}, device {s['device']}.",
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
    from rich.table import Table

    header, rows = _rows(report)
    table = Table("", *(row[0] for row in rows), title="downstream utility on real test images")
    for k, name in enumerate(header[1:], start=1):
        table.add_row(name, *(row[k] for row in rows))
    console.print(table)
    if report.get("quality"):
        print_quality_summary(report)


# --------------------------------------------------------------------------- plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_dice(report: dict[str, Any], path: Path) -> Path:
    """Grouped bars: Dice per structure and mean Dice per run (± std over the paper's
    subsets)."""
    plt = _pyplot()
    runs = [r for r in report["runs"] if r["task"] == "seg"]
    metrics = [*(f"dice_{n}" for n in STRUCTURES), "dice_mean"]
    width = 0.8 / max(len(runs), 1)
    fig, ax = plt.subplots(figsize=(2 + 1.6 * len(metrics), 3.6))
    for k, r in enumerate(runs):
        est = [_paper_mean_std(r["metrics"].get(m)) for m in metrics]
        means = [100 * m for m, _ in est]
        stds = [100 * s for _, s in est]
        x = np.arange(len(metrics)) + (k - (len(runs) - 1) / 2) * width
        ax.bar(x, means, width, yerr=stds, capsize=2, label=_run_label(r))
    ax.set_xticks(np.arange(len(metrics)), [METRIC_TITLES[m] for m in metrics])
    ax.set_ylabel("Dice (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title("Segmentation on real test images (± std, paper subsets)", fontsize=10)
    return _save(fig, path)


def plot_accuracy(report: dict[str, Any], path: Path) -> Path:
    """Bars: view-classification accuracy per run (± std over the paper's subsets), chance
    at 50 %."""
    plt = _pyplot()
    runs = [r for r in report["runs"] if r["task"] == "cls"]
    fig, ax = plt.subplots(figsize=(max(5.0, 2 + 1.2 * len(runs)), 3.6))
    means = [100 * _paper_mean_std(r["metrics"]["accuracy"])[0] for r in runs]
    stds = [100 * _paper_mean_std(r["metrics"]["accuracy"])[1] for r in runs]
    colours = ["tab:red" if r["kind"] == "real" else "tab:blue" for r in runs]
    ax.bar(np.arange(len(runs)), means, 0.6, yerr=stds, capsize=3, color=colours)
    ax.axhline(50, color="grey", linestyle=":", label="chance")
    ax.set_xticks(np.arange(len(runs)), [_run_label(r) for r in runs], fontsize=7, rotation=15)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7)
    ax.set_title(
        "A2C/A4C view classification on real test images (± std, paper subsets)", fontsize=9
    )
    return _save(fig, path)


def _overlay(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    rgb = np.repeat(image[..., None], 3, axis=2)
    for value, colour in LABEL_COLOURS.items():
        mask = labels == value
        rgb[mask] = 0.55 * rgb[mask] + 0.45 * np.asarray(colour)
    return rgb.clip(0, 1)


def example_indices(n: int, k: int = 6) -> np.ndarray:
    """``k`` test images spread evenly over the test split (deterministic)."""
    return np.unique(np.linspace(0, n - 1, min(k, n)).round().astype(int))


def plot_seg_examples(test, predictions: list[tuple[str, np.ndarray]], path: Path) -> Path:
    """Rows: real test image, ground truth, then each run's prediction (LV red, myocardium
    green, LA blue)."""
    plt = _pyplot()
    idx = example_indices(len(test))
    rows = 2 + len(predictions)
    fig, axes = plt.subplots(rows, len(idx), figsize=(1.6 * len(idx), 1.7 * rows), squeeze=False)
    images = test.images[:, 0].numpy()
    truth = test.labels.numpy()
    truth = np.where(truth == 4, 0, truth)
    panels = [("image", None), ("ground truth", truth), *predictions]
    for r, (title, labels) in enumerate(panels):
        for c, i in enumerate(idx):
            ax = axes[r, c]
            shown = images[i] if labels is None else _overlay(images[i], labels[i])
            ax.imshow(shown, cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(title, fontsize=7)
    fig.suptitle("Segmentations of real test images", fontsize=9)
    return _save(fig, path)


def plot_cls_examples(test, predictions: list[tuple[str, np.ndarray, np.ndarray]], path: Path):
    """Rows: each run; a cell shows the test image with the predicted view and its probability
    (green when right, red when wrong)."""
    plt = _pyplot()
    idx = example_indices(len(test))
    rows = max(1, len(predictions))
    fig, axes = plt.subplots(rows, len(idx), figsize=(1.6 * len(idx), 1.9 * rows), squeeze=False)
    images = test.images[:, 0].numpy()
    for r, (title, views, prob) in enumerate(predictions):
        for c, i in enumerate(idx):
            ax = axes[r, c]
            ax.imshow(images[i], cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            p = prob[i] if views[i] == 1 else 1 - prob[i]
            right = views[i] == test.views[i]
            ax.set_title(
                f"{VIEWS[views[i]]} {p:.2f} (true {VIEWS[test.views[i]]})",
                fontsize=6,
                color="green" if right else "red",
            )
            if c == 0:
                ax.set_ylabel(title, fontsize=7)
    fig.suptitle("View predictions on real test images", fontsize=9)
    return _save(fig, path)


def nfe_series(report: dict[str, Any], task: str, metric: str) -> dict[str, list[tuple]]:
    """model → [(nfe, mean, std), ...] sorted by NFE, from the synthetic runs of a task (mean
    and std over the paper's subsets)."""
    series: dict[str, list[tuple]] = {}
    for r in report["runs"]:
        if r["task"] == task and r["kind"] == "synthetic" and r["nfe"] is not None:
            est = r["metrics"].get(metric)
            if est:
                series.setdefault(r["model"] or "synthetic", []).append(
                    (r["nfe"], *_paper_mean_std(est))
                )
    return {k: sorted(v) for k, v in series.items()}


def plot_vs_nfe(report: dict[str, Any], path: Path) -> Path | None:
    """The paper's Fig. 3: mean Dice, LV Hausdorff distance and accuracy against NFE, one line
    per generative model, the real-trained reference as a dashed line (± std band; means and
    stds over the paper's subsets). None when fewer than two synthetic runs carry an NFE."""
    panels = []
    runs = report["runs"]
    mm = any(r.get("spacing_mm") for r in runs if r["task"] == "seg")
    for task, metric in (("seg", "dice_mean"), ("seg", "hd_lv_mm" if mm else "hd_lv_px"),
                         ("cls", "accuracy")):  # fmt: skip
        series = nfe_series(report, task, metric)
        if sum(len(v) for v in series.values()) >= 2:
            panels.append((task, metric, series))
    if not panels:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (task, metric, series) in zip(axes[0], panels, strict=True):
        scale = 100.0 if metric in PERCENT else 1.0
        nfes = sorted({n for v in series.values() for n, _, _ in v})
        for model, points in series.items():
            n, m, s = (np.array(a, dtype=float) for a in zip(*points, strict=True))
            ax.errorbar(n, m * scale, yerr=s * scale, marker="o", capsize=2, label=model)
        ref = report["references"].get(task)
        ref_run = next((r for r in runs if r["name"] == ref), None)
        if ref_run is not None and metric in ref_run["metrics"]:
            mean, std = _paper_mean_std(ref_run["metrics"][metric])
            ax.axhline(mean * scale, color="red", linestyle="--", label="real")
            ax.axhspan((mean - std) * scale, (mean + std) * scale, color="red", alpha=0.1)
        if nfes and nfes[-1] / max(nfes[0], 1) >= 10:
            ax.set_xscale("log")
        ax.set_xlabel("NFE")
        ax.set_ylabel(METRIC_TITLES[metric] + (" (%)" if metric in PERCENT else ""))
        ax.legend(fontsize=7)
    fig.suptitle(
        "Downstream performance on real test images against NFE (± std, paper subsets)",
        fontsize=9,
    )
    return _save(fig, path)


def _run_label(record: dict[str, Any]) -> str:
    if record["kind"] == "synthetic" and record["model"]:
        nfe = f" {record['nfe']} NFE" if record["nfe"] is not None else ""
        return f"{record['model']}{nfe}"
    return f"{record['label']} ({record['kind']})"


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- quality (--fidelity)
QUALITY_PLOT_METRICS = (
    "label_dice", "synthetic_accuracy", "segmenter.fd", "classifier.fd", "inception.fd",
    "segmenter.kid", "segmenter.precision", "segmenter.recall", "diversity",
)  # fmt: skip
"""The quality metrics plotted against NFE and against the downstream mean Dice."""
_QUALITY_PERCENT = {"label_dice", "synthetic_accuracy"}


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


def quality_markdown(report: dict[str, Any]) -> list[str]:
    """The ``--fidelity`` section of ``report.md``: one row per synthetic store next to its
    downstream numbers, a per-view table, and the rank-correlation table with ≥ 3 stores."""
    from edmcli.evaluation.fidelity import SPACE_TITLES, downstream_targets
    from edmcli.evaluation.quality import DIVERSITY_TITLES

    quality = report["quality"]
    spaces = list(quality["feature_spaces"])
    short = {"segmenter": "seg", "classifier": "cls", "inception": "Inception"}
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
        + f" features, synthetic vs the {real['images']} real test images; *diversity*: mean "
        f"{DIVERSITY_TITLES.get(quality['diversity_distance'], quality['diversity_distance'])} "
        "between samples of the same source label map. "
        + (f"At most {cap} images per store ({quality['selection']}). " if cap else "")
        + "The *real* row: the real-trained networks on the real test images, and the distances "
        "between two halves of the real test patients (the floor at this number of images).",
        "",
    ]
    header = ["training data", "model", "NFE", "downstream Dice (%)", "downstream acc. (%)",
              "label Dice (%)", "label HD95 LV (px)", "acc. on synthetic (%)"]  # fmt: skip
    for space in spaces:
        header += [f"FD {short[space]}", f"KID {short[space]}", f"P / R {short[space]}"]
    header += ["diversity", "images", "s"]
    targets = downstream_targets(report)
    refs = report.get("references") or {}
    ref_values: dict[str, float] = {}
    for run in report["runs"]:
        if run["name"] in refs.values():
            ref_values.update(targets.get(run["slug"], {}))
    rows = [[
        "real (test split)", "–", "–", _q(ref_values.get("dice_mean"), True),
        _q(ref_values.get("accuracy"), True), *_quality_row_values(real, spaces),
        str(real["images"]), f"{real['seconds']:.1f}",
    ]]  # fmt: skip
    for entry in quality["stores"]:
        mine = targets.get(entry["slug"], {})
        rows.append([
            entry["label"], entry["model"] or "–", str(entry["nfe"] or "–"),
            _q(mine.get("dice_mean"), True), _q(mine.get("accuracy"), True),
            *_quality_row_values(entry, spaces),
            f"{entry['images_scored']} of {entry['images_total']}",
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
        from edmcli.evaluation.fidelity import METRICS

        best = [
            f"{corr['targets'][t]}: " + ", ".join(METRICS[k][0] for k in keys)
            for t, keys in corr["best"].items()
            if keys
        ]
        lines += [
            "",
            "Tracks best (largest ρ in the expected direction): " + "; ".join(best)
            if best
            else "No metric follows the downstream numbers in its expected direction here.",
        ]
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


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def print_quality_summary(report: dict[str, Any]) -> None:
    """The main quality numbers on the terminal, a column per synthetic store."""
    from rich.table import Table

    from edmcli.evaluation.fidelity import METRICS

    stores = report["quality"]["stores"]
    if not stores:
        return
    table = Table("", *(s["label"] for s in stores), title="quality (--fidelity)")
    keys = [k for k in METRICS if any(k in s["summary"] for s in stores)]
    for key in keys:
        table.add_row(
            METRICS[key][0],
            *(_q(s["summary"].get(key), key in _QUALITY_PERCENT) for s in stores),
        )
    table.add_row("seconds", *(f"{s['seconds']['total']:.1f}" for s in stores))
    console.print(table)


def _quality_keys(report: dict[str, Any], min_stores: int) -> list[str]:
    stores = report["quality"]["stores"]
    return [
        k for k in QUALITY_PLOT_METRICS
        if sum(np.isfinite(s["summary"].get(k, np.nan)) for s in stores) >= min_stores
    ]  # fmt: skip


def _metric_grid(n: int):
    """(pyplot, figure, axes) of a grid of ``n`` panels, three per row; the spare ones hidden."""
    plt = _pyplot()
    cols = min(3, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.0 * cols, 3.0 * rows), squeeze=False)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    return plt, fig, axes


def plot_quality_vs_nfe(report: dict[str, Any], path: Path) -> Path | None:
    """Each quality metric against NFE, a line per generative model; the real reference (the
    real-trained networks on real test images, or the split-half floor of a distance) dashed.
    None when fewer than two scored stores carry an NFE."""
    from edmcli.evaluation.fidelity import METRICS

    stores = [s for s in report["quality"]["stores"] if s["nfe"] is not None]
    if len(stores) < 2:
        return None
    keys = _quality_keys({"quality": {"stores": stores}}, 2)
    if not keys:
        return None
    plt, fig, axes = _metric_grid(len(keys))
    real = report["quality"]["real"].get("summary") or {}
    for ax, key in zip(axes.flat, keys, strict=False):
        scale = 100.0 if key in _QUALITY_PERCENT else 1.0
        models = sorted({s["model"] or "synthetic" for s in stores})
        nfes = sorted({s["nfe"] for s in stores})
        for model in models:
            points = sorted(
                (s["nfe"], s["summary"][key])
                for s in stores
                if (s["model"] or "synthetic") == model and key in s["summary"]
            )
            if points:
                n, v = zip(*points, strict=True)
                ax.plot(n, np.array(v) * scale, marker="o", label=model)
        if key in real and np.isfinite(real[key]):
            ax.axhline(real[key] * scale, color="red", linestyle="--", label="real")
        if nfes[-1] / max(nfes[0], 1) >= 10:
            ax.set_xscale("log")
        ax.set_xlabel("NFE")
        ax.set_title(METRICS[key][0] + (" (%)" if key in _QUALITY_PERCENT else ""), fontsize=8)
        ax.legend(fontsize=6)
    fig.suptitle("Quality of the synthetic data against NFE (real-trained networks)", fontsize=9)
    return _save(fig, path)


def plot_quality_vs_dice(report: dict[str, Any], path: Path) -> Path | None:
    """Each quality metric against the downstream mean Dice of the same store (one point per
    synthetic store, coloured by model), titled with Spearman's ρ and its interval. None
    without a correlation table (fewer than 3 stores)."""
    from edmcli.evaluation.fidelity import METRICS, downstream_targets

    quality = report["quality"]
    corr = quality.get("correlation")
    if not corr:
        return None
    targets = downstream_targets(report)
    rho = {r["metric"]: r.get("dice_mean") for r in corr["rows"]}
    keys = [k for k in _quality_keys(report, 3) if rho.get(k)]
    if not keys:
        return None
    plt, fig, axes = _metric_grid(len(keys))
    models = sorted({s["model"] or "synthetic" for s in quality["stores"]})
    colours = {m: f"C{k}" for k, m in enumerate(models)}
    for ax, key in zip(axes.flat, keys, strict=False):
        scale = 100.0 if key in _QUALITY_PERCENT else 1.0
        for s in quality["stores"]:
            dice = targets.get(s["slug"], {}).get("dice_mean")
            if dice is None or key not in s["summary"]:
                continue
            model = s["model"] or "synthetic"
            ax.scatter(s["summary"][key] * scale, 100 * dice, color=colours[model], s=18)
            if s["nfe"] is not None:
                ax.annotate(str(s["nfe"]), (s["summary"][key] * scale, 100 * dice), fontsize=6)
        est = rho[key]
        text = (
            f"ρ {est['rho']:+.2f} [{est['ci_low']:+.2f}, {est['ci_high']:+.2f}]"
            if est["rho"] is not None
            else "ρ undefined (a constant)"
        )
        ax.set_title(f"{METRICS[key][0]}\n{text}", fontsize=8)
        ax.set_ylabel("downstream mean Dice (%)", fontsize=7)
    handles = [plt.Line2D([], [], marker="o", linestyle="", color=c, label=m)
               for m, c in colours.items()]  # fmt: skip
    fig.legend(handles=handles, fontsize=7, loc="lower right")
    fig.suptitle("Quality metric vs downstream mean Dice (labels: NFE)", fontsize=9)
    return _save(fig, path)


# --------------------------------------------------------------------------- files
def write_report(
    report: dict[str, Any],
    out: Path,
    test_data: dict[str, Any] | None = None,
    results: list[tuple[dict[str, Any], dict[str, Any]]] | None = None,
) -> list[Path]:
    """Plots, then ``report.json`` and ``report.md`` (each written to a temporary file and
    renamed). Returns the paths written."""
    out = Path(out)
    plots_dir = out / "plots"
    written: list[Path] = []
    tasks = report["settings"]["tasks"]
    if "seg" in tasks:
        written.append(plot_dice(report, plots_dir / "dice.png"))
    if "cls" in tasks:
        written.append(plot_accuracy(report, plots_dir / "accuracy.png"))
    if test_data is not None and results is not None:
        seg = [
            (_run_label(r), s["predictions"]["labels"])
            for r, (plan, s) in zip(report["runs"], results, strict=True)
            if plan["task"] == "seg"
        ]
        if seg:
            written.append(plot_seg_examples(test_data["seg"], seg, plots_dir / "examples_seg.png"))
        cls = [
            (_run_label(r), s["predicted_view"], s["prob_a4c"])
            for r, (plan, s) in zip(report["runs"], results, strict=True)
            if plan["task"] == "cls"
        ]
        if cls:
            written.append(plot_cls_examples(test_data["cls"], cls, plots_dir / "examples_cls.png"))
    nfe = plot_vs_nfe(report, plots_dir / "vs_nfe.png")
    if nfe is not None:
        written.append(nfe)
    if report.get("quality"):  # --fidelity
        for name, plot in (("quality_vs_nfe", plot_quality_vs_nfe),
                           ("quality_vs_dice", plot_quality_vs_dice)):  # fmt: skip
            made = plot(report, plots_dir / f"{name}.png")
            if made is not None:
                written.append(made)
    report["plots"] = [str(p.relative_to(out)) for p in written]
    _write_text(out / "report.json", json.dumps(jsonable(report), indent=2))
    _write_text(out / "report.md", markdown(report))
    return [*written, out / "report.json", out / "report.md"]


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
