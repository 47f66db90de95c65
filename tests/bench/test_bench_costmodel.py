"""The linear cost model and the pure rules around it, on synthetic timings: fitting,
prediction, the end-to-end check's NFEs and solver, and batch planning."""

from __future__ import annotations

import numpy as np
import pytest

from edmcli.bench.costmodel import CostModel, fit_cost_model, pick_check_nfes, relative_error
from edmcli.bench.throughput import (
    REFERENCE_CHECK_NFES,
    check_solver,
    fit_batch,
    reference_check_nfe,
)


def test_images_per_second_is_batch_over_fixed_plus_nfe_times_per_nfe():
    model = CostModel(batch=8, per_nfe_s=0.05, fixed_s=0.4)
    assert model.seconds(10) == pytest.approx(0.9)
    assert model.images_per_s(10) == pytest.approx(8 / 0.9)
    # many NFEs: the fixed cost vanishes; one NFE costs at least the fixed part
    assert model.images_per_s(1e9) * 1e9 == pytest.approx(8 / 0.05, rel=1e-6)
    assert model.images_per_s(0) == pytest.approx(8 / 0.4)


def test_fit_recovers_the_model_from_synthetic_timings():
    truth = CostModel(4, per_nfe_s=0.031, fixed_s=0.27)
    nfes = [1, 2, 5, 10, 20, 50]
    exact = fit_cost_model(nfes[:2], [truth.seconds(n) for n in nfes[:2]], batch=4)
    assert exact.per_nfe_s == pytest.approx(0.031) and exact.fixed_s == pytest.approx(0.27)
    noise = np.array([1, -1, 1, -1, 1, -1]) * 1e-3  # zero-mean, orthogonal to nothing in NFE
    noisy = fit_cost_model(nfes, [truth.seconds(n) + e for n, e in zip(nfes, noise, strict=True)],
                           batch=4)  # fmt: skip
    assert noisy.per_nfe_s == pytest.approx(0.031, rel=0.01)
    assert noisy.fixed_s == pytest.approx(0.27, abs=2e-3)
    with pytest.raises(ValueError):
        fit_cost_model([10, 10], [1.0, 1.1], batch=4)
    assert relative_error(1.1, 1.0) == pytest.approx(0.1)


def test_ratio_of_two_models_goes_from_fixed_to_per_nfe_ratio():
    fast = CostModel(8, per_nfe_s=0.01, fixed_s=0.2)
    slow = CostModel(8, per_nfe_s=0.14, fixed_s=0.1)
    ratio = [fast.images_per_s(n) / slow.images_per_s(n) for n in (1, 10, 100, 10**6)]
    assert ratio[0] == pytest.approx(0.24 / 0.21)
    assert ratio[-1] == pytest.approx(14.0, rel=1e-3)
    assert ratio == sorted(ratio)  # the per-NFE advantage shows more with more NFEs


def test_batch_is_the_largest_power_of_two_that_fits():
    gib = 2**30
    # 8 GiB fixed + 2 GiB per image: 40 GiB fit (40 − 8) / 2 = 16 images
    assert fit_batch(10 * gib, 12 * gib, 40 * gib) == 16
    assert fit_batch(10 * gib, 12 * gib, 54 * gib) == 16  # 23 fit → 16
    assert fit_batch(10 * gib, 12 * gib, 5 * gib) == 1
    assert fit_batch(1, 2, 1e12, cap=256) == 256


def test_check_nfes_spread_within_the_budget():
    def seconds(n):
        return 0.1 + 0.01 * n

    assert pick_check_nfes([1, 2, 5, 10, 20, 50, 100, 200], seconds, budget_s=2.0) == [1, 10, 100]
    assert pick_check_nfes([1, 2, 5], seconds, budget_s=0.12) == [1]
    assert pick_check_nfes([5, 10], seconds, budget_s=0.1) == []
    assert check_solver("edm") == "euler" and check_solver("sdm") == "ddpm_ancestral"


def test_a_stochastic_sampler_pays_its_noise_at_every_step_but_the_last():
    model = CostModel(batch=4, per_nfe_s=0.05, fixed_s=0.4, noise_per_step_s=0.01)
    assert model.seconds(1) == pytest.approx(0.45)  # one step, to sigma 0: no noise
    assert model.seconds(10) == pytest.approx(0.4 + 10 * 0.05 + 9 * 0.01)
    assert CostModel.from_dict(model.to_dict()) == model
    # a record written before the noise term existed reads as no noise
    old = CostModel.from_dict({"batch": 4, "per_nfe_s": 0.05, "fixed_s": 0.4, "per_nfe_path": "x"})
    assert old.noise_per_step_s == 0.0 and old.seconds(10) == pytest.approx(0.9)


def test_the_reference_is_checked_at_the_largest_reduced_nfe_within_its_budget():
    def seconds(n):
        return 0.5 + 0.1 * n

    assert reference_check_nfe(seconds, 5.6) == 50
    assert reference_check_nfe(seconds, 2.6) == 20
    assert reference_check_nfe(seconds, 0.6) is None  # even the smallest does not fit
    assert max(REFERENCE_CHECK_NFES) < 1000 and min(REFERENCE_CHECK_NFES) >= 2  # noise steps
