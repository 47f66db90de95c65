"""Which quality metric predicts utility: Spearman's ρ, over ≥ 3 scored synthetic stores, of
each metric of the ``--fidelity`` quality section (:data:`edmcli.evaluation.fidelity.METRICS`)
with the downstream mean Dice and accuracy of the same stores, with a bootstrap interval over
the stores (:func:`correlation_table`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from edmcli.evaluation.fidelity import METRICS
from edmcli.evaluation.metrics.rank_correlation import spearman_with_interval

TARGETS = {"dice_mean": ("seg", "downstream mean Dice"), "accuracy": ("cls", "downstream accuracy")}


def downstream_targets(report: dict[str, Any]) -> dict[str, dict[str, float]]:
    """slug → {"dice_mean": value, "accuracy": value} of the report's runs (whole test set)."""
    out: dict[str, dict[str, float]] = {}
    for run in report["runs"]:
        for target, (task, _) in TARGETS.items():
            est = run["metrics"].get(target)
            if run["task"] == task and est:
                out.setdefault(run["slug"], {})[target] = float(est["value"])
    return out


def correlation_table(
    quality: dict[str, Any],
    report: dict[str, Any],
    iterations: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    min_stores: int = 3,
) -> dict[str, Any] | None:
    """Spearman's ρ of each quality metric with the downstream mean Dice and accuracy over
    the scored synthetic stores (bootstrap interval over the stores); None with fewer than
    ``min_stores`` stores. No metric is named "best": an argmax over many metrics on a handful
    of stores is a multiple comparison (``caveat`` says so in the report)."""
    targets = downstream_targets(report)
    stores = [s for s in quality["stores"] if s["slug"] in targets]
    if len(stores) < min_stores:
        return None
    rows = []
    for key, (title, higher) in METRICS.items():
        row: dict[str, Any] = {"metric": key, "title": title, "higher_is_better": higher}
        for target in TARGETS:
            pairs = [(s["summary"][key], targets[s["slug"]][target]) for s in stores
                     if key in s["summary"] and target in targets[s["slug"]]]  # fmt: skip
            pairs = [(x, y) for x, y in pairs if np.isfinite(x) and np.isfinite(y)]
            if len(pairs) < min_stores:
                row[target] = None
                continue
            x, y = (np.array(v) for v in zip(*pairs, strict=True))
            est = spearman_with_interval(x, y, iterations, confidence, seed).as_dict()
            # undefined ρ (a constant metric or target) as null: report.json stays strict JSON
            row[target] = {k: None if isinstance(v, float) and not np.isfinite(v) else v
                           for k, v in est.items()}  # fmt: skip
        if any(row[t] is not None for t in TARGETS):
            rows.append(row)
    return {
        "what": f"Spearman's ρ over {len(stores)} synthetic stores with a {confidence * 100:g} % "
        f"bootstrap interval (stores resampled with replacement, {iterations} times)",
        "stores": [s["slug"] for s in stores],
        "targets": {t: title for t, (_, title) in TARGETS.items()},
        "rows": rows,
        "caveat": f"{len(rows)} metrics × {len(TARGETS)} targets ranked over {len(stores)} stores: "
        "with so few stores the intervals are wide and the largest ρ of many is expected to be "
        "large by chance; read a metric as predictive only where its interval excludes 0",
    }
