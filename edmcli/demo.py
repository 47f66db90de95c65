"""The demo pipeline: the main path on built-in phantom data with tiny settings (CPU minutes).

prepare 64² phantom echoes (50 patients: 25 train, 5 validation, 20 test) → Γ-VAE L64 → EDM-L64
→ a synthetic store → quality metrics and evaluation against the real-trained segmenter and view
classifier → a quick bench of the latent model against the pixel model → ``report.md``, whose
first screen answers the paper's two questions for this run (how far synthetic-trained networks
fall behind real-trained ones, with a patient-level interval; how much faster the latent model
generates). Every step resumes, so rerunning continues.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from edmcli.console import console, styled
from edmcli.errors import EchoSynthError
from edmcli.runs.output_folder import check_output_folder, mark_output_folder
from edmcli.settings import PIPELINES, changes_architecture, generator_recipe

DEMO = PIPELINES["demo"]  # what the demo runs: one named row of the settings table


def recipe_text(generator: str) -> str:
    """The settings of a generator recipe in a few words (``paper``: the paper's settings)."""
    parts = [f"{stage} {k}={v}" for stage, section in generator_recipe(generator).items()
             for k, v in section.items()]  # fmt: skip
    return ", ".join(parts) if parts else "the paper's settings"


def run_names(generator: str) -> tuple[str, str, str]:
    """(Γ-VAE run, diffusion run, synthetic store stem) of the demo's ``generator`` recipe: the
    paper's names where the recipe changes nothing of that stage or an earlier one, the recipe's
    name added where it does (a demo folder may hold both; unchanged runs are shared)."""
    recipe = generator_recipe(generator)
    vae = f"vae-l{DEMO['latent']}" + (f"-{generator}" if recipe["vae"] else "")
    changed = recipe["vae"] or recipe["diffusion"]
    model = DEMO["model"] + (f"-{generator}" if changed else "")
    store = DEMO["model"] + ("" if generator == "paper" else f"-{generator}")
    return vae, model, f"{store}-nfe{DEMO['nfe']}"


def bench_folder(generator: str) -> str:
    """The demo's bench folder: ``bench``, or ``bench-NAME`` for a recipe that changes the
    Γ-VAE's networks (benched next to the paper's: ``bench --generator``)."""
    return f"bench-{generator}" if changes_architecture(generator) else "bench"


def run_demo(
    out: Path = Path("demo"),
    n_patients: int = DEMO["n_patients"],
    seed: int = 0,
    device: str = "auto",
    class_cond: str = DEMO["class_cond"],
    generator: str = DEMO["generator"],
) -> dict[str, Any] | None:
    """Run the demo under ``out``; returns the evaluation report (None on non-main ranks).
    ``class_cond``: the generator's conditioning besides the label map (``view``, ``view-phase``
    or ``none``, the paper's map-only model); ``generator``: its recipe
    (:data:`edmcli.settings.GENERATORS`: ``faithful``, the measured best, or ``paper``), whose
    runs and stores carry its name unless it is the paper's."""
    from edmcli.bench.bench import bench
    from edmcli.data.prepare import prepare
    from edmcli.evaluation.evaluate import evaluate
    from edmcli.runs.diffusion_run import check_class_cond
    from edmcli.sampling.preview import preview_samples
    from edmcli.sampling.sample import sample
    from edmcli.training.diffusion import train_diffusion
    from edmcli.training.vae import train_vae

    check_class_cond(class_cond)  # a typo fails now, not after the Γ-VAE's minutes
    recipe = generator_recipe(generator)
    out = Path(out)
    check_output_folder(out, "demo")
    if n_patients < 10:
        raise EchoSynthError(
            f"the demo needs at least 10 phantom patients (train, validation and test), got "
            f"{n_patients}"
        )
    store = out / f"phantom{DEMO['size']}.zarr"
    if store.exists():  # a rerun continues; with other data it would silently mix two demos
        from edmcli.data.store import DatasetStore

        held = DatasetStore(store).column("patient")
        count = len(set(held.tolist()))
        if count != n_patients or not all(p.startswith(f"phantom-s{seed}-") for p in held):
            raise EchoSynthError(
                f"{out} holds a demo of {count} phantom patients (another --n-patients or "
                f"--seed); rerun with those settings to continue it, or use another --out"
            )
    mark_output_folder(out, "demo")
    model, nfe, latent, preset = DEMO["model"], DEMO["nfe"], DEMO["latent"], DEMO["preset"]
    vae_name, name, stem = run_names(generator)
    vae_run, diffusion_run = out / "runs" / vae_name, out / "runs" / name
    synthetic = out / "synthetic" / f"{stem}.zarr"
    probe = out / "synthetic" / f"{stem}-probe.zarr"

    def prepare_step():
        if store.exists():
            console.print(f"using {store}", highlight=False)
            return
        result = prepare(store, source="phantom", size=DEMO["size"], n_patients=n_patients,
                         seed=seed, split_ratio=DEMO["split_ratio"])  # fmt: skip
        console.print(f"wrote {result.path}: {result.samples} images", highlight=False)

    variant = generator if changes_architecture(generator) else None
    bench_dir = out / bench_folder(generator)

    def bench_step():
        done = bench_dir / "bench.json"
        if done.is_file() and json.loads(done.read_text()).get("complete"):
            console.print(f"using {done}", highlight=False)
            return
        bench([model, DEMO["pixel_model"]], preset=preset, nfe=[1, nfe], compile=False,
              peer=False, device=device, out=bench_dir, generator=variant)  # fmt: skip

    steps = [
        ("prepare", prepare_step),
        ("train-vae", lambda: train_vae(
            store, latent, run=vae_run, preset=preset, device=device, seed=seed,
            **recipe["vae"],
        )),
        ("train-diffusion", lambda: train_diffusion(
            model, store, vae=vae_run, run=diffusion_run, preset=preset, device=device,
            seed=seed, preview=preview_samples, **{**recipe["diffusion"], "class_cond": class_cond},
        )),
        # the training store from the train maps only: the val patients stay unseen by every
        # run, so choosing checkpoints on them leaks nothing; the probe store from the test
        # maps, for judging label fidelity only (evaluate refuses it as training data)
        ("sample", lambda: (
            sample(run=diffusion_run, nfe=nfe, compile=False, out=synthetic, device=device,
                   seed=seed, splits="train", **recipe["sample"]),
            sample(run=diffusion_run, nfe=nfe, compile=False, out=probe, device=device,
                   seed=seed, splits="test", k=1, **recipe["sample"]),
        )),
        ("evaluate", lambda: evaluate(
            [str(store), str(synthetic)], store, out / "evaluation", preset=preset,
            device=device, seed=seed, fidelity=True, probes=[probe],
        )),
        ("bench", bench_step),
    ]  # fmt: skip
    report = None
    stage_seconds: dict[str, float] = {}
    for name, step in steps:
        console.rule(styled(f"demo: {name}"))
        started = time.perf_counter()
        result = step()
        stage_seconds[name] = time.perf_counter() - started
        console.print(f"demo: {name} took {stage_seconds[name]:.0f} s", highlight=False)
        report = result if name == "evaluate" else report
    if report is None:  # a non-main rank of a torchrun launch
        return None
    bench_result = json.loads((bench_dir / "bench.json").read_text())
    page = out / "report.md"
    tmp = page.with_name(f".{page.name}.tmp")
    tmp.write_text(front_page(report, bench_result, out, class_cond, stage_seconds, generator))
    os.replace(tmp, page)
    console.rule(styled("demo: done"))
    console.print(f"everything is under {out}; the summary is {page}", highlight=False)
    return report


# --------------------------------------------------------------------------- the front page
def _estimate(estimate: dict[str, Any] | None, sign: str = "") -> str:
    """``value [lo, hi]`` in percent from a report estimate (patient bootstrap interval)."""
    if not estimate:
        return "–"
    boot = estimate["patient_bootstrap"]
    v, lo, hi = (100 * x for x in (estimate["value"], boot["ci_low"], boot["ci_high"]))
    return f"{v:{sign}.1f} [{lo:{sign}.1f}, {hi:{sign}.1f}]"


def gap_rows(report: dict[str, Any]) -> list[list[str]]:
    """Rows (task, real-trained, synthetic-trained, gap) of the evaluation ``report``: the gap is
    synthetic − real per test image, with its patient-level bootstrap interval."""
    rows = []
    for task, metric, title in (("seg", "dice_mean", "segmentation: mean Dice (%)"),
                                ("cls", "accuracy", "A2C/A4C view accuracy (%)")):  # fmt: skip
        runs = [r for r in report["runs"] if r["task"] == task]
        real = next((r for r in runs if r["kind"] == "real"), None)
        for synthetic in (r for r in runs if r["kind"] == "synthetic"):
            gap = (synthetic.get("gap_to_reference") or {}).get(metric)
            rows.append([
                title,
                _estimate(real["metrics"].get(metric)) if real else "–",
                _estimate(synthetic["metrics"].get(metric)),
                _estimate(gap, "+"),
            ])  # fmt: skip
    return rows


def throughput_line(bench_result: dict[str, Any], nfe: int = DEMO["nfe"]) -> str:
    """One sentence: images/s of the latent model and the pixel model at ``nfe``, their ratio
    and its FLOP ceiling, from a ``bench`` result."""
    from edmcli.bench.ratios import images_per_second, per_image_flops

    scale = bench_result["scales"][0]
    entries = {e["label"]: e for e in scale["entries"]}
    latent, pixel = entries.get(DEMO["model"]), entries.get(DEMO["pixel_model"])
    if latent is None or pixel is None:
        return "The quick bench measured only one of the two models; see bench/bench.json."
    variant = bench_result["settings"].get("generator")
    recipe = entries.get(f"{DEMO['model']} [{variant}]") if variant else None
    b = images_per_second(pixel, nfe)
    device = bench_result["environment"].get("device_name") or bench_result["settings"]["device"]

    def speed(entry: dict[str, Any]) -> str:
        a = images_per_second(entry, nfe)
        ceiling = per_image_flops(pixel, nfe) / per_image_flops(entry, nfe)
        return f"{a:.2f} images/s, **{a / b:.1f}× faster** (FLOP ratio {ceiling:.1f}×)"

    mine = (
        f"With the `{variant}` recipe's Γ-VAE (the demo's: {recipe_text(variant)}), "
        f"{recipe['label']} generates {speed(recipe)}; with the paper's, {speed(latent)}. "
        if recipe is not None
        else f"{latent['label']} generates {speed(latent)}. "
    )
    return (
        f"At NFE {nfe}, {pixel['label']} generates {b:.2f} images/s. {mine}On {device}, batch "
        f"{latent['batch']}, eager, random weights (speed does not depend on them), tiny "
        f"configurations (the demo's own EDM-L64 is the tiny one), from the measured per-NFE and "
        f"fixed costs. The paper-scale ratios (EDM-L64 / EDM ≈ 14× in FLOPs): `echo-synth bench`."
    )


def quality_lines(report: dict[str, Any]) -> list[str]:
    """The quality metrics of each synthetic store next to the real test images' own values
    (label fidelity, accuracy) or the floor of two real halves at the same sizes (distances)."""
    quality = report.get("quality")
    if not quality:
        return []
    real = quality.get("real") or {}
    floor = (real.get("halves") or {}).get("distances") or {}
    keys = [("label_dice", "label fidelity: real-trained segmenter's mean Dice on the synthetic "
             "images against their label maps", True),
            ("synthetic_accuracy", "real-trained classifier's view accuracy on synthetic images",
             True),
            ("segmenter.kid", "KID (unbiased), segmenter bottleneck features", False),
            ("classifier.kid", "KID (unbiased), classifier features", False),
            ("radiomics.fd", "Fréchet radiomics distance (first order + GLCM)", False),
            ("diversity", "diversity between samples of the same label map", False)]  # fmt: skip
    lines = []
    for store in quality["stores"]:
        judged = store.get("judged_on") or {}
        lines.append(f"`{store['label']}` ({store['images_scored']} images scored in "
                     f"{store['seconds']['total']:.0f} s; distances standardised on the real "
                     "images and taken at the floor's sizes):")  # fmt: skip
        for key, text, percent in keys:
            value = store["summary"].get(key)
            if value is None:
                continue
            fmt = (lambda x: f"{100 * x:.1f} %") if percent else (lambda x: f"{x:.3g}")
            if "." in key:  # a distance: against the floor of two real halves
                space, name = key.split(".")
                ref = (floor.get(space) or {}).get("all") or {}
                against = (
                    f" (two halves of the real test patients: {fmt(ref[name])} ± "
                    f"{fmt(ref['spread'][name])})"
                    if name in ref
                    else ""
                )
            else:
                ref = (real.get("summary") or {}).get(key)
                against = f" (real test images: {fmt(ref)})" if ref is not None else ""
            if key in ("label_dice", "synthetic_accuracy") and judged.get("store"):
                against += f", on {store['images_judged']} images of its probe store (test maps)"
            lines.append(f"- {text}: {fmt(value)}{against}")
        if judged.get("note"):
            lines.append(f"- {judged['note']}")
        fid = ((store.get("decoder_ceiling") or {}).get("label_fidelity") or {}).get("all")
        if fid:
            lines.append(
                f"- decoder ceiling: the real test images through the model's Γ-VAE reach label "
                f"fidelity {100 * fid['dice_mean']:.1f} % (what a perfect generator of its "
                f"latent space would reach)"
            )
        memo = store.get("memorisation")
        if memo:
            pixel = memo["spaces"]["pixel"]
            flagged = pixel["flagged"]
            lines.append(
                f"- memorisation: {100 * flagged['1.0']['all']:.1f} % / "
                f"{100 * flagged['5.0']['all']:.1f} % of its images are closer to a training "
                "image of the generator than the 1st / 5th percentile of the real test images "
                "of new patients (pixel space; about 1 % / 5 % for new patients, 100 % for "
                f"copies); own source patient nearest: "
                f"{100 * pixel['nearest_is_own_source_patient']:.1f} %"
            )
            source = memo["spaces"].get("source_image")
            if source:
                lines.append(
                    f"- closer to the real image of its own source map than the 1st / 5th "
                    f"percentile of its probe's images are to theirs: "
                    f"{100 * source['flagged']['1.0']['all']:.1f} % / "
                    f"{100 * source['flagged']['5.0']['all']:.1f} % (a generator that follows "
                    "its maps without copying: about 1 % / 5 %)"
                )
    return lines


def front_page(
    report: dict[str, Any],
    bench_result: dict[str, Any],
    out: Path,
    class_cond: str | None = DEMO["class_cond"],
    stage_seconds: dict[str, float] | None = None,
    generator: str = DEMO["generator"],
) -> str:
    """``report.md`` of the demo: the two answers first, then pictures and links.
    ``class_cond``: the generator's class conditioning (None or ``"none"``: map only);
    ``stage_seconds``: wall time of each stage in the call that wrote the page; ``generator``:
    the recipe (:data:`edmcli.settings.GENERATORS`)."""
    out = Path(out)
    conditioning = (
        " (map only, as in the paper)"
        if class_cond in (None, "none")
        else f" conditioned on the label map and the {class_cond} (sampled at guidance scale 1: "
        "the class-conditional model alone, no guidance)"
    )
    test = report["test"]
    n_test = len(test["patients"])
    images = ", ".join(f"{n} images for {task}" for task, n in test["images"].items())
    size, model, nfe, latent = DEMO["size"], DEMO["model"], DEMO["nfe"], DEMO["latent"]
    lines = [
        "# echo-synth demo",
        "",
        f"Phantom echoes at {size}² → Γ-VAE L{latent} → {model.upper()}{conditioning} "
        f"({DEMO['preset']} presets; generator recipe `{generator}`: {recipe_text(generator)}) → "
        f"a synthetic store sampled at NFE {nfe} → networks trained on real or on "
        f"synthetic images, tested on the same {n_test} held-out real patients ({images}).",
        "",
        "## 1. Does synthetic data train as well as real data?",
        "",
        "Each cell: the value on all test images [95 % interval of a patient-level bootstrap].",
        "",
        "| | real-trained | synthetic-trained | gap (synthetic − real) |",
        "|---|---|---|---|",
        *("| " + " | ".join(row) + " |" for row in gap_rows(report)),
        "",
        "## 2. How much faster is the latent model?",
        "",
        throughput_line(bench_result),
        "",
    ]
    quality = quality_lines(report)
    if quality:
        lines += ["## Quality of the synthetic data (seconds, no training)", "", *quality, ""]
    pictures = [("synthetic samples (label map, image)",
                 out / "synthetic" / f"{run_names(generator)[2]}-grid.png")]  # fmt: skip
    pictures += [(Path(p).stem.replace("_", " "), out / "evaluation" / p)
                 for p in report.get("plots", [])]  # fmt: skip
    pictures.append(("throughput vs NFE", out / bench_folder(generator) / "throughput.png"))
    lines += ["## Pictures", ""]
    lines += [f"![{title}]({path.relative_to(out)})" for title, path in pictures if path.is_file()]
    lines += [
        "",
        "Everything else: `evaluation/report.md` (every run, the paper's subset protocol, "
        f"settings, stop reasons, the quality section), `{bench_folder(generator)}/bench.json`.",
        "",
    ]
    if stage_seconds:
        total = sum(stage_seconds.values())
        times = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in stage_seconds.items())
        lines += [f"Wall time of this call: {total / 60:.1f} min ({times}); a stage that was "
                  "already done counts its check only.", ""]  # fmt: skip
    return "\n".join(lines)
