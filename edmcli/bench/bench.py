"""``echo-synth bench``: the paper's computational-cost study (section IV.C, Fig. 4) as a stage.

:func:`bench` measures, for each model, one or more *scales* (configurations,
:mod:`edmcli.bench.scales`) and writes ``bench.json`` and ``throughput.png`` (plus
``frontier.png`` with ``reports``) under ``out``:

- per scale and model: FLOPs per NFE and per image (:mod:`edmcli.bench.flops`), one NFE timed
  with SPADE γ/β cached and recomputed, eager and compiled, on CUDA also with the torch SPADE
  path (vs the fused Triton kernel) and in the other precision (bf16 vs fp32); the fixed costs
  per batch (γ/β cache, Γ-VAE decode, store write); the cost model and images/s at every NFE,
  checked end to end at a few NFEs (:mod:`edmcli.bench.throughput`);
- the ratios, each next to its FLOP ceiling (the same ratio of counted FLOPs): EDM-L64 / EDM and
  EDM-L64 / EDM-L128 per NFE and at :data:`~edmcli.bench.ratios.RATIO_NFE` NFE, every model at
  that NFE against SDM at 1000 NFE, cached vs recomputed γ/β, compiled vs eager, Triton vs torch
  SPADE and bf16 vs fp32 (:mod:`edmcli.bench.ratios`). The ratios between models come twice:
  at the batch that fits each model (on CUDA auto-sized: a latent model up to 256, a pixel model
  far fewer, so batch efficiency counts in) and at one matched batch (``matched_batch``, default
  the smallest of the models' batches; each entry's ``matched`` record holds its cost model
  there), which compares model cost alone;
- SDM's 1000-NFE prediction checked: SDM run end to end through the real sampling path at a
  reduced NFE, measured against predicted seconds (the scale's ``reference_check``);
- our UNet against MONAI's at matched FLOPs (:mod:`edmcli.bench.peer`).

Scales (``preset``):

| preset | CUDA | CPU |
|---|---|---|
| ``auto`` (default) | ``paper``, batch auto-sized | ``paper`` batch 1 + ``tiny`` batch 4 |
| ``paper`` / ``tiny`` | that preset, batch auto-sized | that preset, batch 1 (paper) or 4 (tiny) |
| ``run`` dirs given | the runs' own networks (trained weights) | the same |

On the CPU the ``auto`` ratio table times one NFE of each path at the paper's configurations:
the big networks once, without a separate warm-up, their optional paths (γ/β recomputed, the
MONAI peer) only where one call is predicted under
:data:`~edmcli.bench.scales.CPU_AUTO_PAPER`'s cap, and nothing compiled; the ``tiny`` sweep
times every path and checks the cost model end to end.

Weights are random for the presets (speed does not depend on them); SDM at 1000 NFE is always
the cost model's prediction from SDM's measured per-NFE and fixed costs (it is never run for
1000 NFE here), and every images/s is labelled measured or predicted. SDM and its 1000 NFE are
the registry's :func:`~edmcli.models.registry.paper_reference`. The tables for people are
:func:`edmcli.bench.render.render`.

:func:`bench` is :func:`run_bench` of :func:`~edmcli.bench.bench_plan.plan_bench`: the plan makes
every check and chooses the scales without building a network; the run measures and writes.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from edmcli.bench.bench_plan import BenchPlan, plan_bench
from edmcli.bench.environment import device_peaks, environment
from edmcli.bench.flops import NetworkFlops
from edmcli.bench.measurer import Measurer, Settings
from edmcli.bench.peer import match_peer, time_peer
from edmcli.bench.plot import (
    cheapest_within,
    frontier_points,
    pareto_front,
    plot_frontier,
    plot_throughput,
)
from edmcli.bench.ratios import RATIO_NFE, ratio_rows, reference_images_per_s
from edmcli.bench.scales import CPU_BATCH, Scale
from edmcli.bench.targets import Target, preset_target, run_target, target_flops
from edmcli.bench.throughput import measure_target, size_batch
from edmcli.data.store_format import jsonable
from edmcli.models.registry import get_spec, paper_reference
from edmcli.runs.output_folder import mark_output_folder

__all__ = [
    "bench",
    "run_bench",
]

PEER_MODEL = "edm-l64"  # the model whose UNet meets MONAI's (else the first one measured)


def _write_json(path: Path, result: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(jsonable(result), indent=2))
    os.replace(tmp, path)


# --------------------------------------------------------------------------- the stage
def bench(
    models: Sequence[str] | None = None,
    preset: str = "auto",
    run: Sequence[Path] | None = None,
    nfe: Sequence[str | int] | None = None,
    batch: int | None = None,
    repeats: int | None = None,
    compile: bool | None = None,
    peer: bool = True,
    dtype: str = "auto",
    device: str = "auto",
    out: Path = Path("bench"),
    reports: Sequence[Path] | None = None,
    log: Callable[[str], None] | None = None,
    matched_batch: int | None = None,
    generator: str | None = None,
) -> dict[str, Any]:
    """Measure generation cost and throughput; write ``bench.json`` and the plots under ``out``.

    Args:
        models: model names (comma lists allowed); default every registered model.
        preset: ``auto`` (see the module docstring), ``tiny`` or ``paper``.
        run: trained diffusion runs to measure instead of the presets.
        nfe: NFEs of the throughput curves (default :data:`DEFAULT_NFES`; 1000 added for sdm,
            the paper's reference).
        batch: images per batch (default: auto-sized on CUDA; 1 at paper, 4 at tiny on CPU).
        repeats: timed repeats per measurement (cut to the time budget of each scale).
        compile: time the ``torch.compile``d denoiser (default: on CUDA only).
        peer: compare our UNet with MONAI's at matched FLOPs.
        dtype: ``auto`` (bf16 on CUDA, fp32 on CPU), ``fp32`` or ``bf16`` (autocast).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        out: output folder (``bench.json``, ``throughput.png``, ``frontier.png``).
        reports: ``echo-synth evaluate`` folders (or report.json files) for the frontier plot.
        log: progress lines (default: none).
        matched_batch: the one batch at which every model is also measured for the ratios
            between models (default: the smallest batch that fits among the models).
        generator: a generator recipe (:data:`edmcli.settings.GENERATORS`): each latent preset
            is measured a second time with the recipe's Γ-VAE architecture (its latent channels,
            a decoder with labels), labelled ``model [generator]``, next to the paper's.

    Returns:
        The result (also ``out/bench.json``): ``environment``, ``settings``, ``notes``,
        ``scales`` (each with its ``entries``, ``matched_batch``, ``ratios``,
        ``reference_check`` and ``peer``), ``frontier`` (with reports) and ``files``.

    Raises:
        EchoSynthError: for a bad option, naming it.
    """
    start = time.perf_counter()
    return run_bench(plan_bench(
        models, preset, run, nfe, batch, repeats, compile, peer, dtype, device, out, reports,
        log, matched_batch, generator,
    ), started=start)  # fmt: skip


def run_bench(plan: BenchPlan, *, started: float | None = None) -> dict[str, Any]:
    """Measure ``plan`` (:func:`~edmcli.bench.bench_plan.plan_bench`) and write ``bench.json``
    and the plots under ``plan.out``; returns the result (see :func:`bench`). ``started``: the
    ``time.perf_counter()`` that the result's ``wall_s`` counts from (default: now)."""
    start = time.perf_counter() if started is None else started
    log = plan.log or (lambda _line: None)
    names, runs, nfes = list(plan.models), list(plan.runs), list(plan.nfes)
    dev, autocast, out, report_data = plan.device, plan.autocast, plan.out, list(plan.reports)
    scales, notes = list(plan.scales), list(plan.notes)
    ref_nfe = paper_reference().paper_reference_nfe
    peaks = device_peaks(dev)
    mark_output_folder(out, "bench")
    result: dict[str, Any] = {
        "format": "echo-synth-bench",
        "format_version": 1,
        "complete": False,
        "environment": environment(dev),
        "peak_flops_per_s": peaks,
        "settings": {
            "models": names,
            "preset": plan.preset,
            "runs": [str(p) for p in runs],
            "nfe": nfes,
            "batch": plan.batch,
            "matched_batch": plan.matched_batch,
            "generator": plan.generator,
            "repeats": plan.repeats,
            "compile": plan.compile,
            "peer": plan.peer,
            "precision": "bf16" if autocast else "fp32",
            "device": str(dev),
            "ratio_nfe": RATIO_NFE,
            "sdm_nfe": ref_nfe,
        },  # fmt: skip
        "notes": notes,
        "scales": [],
    }
    path_json = out / "bench.json"
    for scale in scales:
        record = _measure_scale(scale, names, runs, nfes, dev, autocast, peaks, log,
                                lambda partial: _write_json(path_json, {**result, "scales": [
                                    *result["scales"], partial]}), plan.matched_batch,
                                plan.generator)  # fmt: skip
        result["scales"].append(record)
        _write_json(path_json, result)
    files = {"json": str(path_json)}
    figure = plot_throughput(result["scales"], out / "throughput.png")
    if figure is not None:
        files["throughput_plot"] = str(figure)
    if report_data:
        result["frontier"], plot = _frontier(report_data, result["scales"], out)
        if plot is not None:
            files["frontier_plot"] = str(plot)
    result["files"] = files
    result["wall_s"] = time.perf_counter() - start
    result["complete"] = True
    _write_json(path_json, result)
    return jsonable(result)


def _measure_scale(scale, names, runs, nfes, dev, autocast, peaks, log, checkpoint,
                   matched_batch: int | None = None, generator: str | None = None,
                   ) -> dict:  # fmt: skip
    """Measure every target of one scale (cheapest first, so the FLOP rate that plans the
    repeats comes from small networks) at the batch that fits it and at the matched batch, the
    peer, and the ratios."""
    if scale.name == "runs":
        targets = [run_target(p, nfes, scale.batch, dev) for p in runs]
    else:
        per = None if dev.type == "cuda" else CPU_BATCH[scale.name]
        targets = [preset_target(m, scale.name, nfes, scale.batch or per) for m in names]
        if generator is not None:  # the recipe's Γ-VAE next to the paper's
            targets += [preset_target(m, scale.name, nfes, scale.batch or per, generator)
                        for m in names if get_spec(m).is_latent]  # fmt: skip
    counted: list[tuple[Target, NetworkFlops]] = []
    for target in targets:
        log(f"[{scale.name}] counting FLOPs of {target.label}")
        counted.append((target, target_flops(target)))
    counted.sort(key=lambda item: item[1].cached)
    settings = Settings(dev, autocast, scale.compile, scale.repeats, scale.budget, log=log)
    for target, _ in counted:
        if target.batch is None:  # CUDA: every batch that fits first, for the matched one
            log(f"[{scale.name}] sizing the batch of {target.label}")
            target.batch, target.batch_sizing = size_batch(target, settings)
    matched = matched_batch or min(target.batch for target, _ in counted)
    peer_label = next((t.label for t, _ in counted if t.model == PEER_MODEL), counted[0][0].label)
    record: dict[str, Any] = {
        "name": scale.name, "title": scale.title, "budget": vars(scale.budget),
        "compile": scale.compile, "entries": [], "ratios": [], "peer": None,
        "matched_batch": matched,
        "matched_batch_from": "--matched-batch" if matched_batch else
                              "the smallest batch that fits among the models",
        "reference_check": None,
    }  # fmt: skip
    for target, flops in counted:
        hook = _peer_hook(scale) if scale.peer and target.label == peer_label else None
        log(f"[{scale.name}] measuring {target.label}")
        entry = measure_target(target, settings, peaks, flops, hook, matched)
        if entry.get("peer") is not None:
            record["peer"] = {"model": target.label, **entry.pop("peer")}
        else:
            entry.pop("peer", None)
        record["entries"].append(entry)
        checkpoint(record)
    record["ratios"] = ratio_rows(record["entries"], peaks, matched)
    reference = next((e for e in record["entries"] if e.get("reference_check")), None)
    if reference is not None:
        record["reference_check"] = {"label": reference["label"], "batch": reference["batch"],
                                     **reference["reference_check"]}  # fmt: skip
    ref = reference_images_per_s(record["entries"])
    for entry in record["entries"]:
        for row in entry["throughput"]:
            row["relative_to_sdm_1000"] = row["images_per_s"] / ref if ref else None
    return record


def _peer_hook(scale: Scale):
    def hook(unet, labels, settings: Settings, flops: NetworkFlops) -> dict[str, Any]:
        measure = Measurer(settings)
        ours = {"uncached": flops.uncached, "cached": flops.cached,
                "params": sum(p.numel() for p in unet.parameters())}  # fmt: skip
        settings.log(f"[{scale.name}] peer: matching MONAI's widths to our FLOPs")
        match = match_peer(unet.config, ours)
        flops_uncached = match["ours"]["uncached"] * labels.shape[0]
        if not measure.optional("peer", flops_uncached):
            return {"match": match, "skipped": measure.skipped["peer"]}
        settings.log(f"[{scale.name}] peer: MONAI at channels {match['monai']['channels']}")
        from edmcli.sampling.compiled import compiled_network

        compile_fn = (lambda net: compiled_network(net, labels.device)) if scale.compile else None
        timed = time_peer(unet, labels, match, measure, compile_fn, settings.autocast_ctx)
        return {"match": match, **timed, "skipped": measure.skipped}

    return hook


def _frontier(reports, scales, out: Path) -> tuple[dict[str, Any], Path | None]:
    scale = next((s for s in scales if s["name"] in ("paper", "runs")), scales[0])
    points, real, notes = frontier_points(reports, scale["entries"])
    pick = cheapest_within(points)
    plot = plot_frontier(points, real, out / "frontier.png")
    return {
        "images_per_s_from": scale["title"],
        "points": points,
        "real": real,
        "pareto_dice": pareto_front(points, "dice_mean"),
        "pareto_accuracy": pareto_front(points, "accuracy"),
        "cheapest_within_1_dice_point": pick,
        "notes": notes,
        "reports": [r["_path"] for r in reports],
    }, plot
