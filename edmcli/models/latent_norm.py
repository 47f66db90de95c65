"""Normalised latents for the latent diffusion models (EDM2 and LDMs' latent scaling).

The Γ-VAE's diffusion latent ``2 z − 1`` is not centred: inside the sector its mean is about −0.3
(the demo's phantom) and outside it is −1. EDM's preconditioning (c_in, c_skip, c_out) assumes
zero-mean data of std σ_data; with the mean left in, the target at large σ has RMS
√(σ_d² + μ²)/σ_d > 1 and the background sits at ≈ −1/σ_d. A :class:`LatentNorm` maps the latent to
the model space the diffusion network sees:

    x = (latent − shift) · scale      inside the latent sector
    x = outside value                 outside it

and back, ``latent = x / scale + shift`` (the Γ-VAE's decoder zeroes the outside whatever its
value). ``centred`` takes ``shift`` and ``scale`` from the mean and std of the encoded training
latents inside the sector (``latent_stats.json`` of the Γ-VAE run) so that the model space has
mean 0 and std σ_data there (EDM2 scales its latents to σ_data = 0.5 the same way). Outside the
sector the model space holds either ``0``, the mean (``outside="mean"``), or the background
latent −1 normalised like the rest (``outside="background"``, ≈ −1.5 on the demo's phantom).

``LatentNorm.identity()`` is the paper's model space (no normalisation, background −1); runs
recorded before normalisation existed and pixel models use it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

LATENT_NORMS = ("none", "centred")
"""``--latent-norm`` choices: none (the paper's model space) or centred (mean 0, std σ_data)."""
LATENT_OUTSIDE = ("mean", "background")
"""Model-space value outside the latent sector of centred latents: 0 or the normalised −1."""
BACKGROUND_LATENT = -1.0  # the Γ-VAE's diffusion latent outside the sector (z = 0)


Number = float | tuple[float, ...]  # one value for every channel, or one per channel


def _per_channel(value: Number, like: torch.Tensor) -> torch.Tensor:
    """``value`` as a tensor that broadcasts over (N, C, h, w) ``like``."""
    return torch.as_tensor(value, dtype=like.dtype, device=like.device).reshape(1, -1, 1, 1)


@dataclass(frozen=True)
class LatentNorm:
    """An affine map latent → model space inside the sector, and the model-space value outside.

    ``shift``, ``scale``: x = (latent − shift) · scale, one number for all channels or one per
    channel of a C-channel latent; ``outside``: ``mean`` (x = 0 outside) or ``background``
    (x = (−1 − shift) · scale outside)."""

    shift: Number = 0.0
    scale: Number = 1.0
    outside: str = "background"

    def __post_init__(self) -> None:
        for name in ("shift", "scale"):
            value = getattr(self, name)
            if isinstance(value, list | tuple):
                object.__setattr__(self, name, tuple(float(v) for v in value))
        shifts = self.shift if isinstance(self.shift, tuple) else (self.shift,)
        scales = self.scale if isinstance(self.scale, tuple) else (self.scale,)
        if not (all(math.isfinite(v) for v in (*shifts, *scales)) and min(scales) > 0):
            raise ValueError(
                f"latent normalisation needs a finite shift and a positive scale, got shift "
                f"{self.shift}, scale {self.scale}"
            )
        if self.outside not in LATENT_OUTSIDE:
            raise ValueError(
                f"latent outside {self.outside!r}: choose from {', '.join(LATENT_OUTSIDE)}"
            )

    @classmethod
    def identity(cls) -> LatentNorm:
        """The paper's model space: the latent itself, −1 outside the sector."""
        return cls()

    @classmethod
    def centred(
        cls, mean: Number, std: Number, sigma_data: float, outside: str = "mean"
    ) -> LatentNorm:
        """Latents of in-sector mean ``mean`` and std ``std`` (numbers, or one per channel) →
        mean 0 and std ``sigma_data`` (in each channel)."""
        stds = std if isinstance(std, list | tuple) else (std,)
        if not all(math.isfinite(v) and v > 0 for v in stds):
            raise ValueError(f"latent std {std} must be positive to normalise by it")
        scale = tuple(float(sigma_data) / float(v) for v in stds)
        shift = tuple(float(v) for v in mean) if isinstance(mean, list | tuple) else float(mean)
        return cls(shift=shift, scale=scale if isinstance(std, list | tuple) else scale[0],
                   outside=outside)  # fmt: skip

    @classmethod
    def from_record(cls, record: dict[str, Any] | None) -> LatentNorm:
        """The normalisation a run recorded (None: a run without one, the identity)."""
        return cls.identity() if record is None else cls(**record)

    def record(self) -> dict[str, Any]:
        out = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    @property
    def is_identity(self) -> bool:
        return self == LatentNorm.identity()

    @property
    def outside_value(self) -> Number:
        """The model-space value outside the sector (−1 for the identity, as for pixels; one
        per channel for a per-channel ``background``)."""
        if self.outside == "mean":
            return 0.0
        if isinstance(self.shift, tuple) or isinstance(self.scale, tuple):
            n = max(len(v) for v in (self.shift, self.scale) if isinstance(v, tuple))
            shifts = self.shift if isinstance(self.shift, tuple) else (self.shift,) * n
            scales = self.scale if isinstance(self.scale, tuple) else (self.scale,) * n
            return tuple((BACKGROUND_LATENT - a) * b for a, b in zip(shifts, scales, strict=True))
        return (BACKGROUND_LATENT - self.shift) * self.scale

    def normalise(self, latent: torch.Tensor, latent_sector: torch.Tensor) -> torch.Tensor:
        """Latent (N, C, h, w) → model space; ``latent_sector`` (N, 1, h, w) {0, 1} or bool."""
        if self.is_identity:
            return latent
        x = (latent - _per_channel(self.shift, latent)) * _per_channel(self.scale, latent)
        outside = _per_channel(self.outside_value, x).expand_as(x)
        return torch.where(latent_sector.bool(), x, outside)

    def denormalise(self, x: torch.Tensor) -> torch.Tensor:
        """Model space → latent inside the sector (outside: whatever the decoder zeroes)."""
        if self.is_identity:
            return x
        return x / _per_channel(self.scale, x) + _per_channel(self.shift, x)
