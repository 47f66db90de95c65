"""Easy Consistency Tuning on 1-D data whose answers are known.

For y ~ N(mu, s^2) the probability-flow ODE of EDM runs x(sigma) = mu + (x(T) - mu)
sqrt((s^2 + sigma^2) / (s^2 + T^2)), so the consistency function is f(x, sigma) = mu + (x - mu)
s / sqrt(s^2 + sigma^2): a student tuned from a pretrained denoiser must map x_80 = 80 z to
mu + s z in one step, where the teacher's one-step denoising collapses to the mean. On a two-mode
mixture the student must land where a fine Heun solution of its teacher's ODE lands.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from edmcli.models.consistency import ECTLoss, ECTSchedule, student_sigmas
from edmcli.models.diffusion_loss import EDMLoss
from edmcli.models.preconditioning import edm_coefficients
from edmcli.sampling.schedules import edm_sigmas
from edmcli.sampling.solvers import heun


class Toy(nn.Module):
    """EDM-preconditioned MLP on scalars: D(x; sigma) = c_skip x + c_out F(c_in x, c_noise)."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.Linear(2, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                               nn.Linear(width, 1))  # fmt: skip

    def forward(self, x, sigma, labels=None, **_):
        sigma = sigma.reshape(-1, 1, 1, 1).float()
        c_skip, c_out, c_in, c_noise = edm_coefficients(sigma)
        inp = torch.cat([(c_in * x).flatten(1), c_noise.flatten(1)], dim=1)
        return c_skip * x + c_out * self.f(inp).view_as(x)


def _fit(net, loss_fn, draw, steps, lr, with_step=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    labels, sector = torch.zeros(256, 1, 1, dtype=torch.long), torch.ones(256, 1, 1, 1)
    for step in range(steps):
        y = draw(256, g)
        extra = (step,) if with_step else ()
        loss, _ = loss_fn(net, y, labels, sector, *extra, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net


def _gaussian(mu, s):
    return lambda n, g: mu + s * torch.randn(n, 1, 1, 1, generator=g)


def _mixture(n, g):
    sign = torch.where(torch.rand(n, 1, 1, 1, generator=g) < 0.5, -1.0, 1.0)
    return 0.5 * sign + 0.08 * torch.randn(n, 1, 1, 1, generator=g)


def _tune(teacher, draw, steps=2400, seed=1):
    student = Toy()
    student.load_state_dict(teacher.state_dict())  # initialised from the teacher
    return _fit(student, ECTLoss(ECTSchedule(total_steps=steps)), draw, steps, 1e-3, True, seed)


@torch.no_grad()
def _one_step(net, z, sigma=80.0):
    return net(sigma * z, torch.full((len(z),), sigma))


def test_the_schedule_starts_as_denoising_and_halves_the_gap_per_stage():
    s = ECTSchedule(total_steps=800)
    t = torch.tensor([0.01, 0.5, 3.0, 40.0])
    assert torch.all(s.pair(t, 0) == 0)  # stage 0: r = 0, the teacher's denoising loss
    gaps = [float(((t - s.pair(t, step)) / t)[-1]) for step in (500, 600, 700)]
    assert gaps[0] == pytest.approx(2 * gaps[1]) and gaps[1] == pytest.approx(2 * gaps[2])
    assert s.stage(799) == 7 and s.stage(0) == 0
    with pytest.raises(ValueError, match="q > 1"):
        ECTSchedule(total_steps=10, q=1.0).validate()
    assert student_sigmas(1, 80, 0.5) == [80.0]
    two = student_sigmas(2, 80, 0.5)
    assert two[0] == 80.0 and 0.002 < two[1] < 80 and len(student_sigmas(4, 80, 0.5)) == 4


def test_tuned_student_is_the_closed_form_consistency_function_of_gaussian_data():
    torch.manual_seed(0)
    mu, s = 0.3, 0.4
    draw = _gaussian(mu, s)
    teacher = _fit(Toy(), EDMLoss(), draw, 1500, 2e-3)
    student = _tune(teacher, draw)
    z = torch.linspace(-2, 2, 41).view(-1, 1, 1, 1)
    exact = mu + s * z * 80 / math.sqrt(s**2 + 80**2)
    err_student = float((_one_step(student, z) - exact).abs().max())
    err_teacher = float((_one_step(teacher, z) - exact).abs().max())
    assert err_teacher > 0.7  # one denoising step at sigma 80 collapses to the mean
    assert err_student < 0.1, (err_student, err_teacher)
    x1 = mu + z * math.sqrt(s**2 + 1.0)  # and at sigma = 1
    exact1 = mu + (x1 - mu) * s / math.sqrt(s**2 + 1.0)
    with torch.no_grad():
        got1 = student(x1, torch.ones(len(z)))
    assert float((got1 - exact1).abs().max()) < 0.1


def test_tuned_student_lands_where_a_fine_solution_of_its_teachers_ode_lands():
    torch.manual_seed(0)
    teacher = _fit(Toy(), EDMLoss(), _mixture, 2000, 2e-3)
    student = _tune(teacher, _mixture, steps=3000)
    z = torch.randn(400, 1, 1, 1, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        fine = heun(lambda x, sig: teacher(x, sig.expand(len(x))), 80 * z, edm_sigmas(128))
    err_student = (_one_step(student, z) - fine).abs().flatten()
    err_teacher = (_one_step(teacher, z) - fine).abs().flatten()
    assert float(err_teacher.median()) > 0.3
    assert float(err_student.median()) < 0.08, float(err_student.median())
    assert float((err_student < 0.2).float().mean()) > 0.9
