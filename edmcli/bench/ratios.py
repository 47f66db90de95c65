"""The ratios of the paper's cost study (section IV.C), each next to its ceiling, from the
entries of one scale: model against model per NFE and at :data:`RATIO_NFE` NFE, every model
against the paper's reference (SDM at 1000 NFE, :func:`~edmcli.models.registry.paper_reference`),
and the paths of one model (γ/β cached vs recomputed, compiled vs eager, Triton vs torch SPADE,
bf16 vs fp32)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from edmcli.models.registry import paper_reference

__all__ = [
    "RATIO_NFE",
    "images_per_second",
    "per_image_flops",
    "ratio_rows",
    "reference_images_per_s",
]

RATIO_NFE = 100  # the NFE of the paper's throughput ratios


def per_image_flops(entry: dict[str, Any], nfe: int) -> float:
    """FLOPs of one image at ``nfe``: γ/β cache + decode + NFE × the cached network."""
    f = entry["flops_per_image"]
    return f["spade_cache"] + f["decode"] + nfe * f["cached"]


def images_per_second(entry: dict[str, Any], nfe: int) -> float:
    """Images/s of a measured ``entry`` at ``nfe``, from its cost model (batch / (fixed +
    NFE × per-NFE seconds))."""
    c = entry["cost_model"]
    return c["batch"] / (c["fixed_s"] + nfe * c["per_nfe_s"])


def _median(entry: dict[str, Any], key: str) -> float | None:
    timing = entry["timings"].get(key)
    return None if timing is None else timing["median_s"]


def ratio_rows(entries: Sequence[dict[str, Any]], peaks: dict[str, float | None]) -> list[dict]:
    """Every ratio of the paper's cost study that ``entries`` (one scale) allow, each with its
    ceiling: the same ratio of counted FLOPs, or for a change that keeps the FLOPs (compiled vs
    eager, Triton vs torch SPADE) 1, or for bf16 vs fp32 the ratio of the device's peaks."""
    by_model: dict[str, dict[str, Any]] = {}
    for entry in entries:
        by_model.setdefault(entry["model"], entry)
    rows: list[dict[str, Any]] = []

    def row(name, at, value, ceiling, kind, source):
        rows.append({"name": name, "at": at, "value": value, "ceiling": ceiling,
                     "ceiling_kind": kind, "source": source})  # fmt: skip

    for fast, slow in (("edm-l64", "edm"), ("edm-l64", "edm-l128")):
        a, b = by_model.get(fast), by_model.get(slow)
        if a is None or b is None:
            continue
        path = "compiled" if a["cost_model"]["per_nfe_path"].endswith("compiled") else "eager"
        row(f"{fast} / {slow} per NFE (γ/β cached, {path})", "1 NFE",
            b["cost_model"]["per_nfe_s"] * a["batch"] / (a["cost_model"]["per_nfe_s"] * b["batch"]),
            b["flops_per_image"]["cached"] / a["flops_per_image"]["cached"], "FLOP ratio",
            "measured")  # fmt: skip
        row(f"{fast} / {slow} images/s", f"{RATIO_NFE} NFE",
            images_per_second(a, RATIO_NFE) / images_per_second(b, RATIO_NFE),
            per_image_flops(b, RATIO_NFE) / per_image_flops(a, RATIO_NFE), "FLOP ratio",
            "cost model (measured per-NFE and fixed costs)")  # fmt: skip
    reference = paper_reference()
    ref, ref_nfe = by_model.get(reference.name), reference.paper_reference_nfe
    if ref is not None:
        for entry in entries:
            if entry["model"] == reference.name:
                continue
            row(f"{entry['label']} at {RATIO_NFE} NFE / {reference.name} at {ref_nfe} NFE "
                "(images/s)", f"{RATIO_NFE} vs {ref_nfe} NFE",
                images_per_second(entry, RATIO_NFE) / images_per_second(ref, ref_nfe),
                per_image_flops(ref, ref_nfe) / per_image_flops(entry, RATIO_NFE), "FLOP ratio",
                f"cost model; {reference.name} at {ref_nfe} NFE predicted from its per-NFE "
                "cost")  # fmt: skip
    for entry in entries:
        f, label = entry["flops_per_image"], entry["label"]
        cached, uncached = _median(entry, "nfe_cached_eager"), _median(entry, "nfe_uncached_eager")
        if cached and uncached:
            row(f"{label}: γ/β cached vs recomputed", "1 NFE, eager", uncached / cached,
                f["uncached"] / f["cached"], "FLOP ratio", "measured")  # fmt: skip
        compiled = _median(entry, "nfe_cached_compiled")
        if cached and compiled:
            row(f"{label}: compiled vs eager", "1 NFE, γ/β cached", cached / compiled, 1.0,
                "same FLOPs", "measured")  # fmt: skip
        torch_spade = _median(entry, "nfe_cached_torch_spade")
        if cached and torch_spade:
            row(f"{label}: Triton vs torch SPADE", "1 NFE, γ/β cached, eager",
                torch_spade / cached, 1.0, "same FLOPs", "measured")  # fmt: skip
        other = _median(entry, "nfe_cached_other_precision")
        if cached and other:
            bf16, fp32 = (cached, other) if entry["precision"] == "bf16" else (other, cached)
            ceiling = peaks["bf16"] / peaks["fp32"] if peaks["bf16"] and peaks["fp32"] else None
            row(f"{label}: bf16 vs fp32", "1 NFE, γ/β cached, eager", fp32 / bf16, ceiling,
                "peak ratio", "measured")  # fmt: skip
    return rows


def reference_images_per_s(entries: Sequence[dict[str, Any]]) -> float | None:
    """Images/s of the paper's reference model at its reference NFE among ``entries`` (sdm at
    1000 NFE: its cost model's prediction)."""
    reference = paper_reference()
    for entry in entries:
        if entry["model"] == reference.name:
            for row in entry["throughput"]:
                if row["nfe"] == reference.paper_reference_nfe:
                    return row["images_per_s"]
    return None
