"""The DDPM model of SDM: discrete noise schedules and the eps-predicting network around them.

:class:`DDPMEpsModel` is a DDPM with ``num_steps`` discrete timesteps whose network predicts the
noise eps from (x_t, t), and optionally (``learn_sigma``) the variance of each reverse step. It
exposes the ancestral-sampling quantities (``alphas_cumprod``, ``predict_eps``, ``predict_x0``,
the posterior q(x_{t-1} | x_t, x_0), the learned variance) and, through
sigma(t) = sqrt((1 - abar_t) / abar_t), the denoiser interface of the preconditionings of
:mod:`edmcli.models.preconditioning` (x = x_t / sqrt(abar_t) lives in the sigma
parameterisation). Its class defaults are the original DDPM (Ho et al. 2020: linear betas
1e-4..0.02, fixed variance, no clipping), which is what runs recorded before the preconditioning
parameters existed were trained with; the registry's ``sdm`` is the published SDM configuration
(cosine schedule, learned variance, x_0 clipped to [-1, 1];
:data:`edmcli.models.registry.ModelSpec.precond_defaults`). Classifier-free guidance acts on eps
(:mod:`edmcli.models.guidance`).

The schedules (:func:`ddpm_betas`, :func:`ddpm_alphas_cumprod`) are computed in fp64 on the CPU;
the model's buffers and outputs are fp32 whatever the dtype the network runs in.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from edmcli.models.guidance import guided_net_output
from edmcli.models.preconditioning import per_sample_sigma
from edmcli.models.unet import SpadeCache, SpadeUNet

__all__ = [
    "DDPMEpsModel",
    "NOISE_SCHEDULES",
    "ddpm_alphas_cumprod",
    "ddpm_betas",
]

COSINE_OFFSET = 0.008  # s of the cosine schedule (Nichol & Dhariwal 2021)
MAX_BETA = 0.999  # the cosine schedule's betas are clipped to this (its last one would be 1)
NOISE_SCHEDULES = ("linear", "cosine")


def _cosine_f(t: torch.Tensor, num_steps: int, s: float) -> torch.Tensor:
    return torch.cos((t / num_steps + s) / (1 + s) * (math.pi / 2)) ** 2


def ddpm_betas(
    num_steps: int = 1000,
    noise_schedule: str = "linear",
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
) -> torch.Tensor:
    """The ``num_steps`` betas (fp64, CPU) of a ``"linear"`` (``beta_start..beta_end``) or
    ``"cosine"`` schedule; index i is the step from x_i to x_{i+1} of the 1-based chain.

    Cosine: abar(t) = f(t) / f(0), f(t) = cos^2(((t / T) + s) / (1 + s) pi / 2), s = 0.008, and
    beta = 1 - abar(i + 1) / abar(i) clipped to at most 0.999 (the last one would be 1).
    """
    if noise_schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64, device="cpu")
    if noise_schedule == "cosine":
        steps = torch.arange(num_steps + 1, dtype=torch.float64, device="cpu")
        f = _cosine_f(steps, num_steps, COSINE_OFFSET)
        return (1 - f[1:] / f[:-1]).clamp(max=MAX_BETA)
    raise ValueError(
        f"noise_schedule must be one of {', '.join(NOISE_SCHEDULES)}, got {noise_schedule!r}."
    )


def ddpm_alphas_cumprod(
    num_steps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    noise_schedule: str = "linear",
) -> torch.Tensor:
    """abar_t = prod_{s<=t} (1 - beta_s) of :func:`ddpm_betas` (fp64, CPU); for the cosine
    schedule f(t + 1) / f(0) wherever no beta is clipped."""
    return torch.cumprod(1 - ddpm_betas(num_steps, noise_schedule, beta_start, beta_end), dim=0)


class DDPMEpsModel(nn.Module):
    """DDPM (SDM): ``num_steps`` timesteps, the network predicts eps (and, with ``learn_sigma``,
    the variance of each reverse step) from (x_t, t).

    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, t in 0..num_steps-1. With
    sigma_t = sqrt((1 - abar_t) / abar_t), x = x_t / sqrt(abar_t) = x_0 + sigma_t eps, so
    ``forward(x, sigma)`` is a denoiser like the other preconditionings (sigma is rounded to the
    nearest of the discrete ``sigmas`` for the timestep fed to the network).

    Args:
        net: the UNet; ``out_channels`` = ``in_channels`` (eps), twice that with ``learn_sigma``
            (eps, then the variance output v).
        num_steps: timesteps T.
        beta_start, beta_end: the betas of the ``"linear"`` schedule.
        noise_schedule: ``"linear"`` (Ho et al. 2020) or ``"cosine"`` (Nichol & Dhariwal 2021,
            :func:`ddpm_betas`).
        learn_sigma: the network also outputs v, and the reverse step t -> t-1 has the variance
            Sigma = exp(v' log beta_t + (1 - v') log beta~_t), v' = (v + 1) / 2, beta~_t the
            posterior variance (its log at t = 0 taken from t = 1, where it is 0).
        clip_denoised: the denoised estimate x_0 is clipped to [-1, 1] (pixel models).
    """

    def __init__(
        self,
        net: SpadeUNet,
        num_steps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        noise_schedule: str = "linear",
        learn_sigma: bool = False,
        clip_denoised: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(net, SpadeUNet):
            raise ValueError(f"net must be a SpadeUNet, got {type(net).__name__}.")
        self.check_params(num_steps, beta_start, beta_end, noise_schedule, learn_sigma)
        wanted = self.net_out_channels(net.config.in_channels, learn_sigma=learn_sigma)
        if net.config.out_channels != wanted:
            raise ValueError(
                f"DDPMEpsModel with learn_sigma={learn_sigma} needs a network with "
                f"{wanted} output channels for {net.config.in_channels} input channel(s), got "
                f"{net.config.out_channels}."
            )
        self.net = net
        self.num_steps = num_steps
        self.beta_start = beta_start
        self.beta_end = beta_end
        self.noise_schedule = noise_schedule
        self.learn_sigma = bool(learn_sigma)
        self.clip_denoised = bool(clip_denoised)
        betas = ddpm_betas(num_steps, noise_schedule, beta_start, beta_end)
        abar = torch.cumprod(1 - betas, dim=0)
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        sigmas = ((1 - abar) / abar).sqrt()
        posterior_var = betas * (1 - abar_prev) / (1 - abar)  # beta~_t; 0 at t = 0
        self.sigma_min = float(sigmas[0])
        self.sigma_max = float(sigmas[-1])
        device = torch.empty(0).device  # honours a torch.device(...) context, e.g. meta
        persistent = {"betas": betas, "alphas_cumprod": abar, "sigmas": sigmas}
        derived = {  # recomputed from the schedule, so not part of a checkpoint
            "alphas_cumprod_prev": abar_prev,
            "log_betas": betas.log(),
            "log_posterior_variance": torch.cat([posterior_var[1:2], posterior_var[1:]]).log(),
            "posterior_coef_x0": abar_prev.sqrt() * betas / (1 - abar),
            "posterior_coef_xt": (1 - betas).sqrt() * (1 - abar_prev) / (1 - abar),
            "eps_coef": betas / (1 - abar).sqrt(),
            "recip_sqrt_alphas": (1 - betas).rsqrt(),
        }
        for name, value in persistent.items():
            self.register_buffer(name, value.float().to(device))
        for name, value in derived.items():
            self.register_buffer(name, value.float().to(device), persistent=False)

    @staticmethod
    def check_params(
        num_steps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        noise_schedule: str = "linear",
        learn_sigma: bool = False,
        clip_denoised: bool = False,
    ) -> None:
        """ValueError with one sentence for parameters the model cannot be built with."""
        if num_steps < 2 or not 0 < beta_start < beta_end < 1:
            raise ValueError(
                f"DDPMEpsModel needs num_steps >= 2 and 0 < beta_start < beta_end < 1, got "
                f"{num_steps}, {beta_start}, {beta_end}."
            )
        if noise_schedule not in NOISE_SCHEDULES:
            raise ValueError(
                f"noise_schedule must be one of {', '.join(NOISE_SCHEDULES)}, got "
                f"{noise_schedule!r}."
            )
        for name, value in (("learn_sigma", learn_sigma), ("clip_denoised", clip_denoised)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be true or false, got {value!r}.")

    @staticmethod
    def net_out_channels(in_channels: int, learn_sigma: bool = False, **_: object) -> int:
        """Output channels the UNet needs: eps, plus v with ``learn_sigma``."""
        return in_channels * (2 if learn_sigma else 1)

    def _timesteps(self, t: torch.Tensor | int, n: int, device: torch.device) -> torch.Tensor:
        t = torch.as_tensor(t, device=device)
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            raise ValueError(f"t must hold integer timesteps, got dtype {t.dtype}.")
        if t.numel() not in (1, n):
            raise ValueError(
                f"t must be a scalar or hold one timestep per sample ({n}), got {t.numel()}."
            )
        checkable = t.device.type == "cpu" and not torch.compiler.is_compiling()
        if checkable and (int(t.min()) < 0 or int(t.max()) >= self.num_steps):
            raise ValueError(f"t must lie in 0..{self.num_steps - 1}, found {t.min()}..{t.max()}.")
        return t.reshape(-1).expand(n).long()

    def _at(self, table: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return table.float()[t].reshape(-1, 1, 1, 1)

    def _abar(self, t: torch.Tensor) -> torch.Tensor:
        return self._at(self.alphas_cumprod, t)

    def sigma(self, t: torch.Tensor | int) -> torch.Tensor:
        """sigma_t = sqrt((1 - abar_t) / abar_t) of integer timesteps ``t``."""
        return self.sigmas[torch.as_tensor(t, device=self.sigmas.device)]

    def timestep(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """Index of the discrete sigma nearest (in log) to ``sigma``."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=self.sigmas.device)
        dist = (sigma.reshape(-1, 1).log() - self.sigmas.float().log().reshape(1, -1)).abs()
        return dist.argmin(dim=1).reshape(sigma.shape)

    def round_sigma(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """The discrete sigma nearest to ``sigma``."""
        return self.sigmas[self.timestep(sigma)]

    def spade_cache(self, labels: torch.Tensor, max_bytes: int | None = None) -> SpadeCache:
        """SPADE modulations of ``labels`` for reuse at every timestep."""
        return self.net.spade_cache(labels, max_bytes=max_bytes)

    def _raw(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor | int,
        labels: torch.Tensor | None,
        spade_cache: SpadeCache | None,
        class_labels: torch.Tensor | None = None,
        guidance: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(eps, v) in fp32; v is None without ``learn_sigma``. With ``guidance``, eps is the
        guided one and v the conditional branch's."""
        t = self._timesteps(t, x_t.shape[0], x_t.device)
        out = guided_net_output(
            self.net, x_t, t.float(), labels, spade_cache, class_labels, guidance,
            guided_channels=self.net.config.in_channels,
        )  # fmt: skip
        if not self.learn_sigma:
            return out, None
        eps, v = out.chunk(2, dim=1)
        return eps, v

    def predict_eps(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor | int,
        labels: torch.Tensor | None = None,
        spade_cache: SpadeCache | None = None,
        *,
        class_labels: torch.Tensor | None = None,
        guidance: float | None = None,
    ) -> torch.Tensor:
        """Predicted noise eps(x_t, t) in fp32 (guided with ``guidance``)."""
        return self._raw(x_t, t, labels, spade_cache, class_labels, guidance)[0]

    def x0_from_eps(self, x_t: torch.Tensor, t: torch.Tensor | int, eps: torch.Tensor):
        """x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
        abar = self._abar(self._timesteps(t, x_t.shape[0], x_t.device))
        return (x_t.float() - (1 - abar).sqrt() * eps) / abar.sqrt()

    def predict_x0(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor | int,
        labels: torch.Tensor | None = None,
        spade_cache: SpadeCache | None = None,
        *,
        class_labels: torch.Tensor | None = None,
        guidance: float | None = None,
    ) -> torch.Tensor:
        """Predicted clean sample x_0 from (x_t, t) (not clipped)."""
        eps = self.predict_eps(
            x_t, t, labels, spade_cache, class_labels=class_labels, guidance=guidance
        )
        return self.x0_from_eps(x_t, t, eps)

    def posterior_mean(
        self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | int
    ) -> torch.Tensor:
        """Mean of q(x_{t-1} | x_t, x_0): sqrt(abar_{t-1}) beta_t / (1 - abar_t) x_0
        + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) x_t (x_0 itself at t = 0)."""
        t = self._timesteps(t, x_t.shape[0], x_t.device)
        return self._at(self.posterior_coef_x0, t) * x0 + self._at(self.posterior_coef_xt, t) * x_t

    def mean_from_eps(
        self, x_t: torch.Tensor, t: torch.Tensor | int, eps: torch.Tensor
    ) -> torch.Tensor:
        """The posterior mean at x_0 = x0_from_eps(x_t, t, eps), in its stable form
        (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t)."""
        t = self._timesteps(t, x_t.shape[0], x_t.device)
        return self._at(self.recip_sqrt_alphas, t) * (x_t - self._at(self.eps_coef, t) * eps)

    def posterior_log_variance(self, t: torch.Tensor | int, n: int = 1) -> torch.Tensor:
        """log beta~_t, (n, 1, 1, 1), with the t = 0 value (log 0) replaced by t = 1's."""
        t = self._timesteps(t, n, self.betas.device)
        return self._at(self.log_posterior_variance, t)

    def log_variance(self, t: torch.Tensor | int, frac: torch.Tensor) -> torch.Tensor:
        """log Sigma = frac log beta_t + (1 - frac) log beta~_t of the reverse step from t; ``frac``
        is v' = (v + 1) / 2 of the variance output v (1: beta_t, 0: beta~_t)."""
        t = self._timesteps(t, frac.shape[0], frac.device)
        log_small = self._at(self.log_posterior_variance, t)
        return frac * self._at(self.log_betas, t) + (1 - frac) * log_small

    def forward(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor | float,
        labels: torch.Tensor | None = None,
        spade_cache: SpadeCache | None = None,
        return_eps: bool = False,
        return_raw: bool = False,
        return_variance: bool = False,
        *,
        class_labels: torch.Tensor | None = None,
        guidance: float | None = None,
    ):
        """Denoiser D(x; sigma) = x - sigma eps(x / sqrt(1 + sigma^2), t(sigma)), fp32, clipped
        to [-1, 1] with ``clip_denoised``; with ``guidance``, eps is guided before the clip and
        the variance is the conditional branch's (:mod:`edmcli.models.guidance`).

        The training loss and the learned-variance sampler call ``forward`` (so that a
        DistributedDataParallel wrapper or ``torch.compile`` sees the call) with one of:
        ``return_eps`` the predicted eps; ``return_raw`` (eps, v), v None without
        ``learn_sigma``; ``return_variance`` (D, v') with v' = (v + 1) / 2 the interpolation
        fraction of the learned variance (``learn_sigma`` only).
        """
        x = x.float()
        sigma = per_sample_sigma(sigma, x)
        t = self.timestep(sigma.flatten()).to(x.device)
        eps, v = self._raw(
            x / (1 + sigma**2).sqrt(), t, labels, spade_cache, class_labels, guidance
        )
        if return_eps:
            return eps
        if return_raw:
            return eps, v
        denoised = x - sigma * eps
        if self.clip_denoised:
            denoised = denoised.clamp(-1.0, 1.0)
        if return_variance:
            if v is None:
                raise ValueError("return_variance needs a DDPMEpsModel with learn_sigma=True.")
            return denoised, (v + 1) / 2
        return denoised
