"""The bench's figures: throughput against NFE (the paper's Fig. 4) and the utility-per-cost
frontier from ``echo-synth evaluate`` reports.

:func:`plot_throughput` draws images/s against NFE on log axes, one line per model and one panel
per measured configuration (the cost model's prediction at every NFE, filled markers where the
NFE was also timed end to end), with a right axis relative to SDM at 1000 NFE as in the paper.

:func:`frontier_points` pairs each synthetic run of the given ``report.json`` files (a model and
an NFE) with the bench's images/s for that model and NFE; :func:`pareto_front` and
:func:`cheapest_within` are the selection rules, :func:`plot_frontier` the figure: downstream
mean Dice and view accuracy against images/s, the frontier, and the cheapest setting whose Dice
is within 1 point of the best.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edmcli.bench.ratios import images_per_second, reference_images_per_s
from edmcli.errors import EchoSynthError

__all__ = [
    "cheapest_within",
    "frontier_points",
    "pareto_front",
    "plot_frontier",
    "plot_throughput",
    "read_reports",
]

REPORT_FORMAT = "echo-synth-evaluation"
DICE_TOLERANCE = 0.01  # one Dice point (Dice in [0, 1])


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=130, bbox_inches="tight")
    _pyplot().close(fig)
    tmp.replace(path)
    return path


def plot_throughput(scales: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """Fig. 4: images/s against NFE per model, one panel per scale (``{"title", "entries"}``);
    None when no scale has an entry."""
    scales = [s for s in scales if s["entries"]]
    if not scales:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(scales), figsize=(5.6 * len(scales), 4.2), squeeze=False)
    for ax, scale in zip(axes[0], scales, strict=True):
        for entry in scale["entries"]:
            rows = entry["throughput"]
            nfe = [r["nfe"] for r in rows]
            ips = [r["images_per_s"] for r in rows]
            (line,) = ax.plot(nfe, ips, marker=".", label=entry["label"])
            done = [(r["nfe"], r["measured_images_per_s"]) for r in rows
                    if r.get("measured_images_per_s")]  # fmt: skip
            if done:
                ax.plot(*zip(*done, strict=True), "o", color=line.get_color(), markersize=6)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("NFE (network evaluations per image)")
        ax.set_ylabel("images / s")
        ax.grid(True, which="both", alpha=0.3)
        ax.set_title(scale["title"], fontsize=9)
        ref = reference_images_per_s(scale["entries"])
        if ref:
            right = ax.secondary_yaxis(
                "right", functions=(lambda y, r=ref: y / r, lambda q, r=ref: q * r)
            )
            right.set_ylabel("relative to SDM at 1000 NFE")
        ax.legend(fontsize=7)
    fig.suptitle(
        "Generation throughput (lines: cost model from measured per-NFE and fixed costs; "
        "dots: timed end to end)",
        fontsize=9,
    )
    return _save(fig, path)


# --------------------------------------------------------------------------- frontier
def read_reports(paths: Sequence[Path]) -> list[dict[str, Any]]:
    """The ``report.json`` files of ``echo-synth evaluate`` output folders (or the files
    themselves); one clear error for a missing or foreign file."""
    reports = []
    for given in paths:
        path = Path(given)
        file = path / "report.json" if path.is_dir() else path
        if not file.is_file():
            raise EchoSynthError(
                f"--reports {given}: no report.json there (give an `echo-synth evaluate` --out "
                "folder or its report.json)"
            )
        try:
            report = json.loads(file.read_text())
        except (OSError, ValueError) as exc:
            raise EchoSynthError(f"--reports {file}: not readable JSON ({exc})") from None
        if not isinstance(report, dict) or report.get("format") != REPORT_FORMAT:
            raise EchoSynthError(f"--reports {file}: not an echo-synth evaluation report")
        reports.append({**report, "_path": str(file)})
    return reports


def _value(run: dict[str, Any], metric: str) -> float | None:
    estimate = run.get("metrics", {}).get(metric)
    return None if not estimate else estimate.get("value")


def frontier_points(
    reports: Sequence[dict[str, Any]], entries: Sequence[dict[str, Any]]
) -> tuple[list[dict[str, Any]], dict[str, float], list[str]]:
    """(points, real references, notes): one point per (model, sampler, NFE) of the reports'
    synthetic runs with its mean Dice and accuracy (values on all test images) and the images/s
    of the bench entry of that model at that NFE (its cost model: a distilled student costs its
    teacher's network per NFE); the real-trained values per metric. ``series`` names the
    point's curve: the model, with its solver when not the model's default, or ``student``."""
    by_model = {}
    for entry in entries:
        by_model.setdefault(entry["model"], entry)
    points: dict[tuple[str, str, int], dict[str, Any]] = {}
    real: dict[str, float] = {}
    notes: list[str] = []
    for report in reports:
        for run in report.get("runs", []):
            metric = "dice_mean" if run.get("task") == "seg" else "accuracy"
            value = _value(run, metric)
            if value is None:
                continue
            if run.get("kind") == "real":
                real.setdefault(metric, value)
                continue
            model, nfe = run.get("model"), run.get("nfe")
            if run.get("kind") != "synthetic" or model is None or nfe is None:
                continue
            entry = by_model.get(model)
            if entry is None:
                notes.append(f"{model} {nfe} NFE ({report['_path']}): not benchmarked, left out")
                continue
            cost = entry["cost_model"]
            ips = images_per_second(entry, int(nfe))
            stores = run.get("train_stores") or [{}]
            generator = (stores[0].get("provenance") or {}).get("run")
            series = _series(model, run.get("solver"), Path(generator).name if generator else None)
            point = points.setdefault(
                (series, model, int(nfe)),
                {"model": model, "series": series, "nfe": int(nfe), "images_per_s": ips,
                 "bench_config": f"{entry['preset']}, batch {cost['batch']}"},
            )  # fmt: skip
            point[metric] = value
    return sorted(points.values(), key=lambda p: p["images_per_s"]), real, sorted(set(notes))


def _series(model: str, solver: str | None, run: str | None = None) -> str:
    """The curve of a point: its diffusion run's folder name (``model`` when unknown), with the
    solver when it is not the model's default; a student without a run name is ``model
    student``."""
    from edmcli.models.registry import get_spec

    name = run or model
    if solver == "consistency":
        return name if run else f"{model} student"
    if solver is None or solver == get_spec(model).solver:
        return name
    return f"{name} {solver}"


def pareto_front(points: Sequence[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """The points no other point beats on both images/s and ``metric`` (higher is better for
    both), by increasing images/s."""
    have = [p for p in points if p.get(metric) is not None]
    front = [
        p
        for p in have
        if not any(
            q["images_per_s"] >= p["images_per_s"]
            and q[metric] >= p[metric]
            and (q["images_per_s"] > p["images_per_s"] or q[metric] > p[metric])
            for q in have
        )
    ]
    return sorted(front, key=lambda p: p["images_per_s"])


def cheapest_within(
    points: Sequence[dict[str, Any]], metric: str = "dice_mean", tol: float = DICE_TOLERANCE
) -> dict[str, Any] | None:
    """The fastest point (most images/s) whose ``metric`` is within ``tol`` of the best."""
    have = [p for p in points if p.get(metric) is not None]
    if not have:
        return None
    best = max(p[metric] for p in have)
    return max((p for p in have if p[metric] >= best - tol), key=lambda p: p["images_per_s"])


def plot_frontier(
    points: Sequence[dict[str, Any]], real: dict[str, float], path: Path
) -> Path | None:
    """Mean Dice and accuracy (%) against images/s per (model, NFE), the Pareto front, the real
    reference and the cheapest setting within one Dice point of the best; None without points."""
    panels = [m for m in ("dice_mean", "accuracy") if any(p.get(m) is not None for p in points)]
    if not panels:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.4 * len(panels), 4.0), squeeze=False)
    pick = cheapest_within(points)
    for ax, metric in zip(axes[0], panels, strict=True):
        have = [p for p in points if p.get(metric) is not None]
        for series in sorted({p.get("series", p["model"]) for p in have}):
            mine = [p for p in have if p.get("series", p["model"]) == series]
            mark = "s" if "student" in series else "o"
            ax.plot([p["images_per_s"] for p in mine], [100 * p[metric] for p in mine], mark,
                    label=series)  # fmt: skip
            for p in mine:
                ax.annotate(str(p["nfe"]), (p["images_per_s"], 100 * p[metric]), fontsize=6,
                            xytext=(3, 3), textcoords="offset points")  # fmt: skip
        front = pareto_front(have, metric)
        ax.plot([p["images_per_s"] for p in front], [100 * p[metric] for p in front], "k--",
                linewidth=0.8, label="frontier")  # fmt: skip
        if metric in real:
            ax.axhline(100 * real[metric], color="red", linestyle=":", label="real-trained")
        if pick is not None and pick.get(metric) is not None:
            label = (
                f"cheapest within 1 Dice pt: {pick.get('series', pick['model'])} {pick['nfe']} NFE"
            )
            ax.plot(pick["images_per_s"], 100 * pick[metric], "*", color="gold",
                    markeredgecolor="k", markersize=14, label=label)  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("images / s (bench cost model)")
        ax.set_ylabel("mean Dice (%)" if metric == "dice_mean" else "view accuracy (%)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Downstream utility against generation cost (labels: NFE)", fontsize=9)
    return _save(fig, path)
