"""Benchmark of the fused SPADE group norm against PyTorch eager and torch.compile.

Times, in one run on one device, ``GroupNorm(x)·(1+γ)+β`` followed by SiLU (the SPADE blocks of
the UNets) for the activation shapes of the paper's models, forward and forward+backward:

- ``fused``: :func:`kernels.spade_group_norm` forced onto the Triton custom op;
- ``eager``: ``F.group_norm`` then the modulation and ``F.silu``, in the input dtype;
- ``compiled``: ``torch.compile`` of that eager composite (fresh graph per shape).

For each row it prints milliseconds (median over repetitions, L2 flushed before each), the
achieved bandwidth of the fused kernel counted on the minimal traffic (forward: read x, γ, β,
write y; backward: read dy, x, γ, β, write dx, dγ, dβ; without SiLU β is not read and dβ = dy is
not written), that bandwidth as a percentage of the device's peak (from its memory clock and bus
width), and the speed-ups eager/fused and compiled/fused (how many times faster the fused path
is). On a machine without CUDA it times the reference paths only and says so.

    python benchmarks/bench_spade_norm.py [--device cuda] [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

try:
    import echo_synth_kernels as kernels
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import echo_synth_kernels as kernels

# (name, channels, resolution) of SPADE-normalised activations: the ADM-style UNet of the pixel
# models (192 channels, multipliers 1-2-3-4 at 256² … 32²) and the top level of the latent ones.
PAPER_SHAPES = [
    ("pixel-256 L0", 192, 256),
    ("pixel-256 L1", 384, 128),
    ("pixel-256 L2", 576, 64),
    ("pixel-256 L3", 768, 32),
    ("latent-128 L0", 192, 128),
    ("latent-64 L0", 192, 64),
]
PAPER_BATCHES = [1, 8, 32]
QUICK_SHAPES = [("quick", 16, 12), ("quick", 24, 20)]
QUICK_BATCHES = [1, 2]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def eager_composite(
    x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, groups: int, silu: bool
) -> torch.Tensor:
    """What one writes without the kernel: group norm, modulation, SiLU, in x's dtype."""
    y = F.group_norm(x, groups) * (1 + gamma) + beta
    return F.silu(y) if silu else y


def fused(
    x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, groups: int, silu: bool
) -> torch.Tensor:
    with kernels.spade_backend("triton"):
        return kernels.spade_group_norm(x, gamma, beta, groups, silu=silu)


def reference(
    x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, groups: int, silu: bool
) -> torch.Tensor:
    with kernels.spade_backend("torch"):
        return kernels.spade_group_norm(x, gamma, beta, groups, silu=silu)


def peak_bandwidth(device: torch.device) -> float | None:
    """Theoretical DRAM bandwidth in bytes/s (double data rate × bus width), if known."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", 0)
    bus_bits = getattr(props, "memory_bus_width", 0)
    if not clock_khz or not bus_bits:
        return None
    return 2.0 * clock_khz * 1e3 * bus_bits / 8


def time_ms(fn: Callable[[], object], device: torch.device, reps: int, warmup: int) -> float:
    """Median milliseconds of ``fn``; on CUDA with events and the L2 cache flushed each time."""
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        samples = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
        return statistics.median(samples)
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device=device)
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        for _ in range(reps)
    ]
    torch.cuda.synchronize(device)
    for start, end in events:
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return statistics.median(start.elapsed_time(end) for start, end in events)


def _step(
    fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor], dy: torch.Tensor, backward: bool
) -> Callable[[], object]:
    if not backward:
        return lambda: fn(*inputs)
    return lambda: torch.autograd.grad(fn(*inputs), inputs, dy)


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    on_cuda = device.type == "cuda"
    if on_cuda and not kernels.TRITON_AVAILABLE:
        raise SystemExit("CUDA is available but Triton is not installed: nothing fused to time.")
    shapes = QUICK_SHAPES if args.quick else PAPER_SHAPES
    batches = args.batches or (QUICK_BATCHES if args.quick else PAPER_BATCHES)
    reps, warmup = (3, 2) if args.quick else (args.reps, 3)
    peak = peak_bandwidth(device)
    silu = not args.no_silu
    if on_cuda:
        name = torch.cuda.get_device_name(device)
        peak_txt = f"{peak / 1e9:.0f} GB/s peak" if peak else "peak bandwidth unknown"
        print(f"device: {name} ({peak_txt}); dtype {args.dtype}; groups {args.groups}; silu {silu}")
    else:
        print(
            f"device: {device} — no CUDA: timing the reference paths only: the eager composite and "
            "kernels.spade_group_norm on its torch path (ref.); GB/s is the reference's."
        )
    # each shape compiles its own graph: allow every recompilation of the composite
    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 1024)
    compiled = torch.compile(eager_composite, fullgraph=True, dynamic=False) if on_cuda else None

    main_col = "fused ms" if on_cuda else "ref. ms"
    header = (
        f"{'shape':<14} {'N':>3} {'C':>4} {'HxW':>8} {'pass':<8} {main_col:>9} {'eager ms':>9} "
        f"{'compiled':>9} {'GB/s':>7} {'%peak':>6} {'x eager':>8} {'x comp.':>8} {'max err':>8}"
    )
    print(header)
    print("-" * len(header))
    rows = []
    gen = torch.Generator(device=device).manual_seed(0)
    for name, channels, res in shapes:
        for batch in batches:
            shape = (batch, channels, res, res)
            x, gamma, beta, dy = (
                torch.randn(shape, generator=gen, device=device, dtype=dtype) for _ in range(4)
            )
            gamma.mul_(0.1)
            numel, size = x.numel(), x.element_size()
            for backward in (False, True):
                inputs = [t.detach().requires_grad_(backward) for t in (x, gamma, beta)]
                paths = {"eager": eager_composite}
                if on_cuda:
                    paths |= {"fused": fused, "compiled": compiled}
                else:
                    paths |= {"reference": reference}
                ms = {
                    key: time_ms(
                        _step(lambda *t, f=f: f(*t, args.groups, silu), inputs, dy, backward),
                        device,
                        reps,
                        warmup,
                    )
                    for key, f in paths.items()
                }
                main = "fused" if on_cuda else "reference"
                with torch.no_grad():
                    err = (
                        (
                            paths[main](x, gamma, beta, args.groups, silu).float()
                            - eager_composite(x, gamma, beta, args.groups, silu).float()
                        )
                        .abs()
                        .max()
                        .item()
                    )
                tensors = 4 + ((7 if silu else 5) if backward else 0)
                gbps = tensors * numel * size / (ms[main] * 1e-3) / 1e9
                row = {
                    "shape": name,
                    "batch": batch,
                    "channels": channels,
                    "resolution": res,
                    "pass": "fwd+bwd" if backward else "fwd",
                    "dtype": args.dtype,
                    "fused_ms": ms.get("fused"),
                    "eager_ms": ms["eager"],
                    "compiled_ms": ms.get("compiled"),
                    "reference_ms": ms.get("reference"),
                    "bytes": tensors * numel * size,
                    "gbps": gbps,
                    "pct_peak": 100 * gbps * 1e9 / peak if peak else None,
                    "speedup_vs_eager": ms["eager"] / ms["fused"] if on_cuda else None,
                    "speedup_vs_compiled": ms["compiled"] / ms["fused"] if on_cuda else None,
                    "max_abs_err_vs_eager": err,
                }
                rows.append(row)
                print(_format(row, on_cuda))
            del x, gamma, beta, dy, inputs
            if on_cuda:
                torch.cuda.empty_cache()
    return {
        "device": torch.cuda.get_device_name(device) if on_cuda else str(device),
        "peak_bytes_per_s": peak,
        "fused": on_cuda,
        "dtype": args.dtype,
        "groups": args.groups,
        "silu": silu,
        "reps": reps,
        "rows": rows,
    }


def _format(row: dict, on_cuda: bool) -> str:
    def num(value: float | None, fmt: str) -> str:
        return "n/a" if value is None else format(value, fmt)

    main_ms = row["fused_ms"] if on_cuda else row["reference_ms"]
    return (
        f"{row['shape']:<14} {row['batch']:>3} {row['channels']:>4} "
        f"{row['resolution']:>4}x{row['resolution']:<3} {row['pass']:<8} {main_ms:>9.3f} "
        f"{row['eager_ms']:>9.3f} {num(row['compiled_ms'], '.3f'):>9} {row['gbps']:>7.0f} "
        f"{num(row['pct_peak'], '.0f'):>6} {num(row['speedup_vs_eager'], '.2f'):>8} "
        f"{num(row['speedup_vs_compiled'], '.2f'):>8} {row['max_abs_err_vs_eager']:>8.1e}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, seconds (smoke test)")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default bf16 on CUDA, else fp32")
    parser.add_argument("--groups", type=int, default=32)
    parser.add_argument("--batches", type=int, nargs="+", help="override the batch sizes")
    parser.add_argument("--reps", type=int, default=20, help="timed repetitions per cell")
    parser.add_argument("--no-silu", action="store_true", help="modulation without SiLU")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda was asked for but CUDA is not available.")
    if args.dtype is None:
        args.dtype = "bf16" if args.device.startswith("cuda") else "fp32"
    if args.quick:
        args.groups = min(args.groups, 4)
    result = run(args)
    print(
        "speed-ups are eager ms / fused ms and compiled ms / fused ms; GB/s and % of peak are the "
        "fused path's"
        if result["fused"]
        else "no CUDA: reference paths only, nothing fused timed."
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
