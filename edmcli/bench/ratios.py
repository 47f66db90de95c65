"""The ratios of the paper's cost study (section IV.C), each next to its ceiling, from the
entries of one scale: model against model per NFE and at :data:`RATIO_NFE` NFE, every model
against the paper's reference (SDM at 1000 NFE, :func:`~edmcli.models.registry.paper_reference`),
and the paths of one model (γ/β cached vs recomputed, compiled vs eager, Triton vs torch SPADE,
bf16 vs fp32). The model-against-model ratios come at the batch that fits each model (batch
efficiency included) and at one matched batch (model cost alone); the reference's 1000-NFE
prediction is checked by its end-to-end measurement at a reduced NFE."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from edmcli.bench.costmodel import CostModel
from edmcli.models.registry import paper_reference

__all__ = [
    "FITTING",
    "RATIO_NFE",
    "at_matched_batch",
    "images_per_second",
    "matched_label",
    "per_image_flops",
    "ratio_rows",
    "reference_images_per_s",
]

RATIO_NFE = 100  # the NFE of the paper's throughput ratios
FITTING = "at the batch that fits"  # the ``batch`` of the rows from each model's own batch


def matched_label(batch: int) -> str:
    """The ``batch`` of the rows from every model's cost model at one matched ``batch``."""
    return f"at matched batch {batch}"


def per_image_flops(entry: dict[str, Any], nfe: int) -> float:
    """FLOPs of one image at ``nfe``: γ/β cache + decode + NFE × the cached network."""
    f = entry["flops_per_image"]
    return f["spade_cache"] + f["decode"] + nfe * f["cached"]


def images_per_second(entry: dict[str, Any], nfe: int) -> float:
    """Images/s of a measured ``entry`` at ``nfe``, from its cost model (batch / (fixed +
    NFE × per-NFE seconds + the per-step noise of a stochastic sampler))."""
    return CostModel.from_dict(entry["cost_model"]).images_per_s(nfe)


def at_matched_batch(entry: dict[str, Any]) -> dict[str, Any] | None:
    """``entry`` with its batch and cost model at the scale's matched batch (its ``matched``
    record), or None when it was not measured there."""
    matched = entry.get("matched") or {}
    if matched.get("cost_model") is None:
        return None
    return {**entry, "batch": matched["batch"], "cost_model": matched["cost_model"]}


def _median(entry: dict[str, Any], key: str) -> float | None:
    timing = entry["timings"].get(key)
    return None if timing is None else timing["median_s"]


def ratio_rows(
    entries: Sequence[dict[str, Any]],
    peaks: dict[str, float | None],
    matched_batch: int | None = None,
) -> list[dict]:
    """Every ratio of the paper's cost study that ``entries`` (one scale) allow, each with its
    ceiling: the same ratio of counted FLOPs, or for a change that keeps the FLOPs (compiled vs
    eager, Triton vs torch SPADE) 1, or for bf16 vs fp32 the ratio of the device's peaks.

    The ratios between models come twice: from each model's cost model at the batch that fits
    it (``batch`` :data:`FITTING`: batch efficiency counts in, as it does when each model fills
    the device), and, with ``matched_batch``, from the cost models that every entry's
    ``matched`` record holds at that one batch (``batch`` :func:`matched_label`, the name ends
    in "at matched batch B": model cost alone). Each row's ``batches`` names the batch of each
    model in it. The reference model's end-to-end check at a reduced NFE (its
    ``reference_check``) is a row of measured / predicted seconds."""
    rows: list[dict[str, Any]] = []

    def row(name, at, value, ceiling, kind, source, batch=FITTING, batches=None):
        rows.append({"name": name, "at": at, "value": value, "ceiling": ceiling,
                     "ceiling_kind": kind, "source": source, "batch": batch,
                     "batches": batches or {}})  # fmt: skip

    _between_models(entries, row, FITTING, "")
    if matched_batch is not None:
        matched = [e for e in map(at_matched_batch, entries) if e is not None]
        label = matched_label(matched_batch)
        _between_models(matched, row, label, f" {label}")
    reference = paper_reference()
    for entry in entries:
        check = entry.get("reference_check") or {}
        if check.get("measured_s"):
            row(f"{entry['label']} end to end: measured / predicted seconds (checks its "
                f"{check['reference_nfe']}-NFE prediction)", f"{check['nfe']} NFE",
                check["measured_s"] / check["predicted_s"], None,
                f"1 = the cost model is exact; {reference.name} is never run for "
                f"{check['reference_nfe']} NFE", "measured", FITTING,
                {entry["label"]: entry["batch"]})  # fmt: skip
    for entry in entries:
        f, label, own = entry["flops_per_image"], entry["label"], {entry["label"]: entry["batch"]}
        cached, uncached = _median(entry, "nfe_cached_eager"), _median(entry, "nfe_uncached_eager")
        if cached and uncached:
            row(f"{label}: γ/β cached vs recomputed", "1 NFE, eager", uncached / cached,
                f["uncached"] / f["cached"], "FLOP ratio", "measured", FITTING, own)  # fmt: skip
        compiled = _median(entry, "nfe_cached_compiled")
        if cached and compiled:
            row(f"{label}: compiled vs eager", "1 NFE, γ/β cached", cached / compiled, 1.0,
                "same FLOPs", "measured", FITTING, own)  # fmt: skip
        torch_spade = _median(entry, "nfe_cached_torch_spade")
        if cached and torch_spade:
            row(f"{label}: Triton vs torch SPADE", "1 NFE, γ/β cached, eager",
                torch_spade / cached, 1.0, "same FLOPs", "measured", FITTING, own)  # fmt: skip
        other = _median(entry, "nfe_cached_other_precision")
        if cached and other:
            bf16, fp32 = (cached, other) if entry["precision"] == "bf16" else (other, cached)
            ceiling = peaks["bf16"] / peaks["fp32"] if peaks["bf16"] and peaks["fp32"] else None
            row(f"{label}: bf16 vs fp32", "1 NFE, γ/β cached, eager", fp32 / bf16, ceiling,
                "peak ratio", "measured", FITTING, own)  # fmt: skip
    return rows


def _between_models(entries: Sequence[dict[str, Any]], row, batch: str, suffix: str) -> None:
    """The model-against-model rows of ``entries`` (each with its ``batch`` and ``cost_model``)
    through ``row``; ``suffix`` ends every name. Every entry of the faster model counts (a
    recipe's variant, ``bench --generator``, next to the paper's), named by its label."""
    by_model: dict[str, dict[str, Any]] = {}
    for entry in entries:
        by_model.setdefault(entry["model"], entry)
    pairs = (("edm-l64", "edm"), ("edm-l64", "edm-l128"))
    for a, slow in ((e, s) for f, s in pairs for e in entries if e["model"] == f):
        b = by_model.get(slow)
        if b is None:
            continue
        fast = a["label"]
        batches = {a["label"]: a["batch"], b["label"]: b["batch"]}
        path = "compiled" if a["cost_model"]["per_nfe_path"].endswith("compiled") else "eager"
        row(f"{fast} / {slow} per NFE (γ/β cached, {path}){suffix}", "1 NFE",
            b["cost_model"]["per_nfe_s"] * a["batch"] / (a["cost_model"]["per_nfe_s"] * b["batch"]),
            b["flops_per_image"]["cached"] / a["flops_per_image"]["cached"], "FLOP ratio",
            "measured", batch, batches)  # fmt: skip
        row(f"{fast} / {slow} images/s{suffix}", f"{RATIO_NFE} NFE",
            images_per_second(a, RATIO_NFE) / images_per_second(b, RATIO_NFE),
            per_image_flops(b, RATIO_NFE) / per_image_flops(a, RATIO_NFE), "FLOP ratio",
            "cost model (measured per-NFE and fixed costs)", batch, batches)  # fmt: skip
    reference = paper_reference()
    ref, ref_nfe = by_model.get(reference.name), reference.paper_reference_nfe
    if ref is None:
        return
    for entry in entries:
        if entry["model"] == reference.name:
            continue
        batches = {entry["label"]: entry["batch"], ref["label"]: ref["batch"]}
        row(f"{entry['label']} at {RATIO_NFE} NFE / {reference.name} at {ref_nfe} NFE "
            f"(images/s){suffix}", f"{RATIO_NFE} vs {ref_nfe} NFE",
            images_per_second(entry, RATIO_NFE) / images_per_second(ref, ref_nfe),
            per_image_flops(ref, ref_nfe) / per_image_flops(entry, RATIO_NFE), "FLOP ratio",
            f"cost model; {reference.name} at {ref_nfe} NFE predicted from its per-NFE "
            "cost", batch, batches)  # fmt: skip


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
