"""Uncertainty of test metrics: the paper's 80 % subsets (mean ± std) and the patient-level
bootstrap with replacement behind every 95 % interval (coverage, pairing, whole patients,
seeds), and how the report carries both."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from edmcli.evaluation.bootstrap import (
    bootstrap_mean,
    bootstrap_statistic,
    patient_bootstrap,
    patient_codes,
    patient_draws,
    patient_replicates,
    patient_resamples,
    subset_indices,
    subset_size,
)
from edmcli.evaluation.metrics.classification import balanced_accuracy


# --------------------------------------------------------------------------- paper protocol
def test_subsets_are_seeded_80_percent_draws_without_replacement():
    rows = subset_indices(50, 0.8, 300, seed=4)
    assert rows.shape == (300, 40) and subset_size(50) == 40
    assert all(len(set(r.tolist())) == 40 for r in rows)
    assert rows.min() >= 0 and rows.max() < 50
    np.testing.assert_array_equal(rows, subset_indices(50, 0.8, 300, seed=4))
    assert not np.array_equal(rows, subset_indices(50, 0.8, 300, seed=5))
    # Every image is drawn with probability 0.8.
    freq = np.bincount(rows.ravel(), minlength=50) / 300
    assert abs(freq.mean() - 0.8) < 1e-12 and freq.min() > 0.6


def test_std_matches_the_finite_population_closed_form():
    rng = np.random.default_rng(0)
    values = rng.normal(0.85, 0.05, size=60)
    n, k = 60, 48
    est = bootstrap_mean(values, 0.8, iterations=20000, seed=1)
    # Mean of k draws without replacement: Var = σ²/k · (n − k)/(n − 1), σ² the population
    # variance of the n values: about half the standard error σ/√n of the mean.
    expected = np.sqrt(values.var() / k * (n - k) / (n - 1))
    assert est.std == pytest.approx(expected, rel=0.03)
    assert est.std / (values.std() / np.sqrt(n)) == pytest.approx(0.5, abs=0.03)
    assert est.mean == pytest.approx(values.mean(), abs=3 * expected / np.sqrt(20000) + 1e-12)
    assert est.value == pytest.approx(values.mean())
    assert (est.n, est.subset_size, est.iterations, est.fraction) == (60, 48, 20000, 0.8)


def test_paper_protocol_is_mean_and_std_of_the_subset_means_without_an_interval():
    values = np.arange(10, dtype=float)
    est = bootstrap_mean(values, 0.8, iterations=500, seed=2)
    means = values[subset_indices(10, 0.8, 500, seed=2)].mean(1)
    assert est.mean == pytest.approx(means.mean()) and est.std == pytest.approx(means.std())
    assert not {"ci_low", "ci_high"} & set(est.as_dict())  # intervals: patient_bootstrap


def test_paper_degenerate_cases():
    constant = bootstrap_mean(np.full(7, 0.9), iterations=50)
    assert (constant.mean, constant.std) == pytest.approx((0.9, 0.0))
    whole = bootstrap_mean(np.arange(5.0), fraction=1.0, iterations=20)
    assert whole.std == 0.0 and whole.mean == 2.0
    single = bootstrap_mean([1.0], iterations=10)
    assert single.subset_size == 1 and single.mean == 1.0


def test_paper_subsets_are_shared_so_the_gap_is_paired():
    rng = np.random.default_rng(3)
    a, b = rng.random(40), rng.random(40)
    gap = bootstrap_mean(a - b, iterations=200, seed=9)
    ea, eb = bootstrap_mean(a, iterations=200, seed=9), bootstrap_mean(b, iterations=200, seed=9)
    assert gap.mean == pytest.approx(ea.mean - eb.mean)
    assert gap.value == pytest.approx(ea.value - eb.value)


def test_paper_protocol_of_any_statistic():
    values = np.random.default_rng(4).random(30)
    by_mean = bootstrap_mean(values, iterations=100, seed=6)
    by_fn = bootstrap_statistic(lambda idx: float(values[idx].mean()), 30, iterations=100, seed=6)
    assert by_fn.as_dict() == pytest.approx(by_mean.as_dict())
    median = bootstrap_statistic(lambda idx: float(np.median(values[idx])), 30, iterations=50)
    assert median.value == pytest.approx(np.median(values))


# --------------------------------------------------------------------------- patient bootstrap
def _clustered(rng, patients: int, per_patient: int = 4, mean: float = 0.85):
    """Per-image values with a patient random effect (ICC 0.5): ``(values, groups)``."""
    groups = np.repeat(np.arange(patients), per_patient)
    effect = rng.normal(0.0, 0.05, patients)[groups]
    return mean + effect + rng.normal(0.0, 0.05, groups.size), groups


def test_patient_bootstrap_covers_the_true_mean_and_the_paper_subsets_do_not():
    """60 patients × 4 correlated images, 400 simulated test sets: the patient bootstrap's 95 %
    interval covers the true mean about 95 % of the time; the percentile interval of the
    paper's 80 % subsets (too narrow twice over: subsets without replacement, and images
    treated as independent) about half of the time."""
    rng = np.random.default_rng(11)
    datasets, iterations, true_mean = 400, 300, 0.85
    subsets = subset_indices(240, 0.8, iterations, seed=0)
    covered_patients = covered_subsets = 0
    for k in range(datasets):
        values, groups = _clustered(rng, 60, mean=true_mean)
        est = patient_bootstrap(values, groups, iterations=iterations, seed=k)
        covered_patients += est.ci_low <= true_mean <= est.ci_high
        low, high = np.percentile(values[subsets].mean(1), [2.5, 97.5])
        covered_subsets += low <= true_mean <= high
    assert 0.90 <= covered_patients / datasets <= 0.98
    assert covered_subsets / datasets < 0.8


def test_gap_of_a_constant_difference_is_a_point_and_pairs_the_resamples():
    rng = np.random.default_rng(5)
    reference, groups = _clustered(rng, 30)
    c = 0.04
    run = reference + c
    gap = patient_bootstrap(run - reference, groups, iterations=500, seed=2)
    assert gap.value == pytest.approx(c)
    assert (gap.ci_low, gap.ci_high) == pytest.approx((c, c), abs=1e-12)
    assert gap.standard_error == pytest.approx(0.0, abs=1e-12)
    alone = patient_bootstrap(run, groups, iterations=500, seed=2)
    assert alone.ci_high - alone.ci_low > 0.01  # each run alone is uncertain, the gap is not
    # In general the gap's resample statistics are the differences of the two runs' own.
    other = reference + rng.normal(0.0, 0.05, reference.size)
    np.testing.assert_allclose(
        patient_replicates(other - reference, groups, iterations=200, seed=3),
        patient_replicates(other, groups, iterations=200, seed=3)
        - patient_replicates(reference, groups, iterations=200, seed=3),
        atol=1e-12,
    )


def test_resamples_hold_whole_patients_with_multiplicity():
    rng = np.random.default_rng(6)
    groups = np.array([f"p{k:02d}" for k in np.repeat(np.arange(12), 4)])
    groups = groups[rng.permutation(groups.size)]  # a patient's images are not adjacent
    codes, ids = patient_codes(groups)
    assert len(ids) == 12 and (ids[codes] == groups).all()
    draws = patient_draws(len(ids), iterations=50, seed=1)
    resamples = patient_resamples(groups, iterations=50, seed=1)
    assert len(resamples) == 50
    repeated = 0
    for drawn, idx in zip(draws, resamples, strict=True):
        multiplicity = Counter(drawn.tolist())
        assert len(idx) == 4 * len(drawn)  # as many patients as the test set, 4 images each
        images = Counter(idx.tolist())
        # Every image of a drawn patient, as many times as the patient was drawn; no other.
        assert images == {i: multiplicity[codes[i]] for i in range(groups.size)
                          if codes[i] in multiplicity}  # fmt: skip
        repeated += max(multiplicity.values()) > 1
    assert repeated == 50  # with replacement: 12 draws of 12 patients all but always repeat


def test_seeded_and_the_same_resamples_for_every_run():
    rng = np.random.default_rng(7)
    values, groups = _clustered(rng, 20)
    first = patient_bootstrap(values, groups, iterations=300, seed=4)
    assert first == patient_bootstrap(values, groups, iterations=300, seed=4)
    assert first != patient_bootstrap(values, groups, iterations=300, seed=5)
    assert (first.n, first.patients, first.iterations, first.confidence) == (80, 20, 300, 0.95)
    # Two runs on the same test set: the resamples depend on the patients only, not on the
    # values, and not on the order of the images either.
    np.testing.assert_array_equal(patient_draws(20, 300, seed=4), patient_draws(20, 300, seed=4))
    order = rng.permutation(values.size)
    shuffled = patient_replicates(values[order], groups[order], iterations=300, seed=4)
    np.testing.assert_allclose(
        shuffled, patient_replicates(values, groups, iterations=300, seed=4), rtol=1e-12
    )
    for a, b in zip(patient_resamples(groups, 30, 4), patient_resamples(groups, 30, 4),
                    strict=True):  # fmt: skip
        np.testing.assert_array_equal(a, b)


def test_a_statistic_that_is_not_a_mean_resamples_whole_patients_the_same_way():
    rng = np.random.default_rng(8)
    groups = np.repeat(np.arange(25), 4)
    truth = np.tile([0, 0, 1, 1], 25)
    pred = np.where(rng.random(truth.size) < 0.8, truth, 1 - truth)
    columns = np.stack([pred, truth], axis=1)

    def stat(c):
        return balanced_accuracy(c[:, 0], c[:, 1])

    reps = patient_replicates(columns, groups, statistic=stat, iterations=100, seed=3)
    expected = [balanced_accuracy(pred[i], truth[i]) for i in patient_resamples(groups, 100, 3)]
    np.testing.assert_allclose(reps, expected)
    est = patient_bootstrap(columns, groups, statistic=stat, iterations=100, seed=3)
    assert est.value == pytest.approx(balanced_accuracy(pred, truth))
    assert (est.ci_low, est.ci_high) == pytest.approx(tuple(np.percentile(reps, [2.5, 97.5])))
    # The vectorised mean is the statistic path with the mean.
    correct = (pred == truth).astype(float)
    np.testing.assert_allclose(
        patient_replicates(correct, groups, iterations=100, seed=3),
        patient_replicates(correct, groups, statistic=np.mean, iterations=100, seed=3),
    )


def test_patient_bootstrap_bad_inputs_and_one_patient():
    with pytest.raises(ValueError, match="finite"):
        patient_bootstrap([0.5, float("nan")], [0, 1])
    with pytest.raises(ValueError, match="one id per image"):
        patient_bootstrap([0.5, 0.6, 0.7], [0, 1])
    with pytest.raises(ValueError, match="at least one value"):
        patient_bootstrap([], [])
    with pytest.raises(ValueError, match="iterations"):
        patient_bootstrap([1.0], [0], iterations=0)
    with pytest.raises(ValueError, match="confidence"):
        patient_bootstrap([1.0, 2.0], [0, 1], confidence=1.0)
    one = patient_bootstrap([0.2, 0.4, 0.6, 0.8], ["p"] * 4, iterations=20)
    assert (one.value, one.ci_low, one.ci_high, one.patients) == pytest.approx((0.5, 0.5, 0.5, 1))


# --------------------------------------------------------------------------- the report
def _plan(name: str, task: str, kind: str, store: Path) -> dict:
    spec = SimpleNamespace(label=name, slug=name.split("-", 1)[1], kind=kind, model=None,
                           nfe=None, solver=None, stores=[str(store)], provenance=[{}])  # fmt: skip
    settings = SimpleNamespace(val_store=str(store), val_split="val", as_dict=dict)
    return {"spec": spec, "task": task, "settings": settings, "config": SimpleNamespace(),
            "n_train": 10, "run_dir": Path("runs") / name}  # fmt: skip


def test_report_carries_paper_subsets_and_paired_patient_intervals(phantom_store):
    from edmcli.evaluation.downstream import load_split
    from edmcli.evaluation.report.data import build_report
    from edmcli.evaluation.report.markdown import markdown

    seg = load_split(phantom_store, "test")
    cls = seg.select(seg.views >= 0)
    n, c = len(seg), 0.05
    rng = np.random.default_rng(9)
    dice = rng.uniform(0.6, 0.9, n)
    pred = np.where(np.arange(n) % 3 == 0, 1 - cls.views, cls.views)

    def seg_scored(values):
        return {"per_image": {"dice_mean": values, "hd_failed": np.zeros(n)}, "best_step": 1,
                "best_validation": 0.5, "spacing_mm": False}  # fmt: skip

    def cls_scored(p):
        correct = (p == cls.views).astype(float)
        return {"per_image": {"correct": correct}, "predicted_view": p, "best_step": 1,
                "best_validation": 0.5, "confusion_matrix": [[1, 0], [0, 1]]}  # fmt: skip

    results = [
        (_plan("seg-real", "seg", "real", phantom_store), seg_scored(dice)),
        (_plan("seg-syn", "seg", "synthetic", phantom_store), seg_scored(dice - c)),
        (_plan("cls-real", "cls", "real", phantom_store), cls_scored(cls.views)),
        (_plan("cls-syn", "cls", "synthetic", phantom_store), cls_scored(pred)),
    ]
    settings = {"tasks": ["seg", "cls"], "preset": "tiny", "seed": 0, "device": "cpu",
                "bootstrap_iterations": 200, "bootstrap_fraction": 0.8,
                "bootstrap_confidence": 0.95}  # fmt: skip
    report = build_report(results, str(phantom_store), {"seg": seg, "cls": cls}, settings, [], 1.0)
    runs = {r["name"]: r for r in report["runs"]}
    est = runs["seg-real"]["metrics"]["dice_mean"]
    assert est["value"] == pytest.approx(dice.mean()) and est["n"] == n
    assert est["paper_subsets"]["protocol"].startswith("paper protocol: 80 % subsets")
    assert est["paper_subsets"]["mean"] == pytest.approx(bootstrap_mean(dice, 0.8, 200).mean)
    boot = est["patient_bootstrap"]
    assert "patient-level bootstrap" in boot["protocol"] and "with replacement" in boot["protocol"]
    assert boot["patients"] == len(set(seg.patients)) and boot["iterations"] == 200
    expected = patient_bootstrap(dice, seg.patients, iterations=200, seed=0)
    assert (boot["ci_low"], boot["ci_high"]) == pytest.approx((expected.ci_low, expected.ci_high))
    assert boot["ci_high"] - boot["ci_low"] > 0
    # The gap: per-image difference, same resampled patients → a point at −c.
    gap = runs["seg-syn"]["gap_to_reference"]["dice_mean"]
    assert gap["value"] == pytest.approx(-c)
    assert (gap["patient_bootstrap"]["ci_low"], gap["patient_bootstrap"]["ci_high"]) == (
        pytest.approx((-c, -c), abs=1e-12)
    )
    for key in ("accuracy", "balanced_accuracy"):
        cls_gap = runs["cls-syn"]["gap_to_reference"][key]
        assert cls_gap["patient_bootstrap"]["ci_low"] <= cls_gap["value"] < 0
        assert cls_gap["patient_bootstrap"]["ci_high"] <= 0  # never better than perfect
    ba = runs["cls-syn"]["metrics"]["balanced_accuracy"]
    assert ba["value"] == pytest.approx(balanced_accuracy(pred, cls.views))
    assert set(report["uncertainty"]) == {"paper_subsets", "patient_bootstrap"}

    md = markdown(report)
    assert "mean ± std (paper subsets) [lo, hi] 95 % patient bootstrap" in md
    assert "not a confidence interval" in md and "resampled with replacement" in md
    assert "-5.0 ± 0.0 [-5.0, -5.0]" in md  # the Δ Dice cell, in %
    assert "Only 3 test patients" in md
