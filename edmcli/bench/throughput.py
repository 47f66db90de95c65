"""Generation throughput: per-NFE network cost, fixed costs, and the linear cost model.

Generating a batch of B images with a budget of N network evaluations costs

    seconds(N) = fixed + N · per_nfe,         images/s(N) = B / seconds(N),

where ``per_nfe`` is one denoiser call with SPADE γ/β taken from the cache (the path sampling
uses; compiled when compilation is on) and ``fixed`` is what a batch costs once whatever N is:
building the γ/β cache, the Γ-VAE decode (latent models) and writing the batch to a store
(uint8 conversion, device → host copy, one Zarr shard). :class:`CostModel` holds the two
numbers and predicts every NFE; :func:`measure_target` times the parts and then checks the model
end to end with :func:`edmcli.sampling.pipeline.generate` (plus the store write) at a few NFEs
(:func:`pick_check_nfes`), reporting predicted and measured seconds side by side.

The solver's own arithmetic per step (a few element-wise ops on the batch) is not in
``per_nfe``; the end-to-end check measures it with everything else. The check uses a solver that
spends one NFE per step (``euler`` for the EDM family, the model's own DDPM sampler for ``sdm``)
so that every NFE of the list is reachable; Heun's 2N − 1 evaluations cost the same per NFE.
"""

from __future__ import annotations

import functools
import gc
import tempfile
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edmcli.bench.flops import NetworkFlops, decoder_flops, mfu, network_flops
from edmcli.bench.timing import Timing, plan_repeats, time_call
from edmcli.data.labels import sector_mask
from edmcli.data.phantom import generate_patient
from edmcli.data.store import STRING_FIELDS, create_store, write_block
from edmcli.models.registry import get_spec
from edmcli.sampling.nfe import plan
from edmcli.sampling.pipeline import generate
from edmcli.sampling.sample import EXTRA_FIELDS, compile_denoiser
from edmcli.sampling.solvers import nfe_cost

__all__ = [
    "Budget",
    "CostModel",
    "Measurer",
    "Rate",
    "Settings",
    "Target",
    "check_solver",
    "fit_batch",
    "fit_cost_model",
    "label_batch",
    "measure_target",
    "pick_check_nfes",
    "relative_error",
    "target_flops",
]

SIGMA = 1.0  # noise level of the timed calls (the cost does not depend on it)
BATCH_CAP = 256  # the largest batch the CUDA auto-sizing tries
MEMORY_FRACTION = 0.7  # of the card's memory that the auto-sized batch may plan to use


# --------------------------------------------------------------------------- the cost model
@dataclass(frozen=True)
class CostModel:
    """Seconds per batch of ``batch`` images at N NFE: ``fixed_s + N · per_nfe_s``."""

    batch: int
    per_nfe_s: float
    fixed_s: float

    def seconds(self, nfe: float) -> float:
        """Predicted seconds for one batch at ``nfe`` network evaluations."""
        return self.fixed_s + nfe * self.per_nfe_s

    def images_per_s(self, nfe: float) -> float:
        """Predicted images per second at ``nfe``: ``batch / seconds(nfe)``."""
        return self.batch / self.seconds(nfe)

    def to_dict(self) -> dict[str, float]:
        return {"batch": self.batch, "per_nfe_s": self.per_nfe_s, "fixed_s": self.fixed_s}


def fit_cost_model(nfes: Sequence[float], seconds: Sequence[float], batch: int) -> CostModel:
    """Least-squares ``seconds ≈ fixed + nfe · per_nfe`` through end-to-end timings at two or
    more distinct NFEs (exact through two points)."""
    n = np.asarray(nfes, dtype=float)
    t = np.asarray(seconds, dtype=float)
    if n.shape != t.shape or len(np.unique(n)) < 2:
        raise ValueError("fit_cost_model needs timings at two or more distinct NFEs.")
    slope, intercept = np.polyfit(n, t, 1)
    return CostModel(batch, float(slope), float(intercept))


def relative_error(predicted: float, measured: float) -> float:
    """``(predicted − measured) / measured``."""
    return (predicted - measured) / measured


def pick_check_nfes(
    nfes: Sequence[int], seconds_of: Callable[[int], float], budget_s: float, most: int = 3
) -> list[int]:
    """Up to ``most`` NFEs of ``nfes`` to time end to end within ``budget_s`` predicted seconds:
    the smallest, then the largest that still fits, then the one nearest their geometric middle
    that fits. Empty when even the smallest does not fit."""
    ordered = sorted(set(int(n) for n in nfes))
    if not ordered or most < 1 or seconds_of(ordered[0]) > budget_s:
        return []
    chosen = [ordered[0]]
    left = budget_s - seconds_of(ordered[0])
    if most >= 2:
        fits = [n for n in ordered[1:] if seconds_of(n) <= left]
        if fits:
            chosen.append(fits[-1])
            left -= seconds_of(fits[-1])
    if most >= 3 and len(chosen) == 2:
        middle = (chosen[0] * chosen[1]) ** 0.5
        inner = [n for n in ordered if chosen[0] < n < chosen[1] and seconds_of(n) <= left]
        if inner:
            chosen.append(min(inner, key=lambda n: abs(np.log(n / middle))))
    return sorted(chosen)


def fit_batch(peak_1: int, peak_2: int, budget_bytes: float, cap: int = BATCH_CAP) -> int:
    """The largest power-of-two batch (≤ ``cap``) whose peak memory, extrapolated linearly from
    the peaks at batch 1 and 2, stays within ``budget_bytes``; at least 1."""
    per_image = max(peak_2 - peak_1, 1)
    fixed = peak_1 - per_image
    fits = int((budget_bytes - fixed) // per_image)
    if fits < 1:
        return 1
    best = 1 << (min(fits, cap).bit_length() - 1)
    return max(1, best)


def check_solver(model: str) -> str:
    """The solver of the end-to-end check: the model's own when it spends one NFE per step, else
    ``euler`` (same network cost per NFE as Heun, and every NFE reachable)."""
    solver = get_spec(model).solver
    return solver if nfe_cost(solver, 2) == 2 else "euler"


# --------------------------------------------------------------------------- planning
@dataclass(frozen=True)
class Budget:
    """Time limits of the measurements of one configuration.

    Attributes:
        measure_s: seconds for one timing, warm-up and repeats together (None: no limit).
        optional_cap_s: optional paths (γ/β recomputed at every NFE, the MONAI peer) are not
            timed for a network whose one call is predicted to take longer (None: always).
        check_s: predicted seconds of all end-to-end checks of one model together.
    """

    measure_s: float | None
    optional_cap_s: float | None
    check_s: float


class Rate:
    """Running estimate of the FLOP/s this device achieves, to predict a call's seconds."""

    def __init__(self) -> None:
        self.flops_per_s: float | None = None

    def predict(self, flops: float) -> float | None:
        return None if self.flops_per_s is None else flops / self.flops_per_s

    def update(self, flops: float, seconds: float) -> None:
        if flops > 0 and seconds > 0:
            self.flops_per_s = flops / seconds


@dataclass
class Target:
    """One configuration of one model to measure.

    Attributes:
        label: its name in tables and plots (the model name, or the run folder's name).
        model: the registry name.
        preset: ``paper``, ``tiny`` or ``run``.
        image_size: pixels of the images (and label maps).
        net_size: side of the network input (pixels or latent).
        meta_net: builds the preconditioned network (called under the meta device: FLOPs).
        load_net: the network on a device, eval mode (random or trained weights).
        meta_vae: builds the Γ-VAE (meta device) for latent models, else None.
        load_vae: the Γ-VAE on a device, for latent models, else None.
        weights: ``"random"`` or where trained weights came from.
        nfes: NFEs of the throughput curve.
        batch: images per batch; None: auto-sized (CUDA).
    """

    label: str
    model: str
    preset: str
    image_size: int
    net_size: int
    meta_net: Callable[[], nn.Module]
    load_net: Callable[[torch.device], nn.Module]
    meta_vae: Callable[[], nn.Module] | None = None
    load_vae: Callable[[torch.device], nn.Module] | None = None
    weights: str = "random"
    nfes: list[int] = field(default_factory=list)
    batch: int | None = None


@dataclass
class Settings:
    """How one configuration is measured (shared by the targets of a scale)."""

    device: torch.device
    autocast: torch.dtype | None  # bf16 autocast, or None for fp32
    compile: bool
    repeats: int
    budget: Budget
    rate: Rate = field(default_factory=Rate)
    log: Callable[[str], None] = print

    def precision(self) -> str:
        return "bf16" if self.autocast is torch.bfloat16 else "fp32"

    def autocast_ctx(self, dtype: torch.dtype | None = None) -> AbstractContextManager:
        dtype = self.autocast if dtype is None else dtype
        if dtype is None or dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype)


@functools.lru_cache(maxsize=4)
def _phantom_maps(size: int) -> np.ndarray:
    return np.stack([record["labels"] for record in generate_patient(0, 0, size)])


def label_batch(batch: int, size: int, device: torch.device) -> torch.Tensor:
    """(batch, size, size) int64 phantom label maps (one patient's four views, tiled)."""
    maps = _phantom_maps(size)
    index = np.arange(batch) % len(maps)
    return torch.from_numpy(maps[index].astype(np.int64)).to(device)


class StoreWriter:
    """Writes batches of generated images into a temporary synthetic store, one whole shard per
    batch (as ``echo-synth sample`` writes one chunk per shard)."""

    SLOTS = 4

    def __init__(self, root: Path, batch: int, size: int) -> None:
        self.batch, self.size = batch, size
        self.group = create_store(
            root / "bench.zarr", batch * self.SLOTS, size, size,
            {"provenance": {"source": "bench"}}, extra_fields=EXTRA_FIELDS, shard=batch,
        )  # fmt: skip
        self.columns: dict[str, np.ndarray] = {
            name: np.full(batch, "bench", dtype=str) for name in STRING_FIELDS
        }
        self.columns |= {
            "ef": np.full(batch, np.nan, np.float32),
            "spacing": np.full((batch, 2), np.nan, np.float32),
            "source_index": np.arange(batch, dtype=np.int64),
            "transform": np.zeros(batch, np.int16),
            "seed": np.arange(batch, dtype=np.int64),
            "source_split": np.full(batch, "train", dtype=str),
        }
        self.count = 0

    def write(self, images: torch.Tensor, labels: np.ndarray) -> None:
        """Images in [0, 1] (B, 1, H, W) on any device → uint8 → the next slot of the store."""
        pixels = (images.float() * 255).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
        start = (self.count % self.SLOTS) * self.batch
        write_block(self.group, start, pixels, labels, self.columns)
        self.count += 1


# --------------------------------------------------------------------------- measuring
def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _oom_errors() -> tuple[type[BaseException], ...]:
    return (torch.OutOfMemoryError,) if hasattr(torch, "OutOfMemoryError") else (RuntimeError,)


class Measurer:
    """Times the calls of one target under the settings' budget, records what it skipped."""

    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.skipped: dict[str, str] = {}

    def time(self, fn: Callable[[], object], flops: float, always_warm: bool = False) -> Timing:
        s = self.s
        warm = always_warm or s.device.type == "cuda"
        warmup, repeats = plan_repeats(s.rate.predict(flops), s.repeats, s.budget.measure_s, warm)
        timing = time_call(fn, s.device, repeats, warmup)
        s.rate.update(flops, timing.median_s)
        return timing

    def time_keep(self, fn: Callable[[], Any], flops: float) -> tuple[Timing, Any]:
        """:meth:`time` of ``fn`` and the output of its last call (a γ/β cache, decoded images:
        a paper-scale CPU call is not paid twice to time it and then use it)."""
        out: list[Any] = [None]

        def call() -> None:
            out[0] = fn()

        return self.time(call, flops), out[0]

    def optional(self, name: str, flops: float) -> bool:
        """Whether an optional path of a call of ``flops`` fits the settings' cap."""
        cap = self.s.budget.optional_cap_s
        predicted = self.s.rate.predict(flops)
        if cap is None or predicted is None or predicted <= cap:
            return True
        self.skipped[name] = (
            f"not timed: one call is predicted to take {predicted:.0f} s (> {cap:.0f} s, the "
            "cap of this configuration)"
        )
        return False

    def attempt(self, name: str, fn: Callable[[], Any]) -> Any:
        """``fn()``, or None with the reason recorded when it runs out of memory or fails to
        compile (a benchmark reports that rather than stopping)."""
        try:
            return fn()
        except _oom_errors() as exc:
            self.skipped[name] = f"out of memory ({str(exc).splitlines()[0][:120]})"
        except Exception as exc:  # compilation and kernel failures: report, go on
            if not name.endswith(("compiled", "triton", "torch_spade")):
                raise
            self.skipped[name] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        _release(self.s.device)
        return None


def _auto_batch(net, target: Target, settings: Settings, vae) -> tuple[int, dict[str, Any]]:
    """CUDA: the batch whose cache + forward (+ decode) fits :data:`MEMORY_FRACTION` of the card,
    extrapolated from the peaks at batch 1 and 2 and then checked (halved on out-of-memory)."""
    device = settings.device

    def peak(batch: int) -> int:
        _release(device)
        torch.cuda.reset_peak_memory_stats(device)
        labels = label_batch(batch, target.image_size, device)
        x = torch.randn(batch, 1, target.net_size, target.net_size, device=device)
        with torch.no_grad(), settings.autocast_ctx():
            cache = net.spade_cache(labels)
            out = net(x, torch.tensor(SIGMA, device=device), spade_cache=cache)
            if vae is not None:
                vae.decode(out.float().clamp(-1, 1), sector_mask(labels))
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))

    total = torch.cuda.get_device_properties(device).total_memory
    p1 = peak(1)
    try:
        p2 = peak(2)
    except _oom_errors():
        _release(device)
        return 1, {"peak_batch_1": p1, "peak_batch_2": None, "device_bytes": total}
    batch = fit_batch(p1, p2, MEMORY_FRACTION * total)
    while batch > 1:
        try:
            peak(batch)
            break
        except _oom_errors():
            batch //= 2
    _release(device)
    return batch, {"peak_batch_1": p1, "peak_batch_2": p2, "device_bytes": total,
                   "fraction": MEMORY_FRACTION, "cap": BATCH_CAP}  # fmt: skip


def _path_entry(timing: Timing | None, flops_per_call: float, peak: float | None) -> dict | None:
    if timing is None:
        return None
    achieved = flops_per_call / timing.median_s
    return {**timing.to_dict(), "flops": flops_per_call, "achieved_flops_per_s": achieved,
            "mfu": mfu(achieved, peak)}  # fmt: skip


def target_flops(target: Target) -> NetworkFlops:
    """The target network's FLOPs per sample (:func:`network_flops`, on meta)."""
    return network_flops(target.meta_net, target.net_size, target.image_size)


def measure_target(
    target: Target,
    settings: Settings,
    peaks: dict[str, float | None],
    flops: NetworkFlops | None = None,
    peer: Callable[[nn.Module, torch.Tensor, Settings, NetworkFlops], dict] | None = None,
) -> dict[str, Any]:
    """Count, time and model one target: FLOPs, per-NFE paths, fixed costs, cost model,
    throughput at every NFE of ``target.nfes`` and the end-to-end checks.

    Args:
        target: what to measure.
        settings: device, precision, compilation, repeats and budget.
        peaks: precision (``bf16``, ``fp32``) → the device's peak FLOP/s (None: unknown).
        flops: the target's :func:`target_flops`, when already counted.
        peer: called with the target's UNet, its label batch, ``settings`` and its FLOPs once
            the target is measured (the MONAI comparison); its result is the record's ``peer``.

    Returns:
        The target's JSON-able record (see :func:`edmcli.bench.bench.bench`).
    """
    s, device, log = settings, settings.device, settings.log
    spec = get_spec(target.model)
    flops = flops or target_flops(target)
    decode_flops = 0
    if target.meta_vae is not None:
        decode_flops = decoder_flops(lambda: target.meta_vae().decoder, target.net_size)
    m = Measurer(settings)
    log(f"{target.label} ({target.preset}, {target.net_size}²): building the network")
    net = target.load_net(device).eval().requires_grad_(False)
    vae = target.load_vae(device).eval().requires_grad_(False) if target.load_vae else None
    sizing = None
    batch = target.batch
    if batch is None:
        batch, sizing = _auto_batch(net, target, s, vae)
    labels = label_batch(batch, target.image_size, device)
    x = torch.randn(batch, 1, target.net_size, target.net_size, device=device)
    sigma = torch.tensor(SIGMA, device=device)
    peak = peaks.get(s.precision())
    timings: dict[str, Timing] = {}
    log(f"{target.label}: batch {batch}, {flops.cached / 1e9:.1f} GFLOP per NFE (cached)")
    with torch.no_grad():
        with s.autocast_ctx():
            timings["spade_cache"], cache = m.time_keep(lambda: net.spade_cache(labels),
                                                        flops.spade_cache * batch)  # fmt: skip
            timings["nfe_cached_eager"] = m.time(lambda: net(x, sigma, spade_cache=cache),
                                                 flops.cached * batch)  # fmt: skip
            if m.optional("nfe_uncached_eager", flops.uncached * batch):
                timings["nfe_uncached_eager"] = m.time(lambda: net(x, sigma, labels),
                                                       flops.uncached * batch)  # fmt: skip
        compiled = None
        if s.compile:
            log(f"{target.label}: compiling (the first calls are reported as warm-up)")

            def run_compiled():
                nonlocal compiled
                compiled = compile_denoiser(net, device)
                with s.autocast_ctx():
                    return m.time(lambda: compiled(x, sigma, spade_cache=cache),
                                  flops.cached * batch, always_warm=True)  # fmt: skip

            timing = m.attempt("nfe_cached_compiled", run_compiled)
            if timing is not None:
                timings["nfe_cached_compiled"] = timing
            else:
                compiled = None
        else:
            m.skipped["nfe_cached_compiled"] = "compilation off for this configuration"
        if device.type == "cuda":
            timings |= _cuda_variants(net, x, sigma, labels, cache, batch, flops, s, m)
        else:
            m.skipped["nfe_cached_torch_spade"] = "Triton kernels run on CUDA only"
            m.skipped["nfe_cached_other_precision"] = "bf16 vs fp32 is measured on CUDA only"
        latent = x.clamp(-1, 1)
        sector = sector_mask(labels)
        if vae is not None:
            timings["decode"], images = m.time_keep(lambda: vae.decode(latent, sector),
                                                    decode_flops * batch)  # fmt: skip
        else:
            images = (latent + 1) / 2
    labels_np = labels.cpu().numpy().astype(np.uint8)
    with tempfile.TemporaryDirectory(prefix="echo-synth-bench-") as tmp:
        writer = StoreWriter(Path(tmp), batch, target.image_size)
        timings["store_write"] = time_call(lambda: writer.write(images, labels_np), device,
                                           max(1, s.repeats), 1)  # fmt: skip
        best = "nfe_cached_compiled" if "nfe_cached_compiled" in timings else "nfe_cached_eager"
        fixed_parts = {k: timings[k].median_s for k in ("spade_cache", "decode", "store_write")
                       if k in timings}  # fmt: skip
        model = CostModel(batch, timings[best].median_s, sum(fixed_parts.values()))
        runner = compiled if best == "nfe_cached_compiled" else net
        checks = _checks(target, runner, labels, labels_np, vae, writer, model, s, m,
                         warm=best == "nfe_cached_compiled")  # fmt: skip
    vae = cache = compiled = runner = None
    _release(device)
    peer_record = peer(net.net, labels, s, flops) if peer is not None else None
    net = None
    _release(device)
    per_call = {
        "spade_cache": flops.spade_cache * batch,
        "nfe_cached_eager": flops.cached * batch,
        "nfe_uncached_eager": flops.uncached * batch,
        "nfe_cached_compiled": flops.cached * batch,
        "nfe_cached_torch_spade": flops.cached * batch,
        "nfe_cached_other_precision": flops.cached * batch,
        "decode": decode_flops * batch,
        "store_write": 0,
    }
    other = "fp32" if s.precision() == "bf16" else "bf16"
    recorded = {}
    for key, timing in timings.items():
        kind_peak = peaks.get(other) if key == "nfe_cached_other_precision" else peak
        recorded[key] = _path_entry(timing, per_call[key], kind_peak)
    measured = {c["nfe"]: c for c in checks if "measured_s" in c}
    throughput = [
        {
            "nfe": n,
            "images_per_s": model.images_per_s(n),
            "seconds_per_batch": model.seconds(n),
            "source": "cost model (measured per-NFE and fixed costs)",
            "measured_images_per_s": batch / measured[n]["measured_s"] if n in measured else None,
        }
        for n in target.nfes
    ]
    return {
        "label": target.label,
        "model": target.model,
        "preset": target.preset,
        "space": "latent" if spec.is_latent else "pixels",
        "image_size": target.image_size,
        "net_size": target.net_size,
        "batch": batch,
        "batch_sizing": sizing,
        "precision": s.precision(),
        "other_precision": other,
        "weights": target.weights,
        "params": flops.params,
        "flops_per_image": {**flops.to_dict(), "decode": decode_flops},
        "timings": recorded,
        "skipped": m.skipped,
        "cost_model": {**model.to_dict(), "per_nfe_path": best, "fixed_parts_s": fixed_parts},
        "throughput": throughput,
        "checks": checks,
        "peak_memory_bytes": max((t.peak_bytes or 0 for t in timings.values()), default=0) or None,
        "peer": peer_record,
    }


def _cuda_variants(net, x, sigma, labels, cache, batch, flops, s: Settings, m: Measurer) -> dict:
    """CUDA: the cached eager NFE with the SPADE normalisation on the torch path (vs the fused
    Triton kernel; the γ/β cache is the same), and in the other precision (bf16 vs fp32, its
    own cache)."""
    import echo_synth_kernels as kernels

    out: dict[str, Timing] = {}

    def torch_spade() -> Timing:
        with kernels.spade_backend("torch"), s.autocast_ctx():
            return m.time(lambda: net(x, sigma, spade_cache=cache), flops.cached * batch)

    def other_precision() -> Timing:
        dtype = torch.float32 if s.autocast is torch.bfloat16 else torch.bfloat16
        with s.autocast_ctx(dtype):
            own = net.spade_cache(labels)
            return m.time(lambda: net(x, sigma, spade_cache=own), flops.cached * batch)

    for name, fn in (("nfe_cached_torch_spade", torch_spade),
                     ("nfe_cached_other_precision", other_precision)):  # fmt: skip
        timing = m.attempt(name, fn)
        if timing is not None:
            out[name] = timing
    return out


def _checks(target, runner, labels, labels_np, vae, writer, model, s, m, warm) -> list:
    """End-to-end seconds of ``generate`` + store write at the NFEs :func:`pick_check_nfes`
    chooses within the budget, next to the cost model's prediction."""
    solver = check_solver(target.model)
    decode = vae.decode if vae is not None else None
    nfes = pick_check_nfes(target.nfes, model.seconds, s.budget.check_s)
    if not nfes:
        m.skipped["checks"] = (
            f"not timed: even NFE {min(target.nfes)} is predicted to take "
            f"{model.seconds(min(target.nfes)):.0f} s (> {s.budget.check_s:.0f} s)"
        )
        return []

    def run(nfe: int) -> None:
        steps = plan(solver, nfe).steps
        with s.autocast_ctx():
            images = generate(runner, target.model, labels, range(len(labels)), target.net_size,
                              solver=solver, steps=steps, decode=decode)  # fmt: skip
        writer.write(images, labels_np)

    out = []
    if warm:  # compiled: the sampling call's own graph (and any recompilation) before timing
        warmup = time_call(lambda: run(1), s.device, 1, 0)
        out.append({"nfe": 1, "warmup_s": warmup.median_s, "solver": solver})
    s.log(f"{target.label}: end-to-end check at NFE {', '.join(map(str, nfes))} ({solver})")
    for nfe in nfes:
        timing = time_call(lambda n=nfe: run(n), s.device, 1, 0)
        predicted = model.seconds(nfe)
        out.append({
            "nfe": nfe, "solver": solver, "measured_s": timing.median_s,
            "predicted_s": predicted,
            "relative_error": relative_error(predicted, timing.median_s),
        })  # fmt: skip
    return out
