"""Hand-made run records of an evaluation report, for the report and correlation tests."""

from __future__ import annotations


def fake_run(name, task, kind="synthetic", model=None, nfe=None, spacing_mm=True, **metrics):
    """A run record of ``report.json`` whose every metric is ``value`` with a ± 0.01 subset
    spread and a ± 0.02 patient interval; ``name`` is ``{task}-{slug}``."""
    est = {k: {"value": v, "paper_subsets": {"mean": v, "std": 0.01},
               "patient_bootstrap": {"ci_low": v - 0.02, "ci_high": v + 0.02}}
           for k, v in metrics.items()}  # fmt: skip
    return {"name": name, "task": task, "kind": kind, "model": model, "nfe": nfe, "label": name,
            "slug": name.split("-", 1)[1], "metrics": est, "reference": f"{task}-real",
            "gap_to_reference": None, "spacing_mm": spacing_mm, "hd_failures": 0,
            "confusion_matrix": [[1, 0], [0, 1]], "train_images": 10, "best_step": 1,
            "steps": 1, "validation": {"store": "x", "split": "val"}}  # fmt: skip


def fake_report(runs):
    """A minimal ``report.json`` around ``runs``: tiny preset, 4 test images of one patient."""
    return {
        "settings": {"tasks": ["seg", "cls"], "preset": "tiny", "seed": 0, "device": "cpu",
                     "bootstrap_iterations": 10, "bootstrap_fraction": 0.8},
        "test": {"path": "t.zarr", "patients": ["p"], "images": {"seg": 4}, "image_size": [8, 8]},
        "references": {"seg": "seg-real", "cls": "cls-real"}, "notes": [], "wall_s": 1.0,
        "runs": runs,
    }  # fmt: skip
