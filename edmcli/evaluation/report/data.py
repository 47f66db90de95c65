"""The numbers of the ``echo-synth evaluate`` report (:func:`build_report`, the content of
``report.json``): every run's metrics, every setting, the stores' provenance and the per-image
metrics, each run paired with its task's real-trained reference.

Every number comes three ways (:mod:`edmcli.evaluation.bootstrap`): its value on the whole
test set; mean ± std over random 80 % subsets of the test images (the paper's protocol, kept to
compare with the paper; not a confidence interval); and a 95 % interval from a patient-level
bootstrap with replacement (the test patients resampled, each with all of its images). Gaps are
*run − reference* per test image, on the same subsets and the same resampled patients for every
run (paired): a negative Dice or accuracy gap means the synthetic data trains worse than the real
data, a positive HD gap likewise.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edmcli.data.store import DatasetStore
from edmcli.data.store_format import jsonable
from edmcli.evaluation.bootstrap import (
    DEFAULT_CONFIDENCE,
    BootstrapEstimate,
    PatientBootstrapEstimate,
    bootstrap_mean,
    bootstrap_statistic,
    patient_bootstrap,
)
from edmcli.evaluation.metrics.classification import balanced_accuracy
from edmcli.evaluation.metrics.segmentation import STRUCTURE_SHORT, STRUCTURES

SEG_METRICS = (
    *(f"dice_{name}" for name in STRUCTURES),
    "dice_mean", "hd_lv_px", "hd95_lv_px", "hd_lv_mm", "hd95_lv_mm",
)  # fmt: skip
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
QUALITY_PERCENT = {"label_dice", "synthetic_accuracy"}
"""The quality summary's metrics (:data:`edmcli.evaluation.fidelity.METRICS`) shown in percent."""


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
