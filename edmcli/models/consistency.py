"""Consistency tuning of an EDM denoiser into a few-step student (Easy Consistency Tuning, Geng et
al. 2024; consistency models, Song et al. 2023).

A consistency function maps any point x_t of a probability-flow ODE trajectory to the trajectory's
end, f(x_t, t) = x_0, with f(x, 0) = x. An EDM denoiser D(x; sigma) = c_skip x + c_out F has that
boundary already (c_skip(0) = 1, c_out(0) = 0), so the student *is* the teacher's network,
initialised from the teacher's weights and tuned so that its outputs at two levels r < t of the
same noisy image agree:

    x_t = y + t n,   x_r = y + r n   (one image y, one noise n),
    loss = mean over samples of  e / sqrt(e.detach() + c^2),   e = m / (t - r),
    m = in-sector mean of (D(x_t; t) - stopgrad D(x_r; r))^2.

The target is the student's own output at the smaller level under no gradient (consistency
*training* from data: it needs no ODE solver and no teacher calls, and as t - r -> 0 its fixed
point is the consistency function of the data's ODE). 1 / (t - r) is ECT's weight w(t, r);
dividing by sqrt(e) is ECT's adaptive weighting with p = 1/2 (a pseudo-Huber distance in effect).

Levels (ECT): ln t ~ N(P_mean, P_std^2) (-1.1, 2.0), clipped to [sigma_min, sigma_max]; r follows
from the tuning's stage a = floor(step / (total / stages)):

    r / t = 1 - n(t) / q^a,   n(t) = 1 + k sigmoid(-b t),   r clipped to >= 0,

so stage 0 (r = 0, the target is the clean image y) is the teacher's own denoising loss and each
later stage halves (q = 2) the gap t - r: the student moves from the teacher towards consistency.

Sampling a student: :func:`edmcli.sampling.solvers.consistency`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from edmcli.models.diffusion_loss import LossOutput, _check_images, _class_kwargs, sector_mask_like

__all__ = ["ECTLoss", "ECTSchedule", "student_sigmas"]


@dataclass(frozen=True)
class ECTSchedule:
    """The levels of Easy Consistency Tuning (module docstring).

    Args:
        total_steps: the tuning's length in optimiser steps.
        stages: how many times the gap t - r is divided by ``q`` over the run (ECT: 8).
        q: the gap's divisor per stage.
        k, b: n(t) = 1 + k sigmoid(-b t) (ECT: 8, 1): larger gaps at small t.
        p_mean, p_std: ln t ~ N(p_mean, p_std^2) (ECT: -1.1, 2.0).
        sigma_min, sigma_max: the range of t.
        huber_c: c of the adaptive weighting (ECT's adaptive weight uses a small constant).
    """

    total_steps: int
    stages: int = 8
    q: float = 2.0
    k: float = 8.0
    b: float = 1.0
    p_mean: float = -1.1
    p_std: float = 2.0
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    huber_c: float = 1e-4

    def validate(self) -> ECTSchedule:
        if isinstance(self.total_steps, bool) or int(self.total_steps) < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps!r}.")
        if int(self.stages) < 1 or self.q <= 1:
            raise ValueError(f"stages must be >= 1 and q > 1, got {self.stages}, {self.q}.")
        if not 0 < self.sigma_min < self.sigma_max or self.p_std <= 0 or self.huber_c < 0:
            raise ValueError(
                "need 0 < sigma_min < sigma_max, p_std > 0 and huber_c >= 0, got "
                f"{self.sigma_min}, {self.sigma_max}, {self.p_std}, {self.huber_c}."
            )
        return self

    def stage(self, step: int) -> int:
        """The stage a of optimiser step ``step`` (0-based), 0..stages - 1."""
        per = max(1, math.ceil(self.total_steps / self.stages))
        return min(int(step) // per, self.stages - 1)

    def pair(self, t: torch.Tensor, step: int) -> torch.Tensor:
        """r for levels ``t`` at step ``step``: t (1 - n(t) / q^a), at least 0."""
        n = 1 + self.k * torch.sigmoid(-self.b * t)
        r = t * (1 - n / self.q ** self.stage(step))
        return r.clamp_min(0.0)

    def record(self) -> dict:
        return asdict(self)


class ECTLoss:
    """The consistency-tuning loss of :mod:`edmcli.models.consistency`, called like the
    diffusion losses plus the optimiser ``step``:
    ``loss_fn(net, images, labels, sector, step, generator=None, *, class_labels=None)``."""

    def __init__(self, schedule: ECTSchedule) -> None:
        self.schedule = schedule.validate()

    def levels(
        self, n: int, step: int, like: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(t, r), each (n, 1, 1, 1) float32 on ``like``'s device."""
        s = self.schedule
        z = torch.randn((n, 1, 1, 1), generator=generator, device=like.device)
        t = (s.p_mean + s.p_std * z).exp().clamp(s.sigma_min, s.sigma_max)
        return t, s.pair(t, step)

    def __call__(
        self,
        net: nn.Module,
        images: torch.Tensor,
        labels: torch.Tensor,
        sector: torch.Tensor,
        step: int,
        generator: torch.Generator | None = None,
        *,
        class_labels: torch.Tensor | None = None,
    ) -> LossOutput:
        _check_images(images)
        y = images.float()
        mask = sector_mask_like(sector, y)
        t, r = self.levels(y.shape[0], step, y, generator)
        noise = torch.randn(y.shape, generator=generator, device=y.device)
        extra = _class_kwargs(class_labels)
        student = net(y + t * noise, t.flatten(), labels, **extra).float()
        with torch.no_grad():
            inside = r.flatten() > 0
            target = y.clone()  # D(y; 0) = y: the boundary, no call needed
            if bool(inside.any()):
                idx = inside.nonzero().flatten()
                sub = {k: v[idx] for k, v in extra.items()}
                target[idx] = net(y[idx] + r[idx] * noise[idx], r[idx].flatten(), labels[idx],
                                  **sub).float()  # fmt: skip
        count = mask.flatten(1).sum(1).clamp_min(1) * y.shape[1]
        m = (((student - target) ** 2) * mask).flatten(1).sum(1) / count
        e = m / (t - r).flatten()
        c2 = self.schedule.huber_c**2
        loss = (e / (e.detach() + c2).sqrt()).mean()
        logs = {
            "loss": loss.detach(),
            "mse": m.detach().mean(),
            "gap": (t - r).detach().div(t).mean(),
        }
        return loss, logs


def student_sigmas(nfe: int, sigma_max: float, sigma_data: float, rho: float = 7.0) -> list[float]:
    """The levels at which a student is evaluated for ``nfe`` steps (the first at ``sigma_max``):
    the first ``nfe`` of EDM's rho-schedule of ``nfe + 1`` levels from ``sigma_max`` down to
    ``sigma_data / 250`` (0.002 at EDM's sigma_data 0.5), so the last evaluation sees the noise
    level a step of the teacher's schedule would hand it."""
    if isinstance(nfe, bool) or int(nfe) < 1:
        raise ValueError(f"nfe must be >= 1, got {nfe!r}.")
    lo = sigma_data / 250
    if nfe == 1:
        return [float(sigma_max)]
    ramp = [i / nfe for i in range(nfe + 1)]
    hi_r, lo_r = sigma_max ** (1 / rho), lo ** (1 / rho)
    levels = [(hi_r + u * (lo_r - hi_r)) ** rho for u in ramp]
    return [float(s) for s in levels[:nfe]]
