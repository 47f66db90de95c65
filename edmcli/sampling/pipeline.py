"""From label maps to images with a trained model: schedule, start noise, solver, decoding.

Randomness is per sample: sample k draws its start noise from its own CPU ``torch.Generator``
seeded with ``seeds[k]`` (the same start on every device), and any stochastic step's noise from
its own generator on the sampling device, seeded with the same ``seeds[k]`` (on the CPU that is
the start's generator itself, continuing its stream, as it always was), so an image depends only
on its label map, seed and device type, never on the batch it was drawn in (up to floating-point
noise of batched kernels), and an ancestral step costs no host → device copy. SPADE γ/β are
computed once per batch and reused at every network evaluation.

A model that learns its variance (SDM, ``learn_sigma``) is sampled by ``ddpm_ancestral`` with
that variance unless the solver options name another (``variance="small"`` or ``"large"``).

A class-conditional model takes one class per sample and a guidance scale w
(:mod:`edmcli.models.guidance`: D = D_uncond + w (D_cond − D_uncond); Ho & Salimans' w is w − 1):
w = 1 (the default) is the conditional denoiser alone, no guidance, one network evaluation per
denoiser call; w = 0 the unconditional one; any other w runs both branches as one
forward of the doubled batch, with the SPADE γ/β cache built once per batch and tiled once for
both: :func:`~edmcli.models.guidance.guidance_branches` per denoiser call, 2 per sample.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from edmcli.data.labels import sector_mask
from edmcli.models.guidance import guidance_branches
from edmcli.models.registry import get_spec
from edmcli.sampling.schedules import network_sigmas
from edmcli.sampling.solvers import SOLVERS


def model_sigmas(
    model_name: str, net: nn.Module, steps: int, schedule: str | None = None
) -> torch.Tensor:
    """σ schedule ``schedule`` (default: the model's, :attr:`ModelSpec.schedule`) for ``net``
    with ``steps`` levels (+ final 0), float64 on the CPU (:func:`network_sigmas`)."""
    return network_sigmas(schedule or get_spec(model_name).schedule, steps, net)


def solver_options_for(net: nn.Module, solver: str, options: dict | None) -> dict:
    """``options`` plus ``variance="learned"`` for ``ddpm_ancestral`` on a model that learns
    its variance (unless ``options`` names a variance)."""
    options = dict(options or {})
    if solver == "ddpm_ancestral" and getattr(net, "learn_sigma", False):
        options.setdefault("variance", "learned")
    return options


class SampleNoise:
    """Per-sample Gaussian noise streams: ``draw()`` the start noise once, then ``noise(i)`` for
    each stochastic step i.

    Sample k's start noise comes from a CPU generator seeded with ``seeds[k]`` (copied to the
    device once per batch, so a deterministic solver's image does not depend on the device), its
    step noise from a generator on ``device`` seeded with ``seeds[k]`` and drawn there (no
    host → device copy per step). On the CPU both are one generator, one stream per sample: the
    numbers are those of a single CPU generator per sample (bit-identical to drawing every step
    on the CPU and copying)."""

    def __init__(self, seeds: Sequence[int], shape: tuple[int, ...], device: torch.device | str):
        self.shape, self.device = tuple(shape), torch.device(device)
        seeds = [int(s) for s in seeds]
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        if self.device.type == "cpu":
            self.step_generators = self.generators
        else:
            self.step_generators = [
                torch.Generator(device=self.device).manual_seed(s) for s in seeds
            ]

    def draw(self) -> torch.Tensor:
        """The start noise (len(seeds), *shape), drawn on the CPU, on ``device``."""
        parts = [torch.randn(self.shape, generator=g) for g in self.generators]
        return torch.stack(parts).to(self.device)

    def __call__(self, _step: int) -> torch.Tensor:
        """Fresh step noise (len(seeds), *shape), drawn on ``device``."""
        parts = [
            torch.randn(self.shape, generator=g, device=self.device) for g in self.step_generators
        ]
        return torch.stack(parts)


def start_scale(model_name: str, sigma0: float) -> float:
    """x_T = scale · z: σ₀ for the continuous models; √(1 + σ₀²) for DDPM, whose textbook start
    x_T ~ N(0, I) in its own scaling is x_T/√ᾱ_T in the σ parameterisation."""
    discrete = get_spec(model_name).schedule == "ddpm"
    return (1.0 + sigma0**2) ** 0.5 if discrete else sigma0


def to_image(x: torch.Tensor, labels: torch.Tensor, decode: Callable | None = None) -> torch.Tensor:
    """Model space → images in [0, 1], zero outside the sector: pixels from [−1, 1], latents
    through the Γ-VAE decoder (``decode(latent, sector, labels)``)."""
    sector = sector_mask(labels)
    if decode is None:
        image = (x.float() + 1) / 2
    else:
        image = decode(x.float(), sector, labels)
    return image.clamp(0, 1) * sector


OUTSIDE_VALUE = -1.0  # model space outside the sector: black pixels, or a zero Γ-VAE latent
# (a run with normalised latents has its own: DiffusionSettings.norm.outside_value)


def pin(
    denoised: torch.Tensor, inside: torch.Tensor, value: float | tuple[float, ...] = OUTSIDE_VALUE
) -> torch.Tensor:
    """``denoised`` with every pixel outside the (N, 1, h, w) ``inside`` mask set to ``value``
    (one number, or one per channel)."""
    fill = torch.as_tensor(value, dtype=denoised.dtype, device=denoised.device)
    return torch.where(inside, denoised, fill.reshape(1, -1, 1, 1).expand_as(denoised))


def generate(
    net: nn.Module,
    model_name: str,
    labels: torch.Tensor,
    seeds: Sequence[int],
    net_size: int,
    *,
    solver: str,
    steps: int,
    decode: Callable | None = None,
    solver_options: dict | None = None,
    use_cache: bool = True,
    schedule: str | None = None,
    pin_outside: bool = False,
    outside_value: float | tuple[float, ...] = OUTSIDE_VALUE,
    channels: int = 1,
    class_labels: torch.Tensor | None = None,
    guidance: float | None = None,
    levels: Sequence[float] | None = None,
) -> torch.Tensor:
    """Images in [0, 1] (N, 1, H, W) for label maps (N, H, W), one seed per sample.

    ``levels``: the positive noise levels to sample at (a consistency student's recorded ones;
    the final 0 is added), instead of ``steps`` levels of ``schedule``.

    ``class_labels`` (N,): the class of each sample for a class-conditional ``net`` (None: the
    null class); ``guidance``: the classifier-free guidance scale w (None: 1, the conditional
    denoiser; module docstring). With two branches, every denoiser call of the solver costs 2
    network evaluations per sample.

    ``pin_outside``: the denoiser's estimate outside the sector (at network size, the one rule of
    :func:`edmcli.data.labels.sector_mask`) is replaced by the known outside value −1 at every
    evaluation, so the solver carries the outside to exactly −1 and the network sees there what
    it saw in training (−1 plus the current noise) instead of its own unconstrained guess (the
    loss is masked outside, so nothing trains it there). ``outside_value``: that value in the
    run's model space (−1, or the run's normalised latents' own outside value). ``channels``:
    of the model space (a C-channel Γ-VAE's latent: C; pixels: 1).

    ``schedule`` names a σ schedule of :data:`edmcli.sampling.schedules.SCHEDULES` (default: the
    model's). ``net`` may be a ``torch.compile``d module (attributes such as ``spade_cache``,
    ``round_sigma`` and ``learn_sigma`` pass through to the original)."""
    device = labels.device
    if levels is not None:
        sigmas = torch.tensor([*map(float, levels), 0.0], dtype=torch.float64)
    else:
        sigmas = model_sigmas(model_name, net, steps, schedule)
    options = solver_options_for(net, solver, solver_options)
    extra = {"return_variance": True} if options.get("variance") == "learned" else {}
    noise = SampleNoise(seeds, (channels, net_size, net_size), device)
    x = noise.draw() * start_scale(model_name, float(sigmas[0]))
    if class_labels is not None:
        extra["class_labels"] = torch.as_tensor(class_labels, device=device)
    if guidance is not None:
        extra["guidance"] = float(guidance)
    with torch.no_grad():
        cache = net.spade_cache(labels) if use_cache else None
        if cache is not None and guidance_branches(guidance) == 2:
            cache = cache.tile(2)  # γ/β of both branches, computed once, copied once per batch

        inside = sector_mask(labels, net_size).to(device) > 0 if pin_outside else None

        def denoise(x_t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            if cache is not None:
                out = net(x_t, sigma, spade_cache=cache, **extra)
            else:
                out = net(x_t, sigma, labels, **extra)
            if inside is None:
                return out
            if isinstance(out, tuple):
                return (pin(out[0], inside, outside_value), *out[1:])
            return pin(out, inside, outside_value)

        x0 = SOLVERS[solver](denoise, x, sigmas, noise=noise, **options)
        return to_image(x0, labels, decode)
