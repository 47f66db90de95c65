"""The report's PNG plots: per-structure Dice, accuracy, example predictions on real test images
and, with several synthetic datasets, Dice / HD / accuracy against NFE per model with the
real-trained line (the paper's Fig. 3); with ``evaluate --fidelity`` each quality metric
against NFE per model, and against the downstream mean Dice.

matplotlib is imported when a plot is drawn (:func:`_pyplot`), with the non-interactive Agg
backend chosen before pyplot loads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edmcli.data.labels import VIEWS
from edmcli.evaluation.correlation import downstream_targets
from edmcli.evaluation.fidelity import METRICS
from edmcli.evaluation.metrics.segmentation import STRUCTURES
from edmcli.evaluation.report.data import METRIC_TITLES, PERCENT, QUALITY_PERCENT

LABEL_COLOURS = {1: (0.95, 0.25, 0.2), 2: (0.2, 0.8, 0.3), 3: (0.25, 0.45, 0.95)}


def _paper_mean_std(estimate: dict[str, Any] | None) -> tuple[float, float]:
    """(mean, std) over the paper's subsets, NaN when the metric is missing (for the plots)."""
    if not estimate:
        return float("nan"), float("nan")
    return estimate["paper_subsets"]["mean"], estimate["paper_subsets"]["std"]


def _pyplot():
    """pyplot with the Agg backend (imported here: pyplot picks its backend when it loads, and
    matplotlib is only needed once a plot is drawn)."""
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
        ax.bar(x, means, width, yerr=stds, capsize=2, label=run_label(r))
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
    ax.set_xticks(np.arange(len(runs)), [run_label(r) for r in runs], fontsize=7, rotation=15)
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


def run_label(record: dict[str, Any]) -> str:
    """A run's name in legends: ``model NFE`` for a synthetic run, else ``label (kind)``."""
    if record["kind"] == "synthetic" and record["model"]:
        nfe = f" {record['nfe']} NFE" if record["nfe"] is not None else ""
        return f"{record['model']}{nfe}"
    return f"{record['label']} ({record['kind']})"


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt  # loaded by _pyplot already, with its backend

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
    stores = [s for s in report["quality"]["stores"] if s["nfe"] is not None]
    if len(stores) < 2:
        return None
    keys = _quality_keys({"quality": {"stores": stores}}, 2)
    if not keys:
        return None
    plt, fig, axes = _metric_grid(len(keys))
    real = report["quality"]["real"].get("summary") or {}
    for ax, key in zip(axes.flat, keys, strict=False):
        scale = 100.0 if key in QUALITY_PERCENT else 1.0
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
        ax.set_title(METRICS[key][0] + (" (%)" if key in QUALITY_PERCENT else ""), fontsize=8)
        ax.legend(fontsize=6)
    fig.suptitle("Quality of the synthetic data against NFE (real-trained networks)", fontsize=9)
    return _save(fig, path)


def plot_quality_vs_dice(report: dict[str, Any], path: Path) -> Path | None:
    """Each quality metric against the downstream mean Dice of the same store (one point per
    synthetic store, coloured by model), titled with Spearman's ρ and its interval. None
    without a correlation table (fewer than 3 stores)."""
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
        scale = 100.0 if key in QUALITY_PERCENT else 1.0
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
