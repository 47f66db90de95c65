"""Sigma schedules against Karras et al. (Table 1) closed forms and the DDPM's discrete levels."""

from __future__ import annotations

import math

import pytest
import torch

from edmcli.models.ddpm import DDPMEpsModel, ddpm_alphas_cumprod
from edmcli.models.preconditioning import vp_sigma
from edmcli.models.registry import MODEL_NAMES, get_spec
from edmcli.models.unet import SpadeUNet, SpadeUNetConfig
from edmcli.sampling.schedules import (
    SCHEDULES,
    check_sigmas,
    ddpm_sigmas,
    ddpm_timesteps,
    edm_sigmas,
    snap_sigmas,
    ve_sigmas,
    vp_sigmas,
)


def tiny_ddpm() -> DDPMEpsModel:
    net = SpadeUNet(
        SpadeUNetConfig(
            image_size=8,
            model_channels=8,
            channel_mult=(1,),
            num_blocks=1,
            attention_resolutions=(),
            dropout=0.0,
            attention_head_channels=8,
            spade_hidden=8,
        )
    )
    return DDPMEpsModel(net)


def assert_schedule(sig: torch.Tensor, n: int) -> None:
    assert sig.dtype == torch.float64 and sig.device.type == "cpu"
    assert sig.shape == (n + 1,)
    assert sig[-1] == 0
    assert bool((sig[1:] < sig[:-1]).all())


@pytest.mark.parametrize("n", [1, 2, 7, 18, 256])
def test_edm_endpoints_and_rho_spacing(n):
    sig = edm_sigmas(n, sigma_min=0.002, sigma_max=80.0, rho=7.0)
    assert_schedule(sig, n)
    assert sig[0].item() == pytest.approx(80.0, rel=1e-12)
    if n > 1:
        assert sig[-2].item() == pytest.approx(0.002, rel=1e-12)
        # uniform in sigma^(1/rho): constant first differences
        diffs = (sig[:-1] ** (1 / 7)).diff()
        torch.testing.assert_close(diffs, diffs[:1].expand_as(diffs), rtol=1e-9, atol=0)


def test_edm_hand_computed():
    # N = 3, rho = 2, 1..9: sqrt levels 3, 2, 1
    torch.testing.assert_close(
        edm_sigmas(3, sigma_min=1.0, sigma_max=9.0, rho=2.0),
        torch.tensor([9.0, 4.0, 1.0, 0.0], dtype=torch.float64),
    )


@pytest.mark.parametrize("n", [1, 5, 35])
def test_ve_geometric_in_sigma_squared(n):
    sig = ve_sigmas(n, sigma_min=0.02, sigma_max=100.0)
    assert_schedule(sig, n)
    assert sig[0].item() == pytest.approx(100.0, rel=1e-12)
    if n > 1:
        assert sig[-2].item() == pytest.approx(0.02, rel=1e-12)
        t = sig[:-1] ** 2
        i = torch.arange(n, dtype=torch.float64)
        torch.testing.assert_close(t, 100.0**2 * (0.02**2 / 100.0**2) ** (i / (n - 1)))
        ratios = sig[1:-1] / sig[:-2]
        torch.testing.assert_close(ratios, ratios[:1].expand_as(ratios), rtol=1e-10, atol=0)


@pytest.mark.parametrize("n", [1, 4, 50])
def test_vp_levels_match_closed_form(n):
    beta_d, beta_min, eps_s = 19.9, 0.1, 1e-3
    sig = vp_sigmas(n, beta_d, beta_min, eps_s)
    assert_schedule(sig, n)
    ts = [1.0] if n == 1 else [1 + i / (n - 1) * (eps_s - 1) for i in range(n)]
    hand = [math.sqrt(math.exp(0.5 * beta_d * t * t + beta_min * t) - 1) for t in ts]
    torch.testing.assert_close(
        sig[:-1], torch.tensor(hand, dtype=torch.float64), rtol=1e-12, atol=0
    )
    # and the preconditioning module's (float32) sigma(t)
    torch.testing.assert_close(
        sig[:-1].float(), vp_sigma(torch.tensor(ts), beta_d, beta_min), rtol=1e-5, atol=0
    )
    # the endpoints that EDM quotes for VP sampling: sigma(1) ~ 152, sigma(1e-3) ~ 0.0100
    assert sig[0].item() == pytest.approx(math.sqrt(math.expm1(0.5 * 19.9 + 0.1)), rel=1e-12)
    assert vp_sigma(torch.tensor(1.0, dtype=torch.float64)).item() == pytest.approx(152.0, rel=2e-3)


def test_ddpm_full_schedule_is_every_discrete_level():
    abar = ddpm_alphas_cumprod(1000)
    sig = ddpm_sigmas(1000)
    assert_schedule(sig, 1000)
    table = ((1 - abar) / abar).sqrt()
    torch.testing.assert_close(sig[:-1], table.flip(0), rtol=0, atol=0)
    torch.testing.assert_close(ddpm_sigmas(1000, alphas_cumprod=abar), sig, rtol=0, atol=0)
    assert torch.equal(ddpm_timesteps(1000), torch.arange(999, -1, -1))


@pytest.mark.parametrize("n", [1, 2, 10, 50, 999])
def test_ddpm_strided_starts_at_largest(n):
    abar = ddpm_alphas_cumprod(1000)
    table = ((1 - abar) / abar).sqrt()
    t = ddpm_timesteps(n)
    assert t.shape == (n,) and t[0] == 999
    assert bool((t[1:] < t[:-1]).all())
    if n > 1:
        assert t[-1] == 0
        gaps = -t.diff()
        assert int(gaps.max()) - int(gaps.min()) <= 1  # evenly strided
    sig = ddpm_sigmas(n)
    assert_schedule(sig, n)
    torch.testing.assert_close(sig[:-1], table[t], rtol=0, atol=0)


def test_ddpm_from_model_sigmas_and_round_sigma():
    model = tiny_ddpm()
    from_buffer = ddpm_sigmas(20, sigmas=model.sigmas)
    torch.testing.assert_close(from_buffer, ddpm_sigmas(20), rtol=1e-6, atol=0)
    # snapping a continuous schedule onto the model's representable levels
    sig = edm_sigmas(12, model.sigma_min, model.sigma_max, round_sigma=model.round_sigma)
    assert_schedule(sig, 12)
    table = model.sigmas.double()
    for level in sig[:-1]:
        assert bool(torch.isclose(table, level, rtol=0, atol=0).any())


def test_round_sigma_merging_levels_is_refused():
    with pytest.raises(ValueError, match="fewer distinct"):
        edm_sigmas(8, round_sigma=lambda s: s.round().clamp(min=1))


def test_snap_keeps_final_zero_and_validates():
    snapped = snap_sigmas(torch.tensor([4.0, 2.0, 1.0, 0.0]), lambda s: s * 1.5)
    torch.testing.assert_close(snapped, torch.tensor([6.0, 3.0, 1.5, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="shape"):
        snap_sigmas(torch.tensor([4.0, 2.0, 0.0]), lambda s: s[:1])


@pytest.mark.parametrize(
    "bad",
    [
        torch.tensor([1.0]),
        torch.tensor([2.0, 1.0]),
        torch.tensor([1.0, 2.0, 0.0]),
        torch.tensor([2.0, 2.0, 0.0]),
        torch.tensor([-1.0, 0.0]),
        torch.tensor([[2.0, 0.0]]),
        torch.tensor([float("inf"), 1.0, 0.0]),
    ],
)
def test_check_sigmas_rejects(bad):
    with pytest.raises(ValueError):
        check_sigmas(bad)


def test_argument_errors():
    with pytest.raises(ValueError, match=">= 1"):
        edm_sigmas(0)
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        ve_sigmas(4, sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(ValueError, match="eps_s"):
        vp_sigmas(4, eps_s=0.0)
    with pytest.raises(ValueError, match="at most 1000"):
        ddpm_sigmas(1001)
    with pytest.raises(ValueError, match="not both"):
        ddpm_sigmas(4, alphas_cumprod=ddpm_alphas_cumprod(), sigmas=torch.ones(3))
    with pytest.raises(ValueError, match="increase"):
        ddpm_sigmas(4, sigmas=torch.tensor([3.0, 2.0, 1.0]))


def test_default_schedule_per_model():
    defaults = {name: get_spec(name).schedule for name in MODEL_NAMES}
    assert defaults == {
        "sdm": "ddpm",
        "edm": "edm",
        "ve": "edm",  # EDM's rho = 7 clipped to the network's range (test_discretisation.py)
        "vp": "edm",
        "edm-l128": "edm",
        "edm-l64": "edm",
    }
    for name in defaults.values():
        assert_schedule(SCHEDULES[name](6), 6)
