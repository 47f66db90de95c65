"""The report of ``echo-synth evaluate``: ``report.json`` (every number, every setting, the
stores' provenance and the per-image metrics: :mod:`~edmcli.evaluation.report.data`),
``report.md`` (:mod:`~edmcli.evaluation.report.markdown`) and PNG plots
(:mod:`~edmcli.evaluation.report.plots`), written by :func:`write_report`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from edmcli.data.store_format import jsonable
from edmcli.evaluation.report import markdown, plots


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
        written.append(plots.plot_dice(report, plots_dir / "dice.png"))
    if "cls" in tasks:
        written.append(plots.plot_accuracy(report, plots_dir / "accuracy.png"))
    if test_data is not None and results is not None:
        seg = [
            (plots.run_label(r), s["predictions"]["labels"])
            for r, (plan, s) in zip(report["runs"], results, strict=True)
            if plan["task"] == "seg"
        ]
        if seg:
            written.append(
                plots.plot_seg_examples(test_data["seg"], seg, plots_dir / "examples_seg.png")
            )
        cls = [
            (plots.run_label(r), s["predicted_view"], s["prob_a4c"])
            for r, (plan, s) in zip(report["runs"], results, strict=True)
            if plan["task"] == "cls"
        ]
        if cls:
            written.append(
                plots.plot_cls_examples(test_data["cls"], cls, plots_dir / "examples_cls.png")
            )
    nfe = plots.plot_vs_nfe(report, plots_dir / "vs_nfe.png")
    if nfe is not None:
        written.append(nfe)
    if report.get("quality"):  # --fidelity
        for name, plot in (("quality_vs_nfe", plots.plot_quality_vs_nfe),
                           ("quality_vs_dice", plots.plot_quality_vs_dice)):  # fmt: skip
            made = plot(report, plots_dir / f"{name}.png")
            if made is not None:
                written.append(made)
    report["plots"] = [str(p.relative_to(out)) for p in written]
    _write_text(out / "report.json", json.dumps(jsonable(report), indent=2))
    _write_text(out / "report.md", markdown.markdown(report))
    return [*written, out / "report.json", out / "report.md"]


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
