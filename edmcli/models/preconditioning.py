"""Preconditionings that turn the raw UNet F into a denoiser D(x; sigma) (Karras et al. 2022).

    D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma))

| | c_skip | c_out | c_in | c_noise |
|---|---|---|---|---|
| EDM | sd^2/(s^2+sd^2) | s sd/sqrt(s^2+sd^2) | 1/sqrt(s^2+sd^2) | ln(s)/4 |
| VE | 1 | s | 1 | ln(s/2) |
| VP | 1 | -s | 1/sqrt(s^2+1) | (M-1) sigma^-1(s) |

Each preconditioning is a pure coefficient function plus a small module wrapping a
:class:`~edmcli.models.unet.SpadeUNet`. The modules share one interface that samplers use:
``forward(x, sigma, labels=None, spade_cache=None, *, class_labels=None, guidance=None) -> D(x)``,
``spade_cache(labels)``, ``round_sigma(sigma)`` and the supported ``sigma_min``/``sigma_max``.

Class conditioning and classifier-free guidance (networks with ``num_classes`` > 0):
``class_labels`` (N,) go to the UNet as NVlabs/edm passes its ``class_labels`` (None: the null
class). ``guidance`` w gives D = D_uncond + w (D_cond - D_uncond) (:func:`guide`): None or 1 is
the conditional denoiser, one network evaluation; 0 the unconditional one (null class), one
evaluation; any other w evaluates both branches as *one* forward of the doubled batch
(conditional first), with the SPADE gamma/beta of the label maps shared by both
(:meth:`~edmcli.models.unet.SpadeCache.tile`): two network evaluations per sample. The
combination is taken on the raw output F, where D is affine in F with the same coefficients for
both branches (EDM, VE, VP: exactly the formula above); for DDPM on eps, before x_0 is clipped,
with the learned variance of the conditional branch (GLIDE's and ADM's guidance).

:class:`DDPMEpsModel` is the SDM model: a DDPM with ``num_steps`` discrete timesteps whose network
predicts the noise eps from (x_t, t), and optionally (``learn_sigma``) the variance of each
reverse step. It exposes the ancestral-sampling quantities (``alphas_cumprod``, ``predict_eps``,
``predict_x0``, the posterior q(x_{t-1} | x_t, x_0), the learned variance) and, through
sigma(t) = sqrt((1 - abar_t) / abar_t), the same denoiser interface as the others
(x = x_t / sqrt(abar_t) lives in the sigma parameterisation). Its class defaults are the
original DDPM (Ho et al. 2020: linear betas 1e-4..0.02, fixed variance, no clipping), which is
what runs recorded before the preconditioning parameters existed were trained with; the
registry's ``sdm`` is the published SDM configuration (cosine schedule, learned variance,
x_0 clipped to [-1, 1]; :data:`edmcli.models.registry.ModelSpec.precond_defaults`).

All coefficients are computed in fp32 whatever the dtype the network runs in.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import nn

from edmcli.models.unet import SpadeCache, SpadeUNet

__all__ = [
    "DDPMEpsModel",
    "EDMPrecond",
    "NOISE_SCHEDULES",
    "VEPrecond",
    "VPPrecond",
    "guidance_branches",
    "guide",
    "guided_net_output",
    "cosine_alphas_cumprod",
    "ddpm_alphas_cumprod",
    "ddpm_betas",
    "edm_coefficients",
    "ve_coefficients",
    "vp_coefficients",
    "vp_sigma",
    "vp_sigma_deriv",
    "vp_sigma_inv",
]

Coefficients = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def edm_coefficients(sigma: torch.Tensor, sigma_data: float = 0.5) -> Coefficients:
    """``(c_skip, c_out, c_in, c_noise)`` of EDM at noise level ``sigma``."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    denom = sigma**2 + sigma_data**2
    c_skip = sigma_data**2 / denom
    c_out = sigma * sigma_data / denom.sqrt()
    c_in = 1 / denom.sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


def ve_coefficients(sigma: torch.Tensor) -> Coefficients:
    """``(c_skip, c_out, c_in, c_noise)`` of VE at noise level ``sigma``."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    one = torch.ones_like(sigma)
    return one, sigma, one, (0.5 * sigma).log()


def vp_sigma(t: torch.Tensor, beta_d: float = 19.9, beta_min: float = 0.1) -> torch.Tensor:
    """VP noise level sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)."""
    t = torch.as_tensor(t, dtype=torch.float32)
    return torch.expm1(0.5 * beta_d * t**2 + beta_min * t).sqrt()


def vp_sigma_inv(sigma: torch.Tensor, beta_d: float = 19.9, beta_min: float = 0.1) -> torch.Tensor:
    """Inverse of :func:`vp_sigma`: t such that sigma(t) = ``sigma``."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    return ((beta_min**2 + 2 * beta_d * torch.log1p(sigma**2)).sqrt() - beta_min) / beta_d


def vp_sigma_deriv(t: torch.Tensor, beta_d: float = 19.9, beta_min: float = 0.1) -> torch.Tensor:
    """d sigma / dt of the VP schedule."""
    t = torch.as_tensor(t, dtype=torch.float32)
    sigma = vp_sigma(t, beta_d, beta_min)
    return 0.5 * (beta_min + beta_d * t) * (sigma + 1 / sigma)


def vp_coefficients(
    sigma: torch.Tensor, beta_d: float = 19.9, beta_min: float = 0.1, M: int = 1000
) -> Coefficients:
    """``(c_skip, c_out, c_in, c_noise)`` of VP at noise level ``sigma``."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    c_skip = torch.ones_like(sigma)
    c_in = 1 / (sigma**2 + 1).sqrt()
    c_noise = (M - 1) * vp_sigma_inv(sigma, beta_d, beta_min)
    return c_skip, -sigma, c_in, c_noise


def ddpm_alphas_cumprod(
    num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
) -> torch.Tensor:
    """abar_t = prod_{s<=t} (1 - beta_s) for ``num_steps`` linear betas, computed in fp64 on
    the CPU."""
    betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64, device="cpu")
    return torch.cumprod(1 - betas, dim=0)


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


def cosine_alphas_cumprod(num_steps: int = 1000) -> torch.Tensor:
    """abar_t = prod_{s<=t} (1 - beta_s) of the cosine schedule (fp64, CPU): f(t + 1) / f(0)
    wherever no beta is clipped."""
    return torch.cumprod(1 - ddpm_betas(num_steps, "cosine"), dim=0)


def _per_sample_sigma(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """``sigma`` (scalar or one per sample) as an fp32 (N, 1, 1, 1) tensor on x's device."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1, 1, 1)
    if sigma.shape[0] not in (1, x.shape[0]):
        raise ValueError(
            f"sigma must be a scalar or hold one value per sample ({x.shape[0]}), got "
            f"{sigma.shape[0]} values."
        )
    return sigma.expand(x.shape[0], 1, 1, 1)


def guide(uncond: torch.Tensor, cond: torch.Tensor, w: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022): ``uncond + w (cond - uncond)``; w = 1 gives
    ``cond``, w = 0 ``uncond``, w > 1 extrapolates away from the unconditional estimate."""
    return torch.lerp(uncond, cond, float(w))


def guidance_branches(guidance: float | None) -> int:
    """Network evaluations per sample of one denoiser call with scale ``guidance``: 1 for None,
    1 (the conditional branch only) and 0 (the unconditional branch only), else 2."""
    if guidance is not None and not math.isfinite(guidance):
        raise ValueError(f"guidance must be a finite number, got {guidance}.")
    return 1 if guidance is None or guidance in (0.0, 1.0) else 2


def guided_net_output(
    net: SpadeUNet,
    x: torch.Tensor,
    noise_labels: torch.Tensor,
    labels: torch.Tensor | None,
    spade_cache: SpadeCache | None,
    class_labels: torch.Tensor | None,
    guidance: float | None,
    guided_channels: int | None = None,
) -> torch.Tensor:
    """The raw UNet output F in fp32, guided with scale ``guidance`` (module docstring).

    Two branches run as one forward of ``[x; x]`` with classes ``[class_labels; null]`` and the
    label maps' SPADE modulations tiled (a ``spade_cache`` of the N maps is tiled at this call; one
    already tiled by ``tile(2)`` for the 2N batch is used as is: build that once per batch).
    ``guided_channels``: only the first that many output channels are guided, the rest are the
    conditional branch's (DDPM's learned variance)."""
    if guidance_branches(guidance) == 1:
        if guidance == 0.0:
            class_labels = None  # the null class: the unconditional denoiser
        extra = {} if class_labels is None else {"class_labels": class_labels}
        return net(x, noise_labels, labels=labels, spade_cache=spade_cache, **extra).float()
    null = net.null_class
    if null is None:
        raise ValueError("guidance needs a network trained with classes (num_classes > 0).")
    if class_labels is None:
        raise ValueError("guidance needs class_labels (the conditional branch's classes).")
    n = x.shape[0]
    if spade_cache is not None and spade_cache.batch_size == n:
        spade_cache = spade_cache.tile(2)
    elif spade_cache is not None and (spade_cache.batch_size != 2 * n or spade_cache.tiles % 2):
        raise ValueError(
            f"a guided call on {n} samples takes a spade_cache of {n} label maps or one tiled "
            f"twice ({2 * n}), got one of {spade_cache.batch_size}."
        )
    class_labels = torch.as_tensor(class_labels, device=x.device)
    classes = torch.cat([class_labels, torch.full_like(class_labels, null)])
    out = net(
        torch.cat([x, x]),
        torch.cat([noise_labels, noise_labels]),
        labels=None if labels is None else torch.cat([labels, labels]),
        spade_cache=spade_cache,
        class_labels=classes,
    ).float()
    cond, uncond = out[:n], out[n:]
    if guided_channels is None or guided_channels >= out.shape[1]:
        return guide(uncond, cond, guidance)
    k = guided_channels
    return torch.cat([guide(uncond[:, :k], cond[:, :k], guidance), cond[:, k:]], dim=1)


class _Precond(nn.Module, ABC):
    """Shared plumbing: D(x) = c_skip x + c_out F(c_in x, c_noise)."""

    sigma_min: float
    sigma_max: float

    def __init__(self, net: SpadeUNet) -> None:
        super().__init__()
        if not isinstance(net, SpadeUNet):
            raise ValueError(f"net must be a SpadeUNet, got {type(net).__name__}.")
        self.net = net

    @abstractmethod
    def coefficients(self, sigma: torch.Tensor) -> Coefficients:
        """``(c_skip, c_out, c_in, c_noise)`` at ``sigma``."""

    def forward(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor | float,
        labels: torch.Tensor | None = None,
        spade_cache: SpadeCache | None = None,
        *,
        class_labels: torch.Tensor | None = None,
        guidance: float | None = None,
    ) -> torch.Tensor:
        """Denoised estimate D(x; sigma) in fp32; ``sigma`` is a scalar or one per sample;
        ``class_labels`` and ``guidance`` as in the module docstring."""
        x = x.float()
        sigma = _per_sample_sigma(sigma, x)
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        f = guided_net_output(
            self.net, c_in * x, c_noise.flatten(), labels, spade_cache, class_labels, guidance
        )
        return c_skip * x + c_out * f

    def spade_cache(self, labels: torch.Tensor, max_bytes: int | None = None) -> SpadeCache:
        """SPADE modulations of ``labels`` for reuse at every noise level."""
        return self.net.spade_cache(labels, max_bytes=max_bytes)

    def round_sigma(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """Continuous-time models support every sigma: identity."""
        return torch.as_tensor(sigma)


class EDMPrecond(_Precond):
    """EDM preconditioning (sigma_data 0.5; sigma in (0, inf), sampled 0.002..80)."""

    def __init__(
        self,
        net: SpadeUNet,
        sigma_data: float = 0.5,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
    ) -> None:
        super().__init__(net)
        if sigma_data <= 0 or not 0 < sigma_min < sigma_max:
            raise ValueError(
                f"EDMPrecond needs sigma_data > 0 and 0 < sigma_min < sigma_max, got "
                f"{sigma_data}, {sigma_min}, {sigma_max}."
            )
        self.sigma_data = sigma_data
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def coefficients(self, sigma: torch.Tensor) -> Coefficients:
        return edm_coefficients(sigma, self.sigma_data)


class VEPrecond(_Precond):
    """Variance-exploding preconditioning (sigma 0.02..100)."""

    def __init__(self, net: SpadeUNet, sigma_min: float = 0.02, sigma_max: float = 100.0) -> None:
        super().__init__(net)
        if not 0 < sigma_min < sigma_max:
            raise ValueError(
                f"VEPrecond needs 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}."
            )
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def coefficients(self, sigma: torch.Tensor) -> Coefficients:
        return ve_coefficients(sigma)


class VPPrecond(_Precond):
    """Variance-preserving preconditioning (beta_d 19.9, beta_min 0.1, eps_t 1e-5, M 1000);
    sigma ranges over sigma(eps_t)..sigma(1)."""

    def __init__(
        self,
        net: SpadeUNet,
        beta_d: float = 19.9,
        beta_min: float = 0.1,
        epsilon_t: float = 1e-5,
        M: int = 1000,
    ) -> None:
        super().__init__(net)
        if beta_d <= 0 or beta_min < 0 or not 0 < epsilon_t < 1 or M < 2:
            raise ValueError(
                f"VPPrecond needs beta_d > 0, beta_min >= 0, 0 < epsilon_t < 1 and M >= 2, got "
                f"{beta_d}, {beta_min}, {epsilon_t}, {M}."
            )
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.epsilon_t = epsilon_t
        self.M = M
        # Python floats (not tensors): also valid when the model is built on the meta device.
        self.sigma_min = math.sqrt(math.expm1(0.5 * beta_d * epsilon_t**2 + beta_min * epsilon_t))
        self.sigma_max = math.sqrt(math.expm1(0.5 * beta_d + beta_min))

    def sigma(self, t: torch.Tensor | float) -> torch.Tensor:
        return vp_sigma(t, self.beta_d, self.beta_min)

    def sigma_inv(self, sigma: torch.Tensor | float) -> torch.Tensor:
        return vp_sigma_inv(sigma, self.beta_d, self.beta_min)

    def sigma_deriv(self, t: torch.Tensor | float) -> torch.Tensor:
        return vp_sigma_deriv(t, self.beta_d, self.beta_min)

    def coefficients(self, sigma: torch.Tensor) -> Coefficients:
        return vp_coefficients(sigma, self.beta_d, self.beta_min, self.M)


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
        the variance is the conditional branch's (module docstring).

        The training loss and the learned-variance sampler call ``forward`` (so that a
        DistributedDataParallel wrapper or ``torch.compile`` sees the call) with one of:
        ``return_eps`` the predicted eps; ``return_raw`` (eps, v), v None without
        ``learn_sigma``; ``return_variance`` (D, v') with v' = (v + 1) / 2 the interpolation
        fraction of the learned variance (``learn_sigma`` only).
        """
        x = x.float()
        sigma = _per_sample_sigma(sigma, x)
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
