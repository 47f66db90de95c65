"""FLOPs of the networks, counted by ``torch.utils.flop_counter``, and device peaks for MFU.

Counting runs the network once under :class:`torch.utils.flop_counter.FlopCounterMode`, which
adds ``2 · M · N · K`` for every matrix product and convolution (FLOPs = 2 × multiply-adds, the
convention of ``docs/reference.md``; bias additions, norms and activations are not counted). The
networks are built and run on the ``meta`` device (no memory, no arithmetic: seconds for a paper
network) at batch 1; every counted op is per sample, so a batch of B costs B times as much.

Per network evaluation (NFE) a SPADE UNet costs :attr:`NetworkFlops.uncached` when it computes
SPADE γ/β from the label map, :attr:`NetworkFlops.cached` when they come from the cache that
sampling builds once per batch (:attr:`NetworkFlops.spade_cache` FLOPs, a fixed cost). At the
paper's configurations the counter gives 4657, 1206 and 325 GFLOP per NFE for EDM 256²,
EDM-L128 and EDM-L64 (the authors' networks: 4666, 1209 and 326), a third of it in the SPADE
MLPs.

:func:`peak_flops` looks up a GPU's dense peak (bf16 with fp32 accumulation, TF32, plain fp32)
from its name: None for a CPU or a card not in :data:`PEAK_TFLOPS`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = [
    "PEAK_TFLOPS",
    "FlopCount",
    "NetworkFlops",
    "count_flops",
    "decoder_flops",
    "mfu",
    "network_flops",
    "peak_flops",
]

META = torch.device("meta")


@dataclass(frozen=True)
class FlopCount:
    """Total FLOPs of one call and their split by aten op (``"aten.convolution"`` …)."""

    total: int
    by_op: dict[str, int]


def count_flops(fn: Callable[[], object]) -> FlopCount:
    """FLOPs of ``fn()`` (no gradients), counted by :class:`FlopCounterMode`."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        fn()
    by_op = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return FlopCount(int(counter.get_total_flops()), by_op)


@dataclass(frozen=True)
class NetworkFlops:
    """FLOPs per sample of a SPADE diffusion network (a preconditioned :class:`SpadeUNet`).

    Attributes:
        params: parameters of the network.
        uncached: one NFE with SPADE γ/β computed from the label map.
        cached: one NFE with γ/β taken from a :meth:`spade_cache`.
        spade_cache: building the γ/β cache (once per batch of label maps).
    """

    params: int
    uncached: int
    cached: int
    spade_cache: int

    @property
    def spade_share(self) -> float:
        """Fraction of an uncached NFE spent in the SPADE γ/β MLPs."""
        return 1.0 - self.cached / self.uncached

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "spade_share": self.spade_share}


def network_flops(
    build: Callable[[], nn.Module], net_size: int, label_size: int, channels: int = 1
) -> NetworkFlops:
    """Count the network that ``build()`` returns, built on the meta device, at batch 1.

    Args:
        build: returns the preconditioned network (called under ``torch.device("meta")``).
        net_size: side of the network input (pixels, or the latent side).
        label_size: side of the label maps (the image size).
        channels: channels of the network input (a C-channel Γ-VAE's latent: C).
    """
    with META:
        net = build().eval()
    x = torch.zeros(1, channels, net_size, net_size, device=META)
    sigma = torch.ones(1, device=META)
    labels = torch.zeros(1, label_size, label_size, dtype=torch.long, device=META)
    uncached = count_flops(lambda: net(x, sigma, labels)).total
    with torch.no_grad():
        cache = net.spade_cache(labels)
    cached = count_flops(lambda: net(x, sigma, spade_cache=cache)).total
    build_cost = count_flops(lambda: net.spade_cache(labels)).total
    params = sum(p.numel() for p in net.parameters())
    return NetworkFlops(params, uncached, cached, build_cost)


def decoder_flops(build_vae: Callable[[], nn.Module], latent_size: int, image_size: int) -> int:
    """FLOPs of one latent → image decode at batch 1 (:meth:`GammaVAE.decode` of the Γ-VAE that
    ``build_vae`` builds, on meta; a decoder with labels included)."""
    with META:
        vae = build_vae().eval()
    channels = vae.config.latent_channels
    z = torch.zeros(1, channels, latent_size, latent_size, device=META)
    labels = torch.ones(1, image_size, image_size, dtype=torch.long, device=META)
    sector = torch.ones(1, 1, image_size, image_size, device=META)
    return count_flops(lambda: vae.decode(z, sector, labels)).total


# Dense peaks (no structured sparsity) in TFLOP/s from the vendors' data sheets and architecture
# whitepapers: bf16 tensor cores with fp32 accumulation (GeForce cards run it at half their fp16
# rate), TF32 tensor cores, and fp32 on the CUDA cores. Matched on whole words of the device
# name, first match wins (so "H100 PCIe" before "H100", "L40S" before "L4"). None: no such unit.
PEAK_TFLOPS: tuple[tuple[str, dict[str, float | None]], ...] = (
    ("H200 NVL", {"bf16": 835.0, "tf32": 417.5, "fp32": 60.0}),
    ("H200", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("H100 NVL", {"bf16": 835.0, "tf32": 417.5, "fp32": 60.0}),
    ("H100 PCIe", {"bf16": 756.5, "tf32": 378.0, "fp32": 51.2}),
    ("H100", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("A100", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.1, "tf32": 183.0, "fp32": 91.6}),
    ("L40", {"bf16": 181.0, "tf32": 90.5, "fp32": 90.5}),
    ("L4", {"bf16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    ("A10", {"bf16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    ("RTX 6000 Ada", {"bf16": 364.2, "tf32": 182.1, "fp32": 91.1}),
    ("RTX A6000", {"bf16": 154.8, "tf32": 77.4, "fp32": 38.7}),
    ("RTX 4090", {"bf16": 165.2, "tf32": 82.6, "fp32": 82.6}),
    ("RTX 3090 Ti", {"bf16": 80.0, "tf32": 40.0, "fp32": 40.0}),
    ("RTX 3090", {"bf16": 71.0, "tf32": 35.6, "fp32": 35.6}),
    ("V100", {"bf16": None, "tf32": None, "fp32": 15.7}),
    ("T4", {"bf16": None, "tf32": None, "fp32": 8.1}),
)
PRECISIONS = ("bf16", "tf32", "fp32")


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _contains(words: list[str], pattern: list[str]) -> bool:
    n = len(pattern)
    return any(words[i : i + n] == pattern for i in range(len(words) - n + 1))


def peak_flops(device_name: str, precision: str) -> float | None:
    """Dense peak FLOP/s of the GPU called ``device_name`` (``torch.cuda.get_device_name``) at
    ``precision`` (``"bf16"``, ``"tf32"`` or ``"fp32"``); None when it is not known."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}.")
    words = _words(device_name)
    for pattern, peaks in PEAK_TFLOPS:
        if _contains(words, _words(pattern)):
            value = peaks.get(precision)
            return None if value is None else value * 1e12
    return None


def mfu(achieved_flops_per_s: float | None, peak: float | None) -> float | None:
    """Model FLOP utilisation: achieved / peak FLOP/s (None when either is unknown)."""
    if achieved_flops_per_s is None or not peak:
        return None
    return achieved_flops_per_s / peak
