"""Measuring one target's generation throughput: per-NFE network cost, fixed costs, the cost
model they give, and its end-to-end check.

``per_nfe`` is one denoiser call with SPADE γ/β taken from the cache (the path sampling uses;
compiled when compilation is on) and ``fixed`` is what a batch costs once whatever N is:
building the γ/β cache, the Γ-VAE decode (latent models) and writing the batch to a store
(uint8 conversion, device → host copy, one Zarr shard). :func:`measure_target` times the parts,
forms the :class:`~edmcli.bench.costmodel.CostModel` and then checks it end to end with
:func:`edmcli.sampling.pipeline.generate` (plus the store write) at a few NFEs
(:func:`~edmcli.bench.costmodel.pick_check_nfes`), reporting predicted and measured seconds side
by side. On CUDA the batch is auto-sized to the card's memory (:func:`fit_batch`).

The solver's own arithmetic per step (a few element-wise ops on the batch) is not in
``per_nfe``; the end-to-end check measures it with everything else. The start noise (per-sample
CPU generators, one copy to the device per batch) is a fixed part, and a stochastic sampler's
per-step noise (ancestral DDPM: per-sample generators on the device, every step but the last) is
the cost model's ``noise_per_step`` (timed alone: an upper bound where the device overlaps it with
the network). The check uses a solver that spends one NFE per step (``euler`` for the EDM family,
the model's own DDPM sampler for ``sdm``) so that every NFE of the list is reachable; Heun's
2N − 1 evaluations cost the same per NFE.

Besides the batch that fits, every target is measured at the scale's matched batch (the
``matched`` record: the fixed, per-NFE and noise costs at that batch, with the same per-NFE path),
so that ratios between models can leave batch efficiency out. The paper reference (SDM), whose
1000 NFE are only predicted, is also run end to end through the real sampling path at a reduced
NFE (:data:`REFERENCE_CHECK_NFES`, the largest within the budget's ``reference_s``): its
``reference_check`` sets measured against predicted seconds.
"""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edmcli.bench.costmodel import CostModel, pick_check_nfes, relative_error
from edmcli.bench.flops import NetworkFlops, decoder_flops, mfu
from edmcli.bench.measurer import Measurer, Settings, oom_errors, release_memory
from edmcli.bench.targets import Target, target_flops
from edmcli.bench.timing import Timing, time_call
from edmcli.data.labels import sector_mask
from edmcli.data.phantom import generate_patient
from edmcli.data.store_format import STRING_FIELDS
from edmcli.data.store_writer import create_store, write_block
from edmcli.models.registry import get_spec, paper_reference
from edmcli.sampling.compiled import compiled_network
from edmcli.sampling.nfe import plan
from edmcli.sampling.pipeline import SampleNoise, generate
from edmcli.sampling.sample import EXTRA_FIELDS
from edmcli.sampling.solvers import nfe_cost

__all__ = [
    "NOISY_SOLVERS",
    "REFERENCE_CHECK_NFES",
    "StoreWriter",
    "check_solver",
    "fit_batch",
    "label_batch",
    "measure_target",
    "reference_check_nfe",
    "size_batch",
]

SIGMA = 1.0  # noise level of the timed calls (the cost does not depend on it)
BATCH_CAP = 256  # the largest batch the CUDA auto-sizing tries
MEMORY_FRACTION = 0.7  # of the card's memory that the auto-sized batch may plan to use
NOISY_SOLVERS = frozenset({"ddpm_ancestral"})  # draw fresh noise at every step but the last
REFERENCE_CHECK_NFES = (100, 50, 20, 10, 5, 2)  # the reference's reduced NFEs, largest first


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


def _auto_batch(net, target: Target, settings: Settings, vae) -> tuple[int, dict[str, Any]]:
    """CUDA: the batch whose cache + forward (+ decode) fits :data:`MEMORY_FRACTION` of the card,
    extrapolated from the peaks at batch 1 and 2 and then checked (halved on out-of-memory)."""
    device = settings.device

    def peak(batch: int) -> int:
        release_memory(device)
        torch.cuda.reset_peak_memory_stats(device)
        labels = label_batch(batch, target.image_size, device)
        x = torch.randn(batch, target.channels, target.net_size, target.net_size, device=device)
        with torch.no_grad(), settings.autocast_ctx():
            cache = net.spade_cache(labels)
            out = net(x, torch.tensor(SIGMA, device=device), spade_cache=cache)
            if vae is not None:
                vae.decode(out.float().clamp(-1, 1), sector_mask(labels), labels)
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))

    total = torch.cuda.get_device_properties(device).total_memory
    p1 = peak(1)
    try:
        p2 = peak(2)
    except oom_errors():
        release_memory(device)
        return 1, {"peak_batch_1": p1, "peak_batch_2": None, "device_bytes": total}
    batch = fit_batch(p1, p2, MEMORY_FRACTION * total)
    while batch > 1:
        try:
            peak(batch)
            break
        except oom_errors():
            batch //= 2
    release_memory(device)
    return batch, {"peak_batch_1": p1, "peak_batch_2": p2, "device_bytes": total,
                   "fraction": MEMORY_FRACTION, "cap": BATCH_CAP}  # fmt: skip


def size_batch(target: Target, settings: Settings) -> tuple[int, dict[str, Any]]:
    """CUDA: the batch that fits ``target`` on the card (:func:`_auto_batch`), and how it was
    sized; the network is built for it and released again."""
    device = settings.device
    net = target.load_net(device).eval().requires_grad_(False)
    vae = target.load_vae(device).eval().requires_grad_(False) if target.load_vae else None
    try:
        return _auto_batch(net, target, settings, vae)
    finally:
        net = vae = None
        release_memory(device)


def _noise_timings(batch: int, net_size: int, device: torch.device, noisy: bool,
                   repeats: int) -> dict[str, Timing]:  # fmt: skip
    """The start noise of a batch (CPU generators, one copy) and, for a stochastic sampler, one
    step's noise (generators on the device), as :func:`~edmcli.sampling.pipeline.generate`
    draws them."""
    noise = SampleNoise(range(batch), (1, net_size, net_size), device)
    out = {"start_noise": time_call(noise.draw, device, repeats, 1)}
    if noisy:
        out["step_noise"] = time_call(lambda: noise(1), device, repeats, 1)
    return out


FIXED_PARTS = ("spade_cache", "decode", "store_write", "start_noise")


def _cost_model(batch: int, timings: dict[str, Timing], best: str) -> tuple[CostModel, dict]:
    fixed_parts = {k: timings[k].median_s for k in FIXED_PARTS if k in timings}
    noise = timings["step_noise"].median_s if "step_noise" in timings else 0.0
    model = CostModel(batch, timings[best].median_s, sum(fixed_parts.values()), noise)
    return model, {**model.to_dict(), "per_nfe_path": best, "fixed_parts_s": fixed_parts}


def _path_entry(timing: Timing | None, flops_per_call: float, peak: float | None) -> dict | None:
    if timing is None:
        return None
    achieved = flops_per_call / timing.median_s
    return {**timing.to_dict(), "flops": flops_per_call, "achieved_flops_per_s": achieved,
            "mfu": mfu(achieved, peak)}  # fmt: skip


def measure_target(
    target: Target,
    settings: Settings,
    peaks: dict[str, float | None],
    flops: NetworkFlops | None = None,
    peer: Callable[[nn.Module, torch.Tensor, Settings, NetworkFlops], dict] | None = None,
    matched_batch: int | None = None,
) -> dict[str, Any]:
    """Count, time and model one target: FLOPs, per-NFE paths, fixed costs, cost model,
    throughput at every NFE of ``target.nfes`` and the end-to-end checks (for the paper
    reference also its ``reference_check`` at a reduced NFE).

    Args:
        target: what to measure (at ``target.batch``; None: auto-sized, CUDA).
        settings: device, precision, compilation, repeats and budget.
        peaks: precision (``bf16``, ``fp32``) → the device's peak FLOP/s (None: unknown).
        flops: the target's :func:`target_flops`, when already counted.
        peer: called with the target's UNet, its label batch, ``settings`` and its FLOPs once
            the target is measured (the MONAI comparison); its result is the record's ``peer``.
        matched_batch: also time the cost model's parts at this batch (the record's
            ``matched``: the same measurement when it is the target's own batch).

    Returns:
        The target's JSON-able record (see :func:`edmcli.bench.bench.bench`).
    """
    s, device, log = settings, settings.device, settings.log
    spec = get_spec(target.model)
    flops = flops or target_flops(target)
    decode_flops = 0
    if target.meta_vae is not None:
        decode_flops = decoder_flops(target.meta_vae, target.net_size, target.image_size)
    m = Measurer(settings)
    log(f"{target.label} ({target.preset}, {target.net_size}²): building the network")
    net = target.load_net(device).eval().requires_grad_(False)
    vae = target.load_vae(device).eval().requires_grad_(False) if target.load_vae else None
    sizing = target.batch_sizing
    batch = target.batch
    if batch is None:
        batch, sizing = _auto_batch(net, target, s, vae)
    noisy = check_solver(target.model) in NOISY_SOLVERS
    labels = label_batch(batch, target.image_size, device)
    x = torch.randn(batch, target.channels, target.net_size, target.net_size, device=device)
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
                compiled = compiled_network(net, device)
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
        images = _decoded(vae, x, labels, decode_flops * batch, m, timings)
    labels_np = labels.cpu().numpy().astype(np.uint8)
    with tempfile.TemporaryDirectory(prefix="echo-synth-bench-") as tmp:
        writer = StoreWriter(Path(tmp), batch, target.image_size)
        timings |= _write_and_noise(writer, images, labels_np, target, device, noisy, s.repeats)
        best = "nfe_cached_compiled" if "nfe_cached_compiled" in timings else "nfe_cached_eager"
        model, cost_record = _cost_model(batch, timings, best)
        runner = compiled if best == "nfe_cached_compiled" else net
        checks, reference = _checks(target, runner, labels, labels_np, vae, writer, model, s, m,
                                    warm=best == "nfe_cached_compiled")  # fmt: skip
    x = cache = images = None
    release_memory(device)
    matched = None
    if matched_batch is not None:
        matched = _at_matched_batch(target, net, runner, vae, matched_batch, batch, best,
                                    noisy, (flops, decode_flops), s, m, peak,
                                    (model, cost_record))  # fmt: skip
    vae = compiled = runner = None
    release_memory(device)
    peer_record = peer(net.net, labels, s, flops) if peer is not None else None
    net = None
    release_memory(device)
    per_call = {
        "spade_cache": flops.spade_cache * batch,
        "nfe_cached_eager": flops.cached * batch,
        "nfe_uncached_eager": flops.uncached * batch,
        "nfe_cached_compiled": flops.cached * batch,
        "nfe_cached_torch_spade": flops.cached * batch,
        "nfe_cached_other_precision": flops.cached * batch,
        "decode": decode_flops * batch,
        "store_write": 0,
        "start_noise": 0,
        "step_noise": 0,
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
        "cost_model": cost_record,
        "throughput": throughput,
        "checks": checks,
        "reference_check": reference,
        "matched": matched,
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


def check_solver(model: str) -> str:
    """The solver of the end-to-end check: the model's own when it spends one NFE per step, else
    ``euler`` (same network cost per NFE as Heun, and every NFE reachable)."""
    solver = get_spec(model).solver
    return solver if nfe_cost(solver, 2) == 2 else "euler"


def reference_check_nfe(seconds_of: Callable[[int], float], budget_s: float) -> int | None:
    """The reduced NFE at which the paper reference is run end to end: the largest of
    :data:`REFERENCE_CHECK_NFES` predicted to take at most ``budget_s`` seconds; None when even
    the smallest does not fit."""
    return next((n for n in REFERENCE_CHECK_NFES if seconds_of(n) <= budget_s), None)


def _checks(target, runner, labels, labels_np, vae, writer, model, s, m, warm) -> tuple:
    """End-to-end seconds of ``generate`` + store write at the NFEs :func:`pick_check_nfes`
    chooses within the budget, next to the cost model's prediction; and for the paper
    reference its ``reference_check`` (see :func:`reference_check_nfe`), else None."""
    solver = check_solver(target.model)
    decode = vae.decode if vae is not None else None
    nfes = pick_check_nfes(target.nfes, model.seconds, s.budget.check_s)
    reference = paper_reference()
    is_reference = target.model == reference.name
    ref_nfe = reference_check_nfe(model.seconds, s.budget.reference_s) if is_reference else None

    def run(nfe: int) -> None:
        steps = plan(solver, nfe).steps
        with s.autocast_ctx():
            images = generate(runner, target.model, labels, range(len(labels)), target.net_size,
                              solver=solver, steps=steps, decode=decode,
                              channels=target.channels)  # fmt: skip
        writer.write(images, labels_np)

    def timed(nfe: int) -> dict[str, Any]:
        timing = time_call(lambda: run(nfe), s.device, 1, 0)
        predicted = model.seconds(nfe)
        return {
            "nfe": nfe, "solver": solver, "measured_s": timing.median_s,
            "predicted_s": predicted,
            "relative_error": relative_error(predicted, timing.median_s),
        }  # fmt: skip

    out = []
    if not nfes:
        m.skipped["checks"] = (
            f"not timed: even NFE {min(target.nfes)} is predicted to take "
            f"{model.seconds(min(target.nfes)):.0f} s (> {s.budget.check_s:.0f} s)"
        )
    if (nfes or ref_nfe) and warm:  # compiled: the sampling call's own graph before timing
        warmup = time_call(lambda: run(1), s.device, 1, 0)
        out.append({"nfe": 1, "warmup_s": warmup.median_s, "solver": solver})
    if nfes:
        s.log(f"{target.label}: end-to-end check at NFE {', '.join(map(str, nfes))} ({solver})")
    for nfe in nfes:
        out.append(timed(nfe))
    if not is_reference:
        return out, None
    at = reference.paper_reference_nfe
    record: dict[str, Any] = {
        "reference_nfe": at, "predicted_reference_s": model.seconds(at),
        "predicted_reference_images_per_s": model.images_per_s(at),
    }  # fmt: skip
    if ref_nfe is None:
        smallest = REFERENCE_CHECK_NFES[-1]
        record["skipped"] = (
            "not run at this configuration (the tiny configurations run it)"
            if s.budget.reference_s <= 0
            else f"not run: even NFE {smallest} is predicted to take "
            f"{model.seconds(smallest):.0f} s (> {s.budget.reference_s:.0f} s, this "
            "configuration's budget for it)"
        )
        return out, record
    check = next((c for c in out if c.get("nfe") == ref_nfe and "measured_s" in c), None)
    if check is None:
        s.log(f"{target.label}: end to end at NFE {ref_nfe} ({solver}), the check of its "
              f"{at}-NFE prediction")  # fmt: skip
        check = {**timed(ref_nfe), "reference": True}
        out.append(check)
    record |= {k: check[k] for k in ("nfe", "solver", "measured_s", "predicted_s",
                                     "relative_error")}  # fmt: skip
    record["measured_over_predicted"] = check["measured_s"] / check["predicted_s"]
    return out, record


def _write_and_noise(writer, images: torch.Tensor, labels_np: np.ndarray, target, device,
                     noisy: bool, repeats: int) -> dict[str, Timing]:  # fmt: skip
    """The fixed costs after the network at one batch: the store write and the noise draws."""
    batch = len(labels_np)
    write = time_call(lambda: writer.write(images, labels_np), device, max(1, repeats), 1)
    return {"store_write": write,
            **_noise_timings(batch, target.net_size, device, noisy, max(3, repeats))}  # fmt: skip


def _decoded(vae, x: torch.Tensor, labels: torch.Tensor, flops: float, m,
             timings: dict[str, Timing]) -> torch.Tensor:  # fmt: skip
    """Images of the final ``x``: the Γ-VAE decode of a latent model, timed into
    ``timings["decode"]``, or pixels from [−1, 1]."""
    latent, sector = x.clamp(-1, 1), sector_mask(labels)
    if vae is None:
        return (latent + 1) / 2
    timings["decode"], images = m.time_keep(lambda: vae.decode(latent, sector, labels), flops)
    return images


def _at_matched_batch(target, net, runner, vae, batch, own_batch, best, noisy, flops_pair, s,
                      m, peak, own) -> dict[str, Any]:  # fmt: skip
    """The cost model's parts at the matched ``batch`` with the same per-NFE path as at the
    target's own batch (``own``: its cost model and record, reused when the batches are equal);
    out of memory: the reason instead."""
    flops, decode_flops = flops_pair
    model, cost_record = own

    def rows(cost: CostModel) -> list[dict[str, Any]]:
        return [{"nfe": n, "images_per_s": cost.images_per_s(n),
                 "seconds_per_batch": cost.seconds(n)} for n in target.nfes]  # fmt: skip

    if batch == own_batch:
        return {"batch": batch, "same_as_fitting": True, "cost_model": cost_record,
                "timings": None, "throughput": rows(model), "skipped": None}  # fmt: skip
    device = s.device
    s.log(f"{target.label}: the cost model's parts at the matched batch {batch}")

    def measure() -> dict[str, Timing]:
        labels = label_batch(batch, target.image_size, device)
        x = torch.randn(batch, target.channels, target.net_size, target.net_size, device=device)
        sigma = torch.tensor(SIGMA, device=device)
        timings: dict[str, Timing] = {}
        with torch.no_grad(), s.autocast_ctx():
            timings["spade_cache"], cache = m.time_keep(lambda: net.spade_cache(labels),
                                                        flops.spade_cache * batch)  # fmt: skip
            timings[best] = m.time(lambda: runner(x, sigma, spade_cache=cache),
                                   flops.cached * batch,
                                   always_warm=best == "nfe_cached_compiled")  # fmt: skip
            images = _decoded(vae, x, labels, decode_flops * batch, m, timings)
        labels_np = labels.cpu().numpy().astype(np.uint8)
        with tempfile.TemporaryDirectory(prefix="echo-synth-bench-") as tmp:
            writer = StoreWriter(Path(tmp), batch, target.image_size)
            return timings | _write_and_noise(writer, images, labels_np, target, device, noisy,
                                              s.repeats)  # fmt: skip

    timings = m.attempt("matched_batch", measure)
    release_memory(device)
    if timings is None:
        return {"batch": batch, "same_as_fitting": False, "cost_model": None, "timings": None,
                "throughput": None, "skipped": m.skipped.get("matched_batch")}  # fmt: skip
    cost, record = _cost_model(batch, timings, best)
    per_call = {"spade_cache": flops.spade_cache * batch, best: flops.cached * batch,
                "decode": decode_flops * batch}  # fmt: skip
    return {
        "batch": batch, "same_as_fitting": False, "cost_model": record,
        "timings": {k: _path_entry(t, per_call.get(k, 0), peak) for k, t in timings.items()},
        "throughput": rows(cost), "skipped": None,
    }  # fmt: skip
