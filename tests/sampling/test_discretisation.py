"""The default discretisation of VE and VP: EDM's rho = 7 levels clipped to the network's range
(the authors' ``generatev2.py`` default), measured against the native VP levels on a 1-D
Gaussian mixture whose denoiser is known in closed form."""

from __future__ import annotations

import pytest
import torch

from edmcli.models.registry import MODEL_NAMES, build_model, get_spec
from edmcli.sampling.pipeline import model_sigmas
from edmcli.sampling.schedules import (
    EDM_SIGMA_MAX,
    EDM_SIGMA_MIN,
    ddpm_sigmas,
    network_sigmas,
    ve_sigmas,
    vp_sigmas,
)
from edmcli.sampling.solvers import heun

F64 = torch.float64


def meta_model(name: str):
    with torch.device("meta"):
        return build_model(name, "tiny")


@pytest.mark.parametrize(
    ("name", "lo", "hi"),
    [("ve", 0.02, 80.0), ("vp", EDM_SIGMA_MIN, 80.0), ("edm", 0.002, 80.0)],
)
@pytest.mark.parametrize("n", [2, 18, 50])
def test_default_schedule_is_rho7_over_the_clipped_range(name, lo, hi, n):
    net = meta_model(name)
    assert get_spec(name).schedule == "edm"
    assert lo == max(EDM_SIGMA_MIN, net.sigma_min) and hi == min(EDM_SIGMA_MAX, net.sigma_max)
    sig = model_sigmas(name, net, n)
    assert sig.dtype == F64 and sig.shape == (n + 1,) and sig[-1] == 0
    assert sig[0].item() == pytest.approx(hi, rel=1e-12)
    assert sig[-2].item() == pytest.approx(lo, rel=1e-12)
    steps = (sig[:-1] ** (1 / 7)).diff()  # rho = 7: uniform in sigma^(1/7)
    torch.testing.assert_close(steps, steps[:1].expand_as(steps), rtol=1e-9, atol=0)


def test_network_ranges_of_ve_and_vp():
    ve, vp = meta_model("ve"), meta_model("vp")
    assert (ve.sigma_min, ve.sigma_max) == (0.02, 100.0)
    # VP: sigma(eps_t = 1e-5) = 1.0e-3 < 0.002, sigma(1) = 152 > 80: EDM's range stands
    assert vp.sigma_min == pytest.approx(1.0e-3, rel=1e-3) and vp.sigma_max > 150


def test_native_schedules_stay_available_by_name():
    ve, vp = meta_model("ve"), meta_model("vp")
    torch.testing.assert_close(model_sigmas("ve", ve, 9, schedule="ve"), ve_sigmas(9))
    torch.testing.assert_close(model_sigmas("vp", vp, 9, schedule="vp"), vp_sigmas(9))
    sdm = build_model("sdm", "tiny", image_size=8, channel_mult=(1,), spade_hidden=8)
    torch.testing.assert_close(model_sigmas("sdm", sdm, 20), ddpm_sigmas(20, sigmas=sdm.sigmas))
    with pytest.raises(ValueError, match="discrete-time"):
        network_sigmas("ddpm", 5, ve)
    with pytest.raises(ValueError, match="Unknown schedule"):
        model_sigmas("ve", ve, 5, schedule="karras")
    assert {get_spec(n).schedule for n in MODEL_NAMES} == {"edm", "ddpm"}


class Mixture:
    """1-D Gaussian mixture per pixel: D(x; sigma) = sum_k r_k(x) (m_k + s_k^2 / (s_k^2 +
    sigma^2) (x - m_k)), r_k the posterior weights of the components under N(m_k, s_k^2 +
    sigma^2)."""

    def __init__(self, weights=(0.5, 0.5), means=(-0.5, 0.5), stds=(0.1, 0.1)):
        self.w, self.m, self.s = (torch.tensor(v, dtype=F64) for v in (weights, means, stds))

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        var = self.s**2 + sigma**2
        xs = x[..., None]
        log_r = self.w.log() - 0.5 * var.log() - 0.5 * (xs - self.m) ** 2 / var
        r = torch.softmax(log_r, dim=-1)
        return (r * (self.m + self.s**2 / var * (xs - self.m))).sum(-1)


def heun_error(data: Mixture, schedule, nfe: int, z: torch.Tensor, reference_steps=1500):
    """RMS error of Heun at ``nfe`` against a ``reference_steps`` Heun solve of the same ODE
    (same schedule family and range, same x_T)."""
    ref_sigmas = schedule(reference_steps)
    reference = heun(data.denoise, float(ref_sigmas[0]) * z, ref_sigmas)
    sigmas = schedule((nfe + 1) // 2)
    out = heun(data.denoise, float(sigmas[0]) * z, sigmas)
    return float((out - reference).pow(2).mean().sqrt())


def test_heun_with_the_new_default_beats_the_native_vp_schedule():
    vp = meta_model("vp")
    data = Mixture()
    z = torch.randn(4096, generator=torch.Generator().manual_seed(0), dtype=F64)

    def default(n):
        return network_sigmas("edm", n, vp)

    def native(n):
        return network_sigmas("vp", n, vp)

    errors = {
        nfe: (heun_error(data, default, nfe, z), heun_error(data, native, nfe, z))
        for nfe in (49, 99)
    }
    # measured: 49 NFE 0.0068 vs 0.0211, 99 NFE 0.0016 vs 0.0059
    for nfe, (new, old) in errors.items():
        assert new < 0.5 * old, (nfe, errors)
    assert errors[99][0] < errors[49][0] / 3  # second order: about 4x per doubling
