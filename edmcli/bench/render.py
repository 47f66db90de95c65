"""The human tables of a bench result: per-NFE costs, fixed costs and the cost model, images/s
by NFE, the end-to-end checks (and SDM's check of its 1000-NFE prediction), the ratios with their
ceilings at the batch that fits and at the matched batch, the MONAI peer and the frontier's pick
(:func:`render`, on a rich console)."""

from __future__ import annotations

from typing import Any

from edmcli.bench.ratios import FITTING, RATIO_NFE, at_matched_batch, images_per_second

__all__ = ["render"]


def _fmt(value: float | None, spec: str = ".3g", scale: float = 1.0) -> str:
    return "–" if value is None else format(value * scale, spec)


def _ms(timings: dict[str, Any], key: str) -> str:
    """``median ±spread`` in milliseconds, or – when not measured."""
    t = timings.get(key)
    return "–" if t is None else f"{1e3 * t['median_s']:.4g} ±{100 * t['spread']:.0f}%"


def _noise_ms(timings: dict[str, Any]) -> str:
    """Start noise per batch / one step's noise (stochastic samplers), in milliseconds."""
    start, step = timings.get("start_noise"), timings.get("step_noise")
    if start is None:
        return "–"
    text = f"{1e3 * start['median_s']:.3g}"
    return text + (f" / {1e3 * step['median_s']:.3g}" if step else " / –")


def _batch_cell(row: dict[str, Any]) -> str:
    """The ratio table's batch: "fits (256 vs 32)" or "matched 32"."""
    batches = list((row.get("batches") or {}).values())
    if row.get("batch", FITTING) == FITTING:
        return "fits" + (f" ({' vs '.join(map(str, batches))})" if batches else "")
    return "matched " + (str(batches[0]) if batches else "")


def _matched_line(scale: dict[str, Any], same: bool) -> str:
    """The matched batch and each model's images/s there next to its own batch's."""
    matched = scale["matched_batch"]
    head = f"matched batch {matched} ({scale.get('matched_batch_from', '')})"
    if same:
        return (f"{head}: every model ran at batch {matched}, so the ratios at the batch that "
                "fits are the ratios at the matched batch")  # fmt: skip
    parts = []
    for e in scale["entries"]:
        other = at_matched_batch(e)
        if other is None:
            reason = (e.get("matched") or {}).get("skipped") or "not measured"
            parts.append(f"{e['label']} {reason}")
            continue
        parts.append(
            f"{e['label']} {images_per_second(e, RATIO_NFE):.3g} images/s at batch {e['batch']}, "
            f"{images_per_second(other, RATIO_NFE):.3g} at batch {matched}"
        )
    return f"{head}, at {RATIO_NFE} NFE: " + "; ".join(parts)


def _reference_line(check: dict[str, Any]) -> str:
    """SDM's 1000-NFE prediction and its end-to-end check at a reduced NFE."""
    at = check["reference_nfe"]
    head = (f"{check['label']} at {at} NFE is predicted: {check['predicted_reference_s']:.3g} s "
            f"per batch of {check['batch']} ({check['predicted_reference_images_per_s']:.3g} "
            "images/s)")  # fmt: skip
    if "measured_s" not in check:
        return f"{head}; the end-to-end check {check.get('skipped', 'was not run')}"
    return (f"{head}; checked end to end at NFE {check['nfe']} ({check['solver']}): predicted "
            f"{check['predicted_s']:.3g} s, measured {check['measured_s']:.3g} s (measured / "
            f"predicted {check['measured_over_predicted']:.3g}×)")  # fmt: skip


def render(result: dict[str, Any], console) -> None:
    """The human tables of a :func:`bench` result on a rich ``console`` (at least 120 columns
    wide when it is not a terminal, e.g. a CI log)."""
    from rich.console import Console
    from rich.table import Table

    if not console.is_terminal and console.width < 120:  # a log: room for the tables
        console = Console(file=console.file, width=120, soft_wrap=True, emoji=False, markup=False)

    def show(item) -> None:
        console.print(item, highlight=False)

    env = result["environment"]
    show(
        f"echo-synth bench on {env['device_name']} ({env['device']}, {env['cpu_threads']} CPU "
        f"threads), torch {env['torch']}, triton {env['triton']}, monai {env['monai']}; "
        f"precision {result['settings']['precision']}"
    )
    for note in result["notes"]:
        show(f"- {note}")
    for scale in result["scales"]:
        entries = scale["entries"]
        per_nfe = Table(title=f"One NFE — {scale['title']}", title_justify="left")
        for col in ("model", "net", "batch", "GFLOP cached", "GFLOP recomp.", "ms cached",
                    "ms recomputed", "ms compiled", "GFLOP/s", "MFU"):  # fmt: skip
            per_nfe.add_column(col, justify="left" if col == "model" else "right")
        fixed = Table(title="Fixed costs per batch, cost model", title_justify="left")
        for col in ("model", "γ/β cache ms", "decode ms", "write ms", "noise ms start/step",
                    "fixed s", "per NFE s", "peak memory"):  # fmt: skip
            fixed.add_column(col, justify="left" if col == "model" else "right")
        for e in entries:
            t, f, c = e["timings"], e["flops_per_image"], e["cost_model"]
            best = t.get(c["per_nfe_path"]) or {}
            per_nfe.add_row(
                e["label"], f"{e['net_size']}²", str(e["batch"]), f"{f['cached'] / 1e9:.4g}",
                f"{f['uncached'] / 1e9:.4g}", _ms(t, "nfe_cached_eager"),
                _ms(t, "nfe_uncached_eager"), _ms(t, "nfe_cached_compiled"),
                _fmt(best.get("achieved_flops_per_s"), ".4g", 1e-9), _fmt(best.get("mfu"), ".1%"),
            )  # fmt: skip
            peak = e["peak_memory_bytes"]
            fixed.add_row(
                e["label"], _ms(t, "spade_cache"), _ms(t, "decode"), _ms(t, "store_write"),
                _noise_ms(t), f"{c['fixed_s']:.3g}",
                f"{c['per_nfe_s']:.3g} ({c['per_nfe_path'][4:]})",
                "–" if not peak else f"{peak / 2**30:.3g} GiB",
            )  # fmt: skip
        show(per_nfe)
        show(fixed)
        nfes = sorted({r["nfe"] for e in entries for r in e["throughput"]})
        curve = Table(
            title="images/s by NFE (cost model; * timed end to end: the measured value)",
            title_justify="left",
        )
        curve.add_column("model")
        for n in nfes:
            curve.add_column(str(n), justify="right")
        for e in entries:
            cells = {
                r["nfe"]: f"{r['measured_images_per_s']:.3g}*"
                if r.get("measured_images_per_s")
                else f"{r['images_per_s']:.3g}"
                for r in e["throughput"]
            }
            curve.add_row(e["label"], *(cells.get(n, "") for n in nfes))
        show(curve)
        for e in entries:
            checks = [c for c in e["checks"] if "measured_s" in c]
            if checks:
                show(
                    f"{e['label']}: cost model vs end to end ({checks[0]['solver']}): "
                    + "; ".join(
                        f"NFE {c['nfe']} predicted {c['predicted_s']:.3g} s, measured "
                        f"{c['measured_s']:.3g} s ({100 * c['relative_error']:+.1f} %)"
                        for c in checks
                    )
                )
        reference = scale.get("reference_check")
        if reference:
            show(_reference_line(reference))
        matched = scale.get("matched_batch")
        same = matched is not None and all(e["batch"] == matched for e in entries)
        if matched is not None:
            show(_matched_line(scale, same))
        ratios = Table(title="Ratios, each next to its ceiling", title_justify="left")
        for col in ("ratio", "at", "batch", "value", "ceiling", "source"):
            ratios.add_column(col, justify="right" if col in ("value", "ceiling") else "left")
        for r in scale["ratios"]:
            if same and r.get("batch", FITTING) != FITTING:
                continue  # every model ran at the matched batch: the same numbers twice
            ceiling = "–" if r["ceiling"] is None else f"{r['ceiling']:.3g}× {r['ceiling_kind']}"
            source = "measured" if r["source"] == "measured" else "cost model"
            ratios.add_row(r["name"], r["at"], _batch_cell(r), f"{r['value']:.3g}×", ceiling,
                           source)  # fmt: skip
        peer = scale.get("peer")
        if peer and peer.get("ratios"):
            at = f"{peer['resolution']}²"
            for r in peer["ratios"]:
                ratios.add_row(f"{peer['model']} UNet: {r['name']}", at, f"{peer['batch']}",
                               f"{r['value']:.3g}×", f"{r['flop_ceiling']:.3g}× FLOP ratio",
                               r["source"])  # fmt: skip
        show(ratios)
        if peer:
            m = peer["match"]
            skipped = peer.get("skipped")
            show(
                f"peer: our {peer['model']} UNet {m['ours']['uncached'] / 1e9:.4g} GFLOP per NFE "
                f"({m['ours']['cached'] / 1e9:.4g} with γ/β cached), "
                f"{m['ours']['params'] / 1e6:.4g} M params; "
                f"MONAI channels {m['monai']['channels']}: "
                f"{m['monai']['flops'] / 1e9:.4g} GFLOP "
                f"({100 * m['monai']['flops_rel_to_ours_uncached']:+.1f} %), "
                f"{m['monai']['params'] / 1e6:.4g} M params (at our channels "
                f"{m['monai_at_our_channels']['channels']}: "
                f"{m['monai_at_our_channels']['flops'] / 1e9:.4g} GFLOP, "
                f"{m['monai_at_our_channels']['params'] / 1e6:.4g} M params)"
                + (f"; {skipped}" if isinstance(skipped, str) else "")
            )
        skipped = sorted({f"{k}: {v}" for e in entries for k, v in e["skipped"].items()})
        if skipped:
            show("not measured in this scale: " + "; ".join(skipped))
    frontier = result.get("frontier")
    if frontier:
        pick = frontier["cheapest_within_1_dice_point"]
        if pick:
            show(
                "frontier: the cheapest setting within 1 Dice point of the best is "
                f"{pick.get('series', pick['model'])} at {pick['nfe']} NFE "
                f"({pick['images_per_s']:.3g} images/s, mean Dice "
                f"{100 * pick['dice_mean']:.1f} %)"
            )
        for note in frontier["notes"]:
            show(f"frontier: {note}")
    show("wrote " + ", ".join(result["files"].values()))
