"""Sampling speed: compiled vs eager denoiser, cached vs uncached SPADE γ/β, images/s vs NFE.

Networks are built from the presets with random weights (speed does not depend on training);
latent models include their Γ-VAE decoder. All ratios come from this one run on one device.

    python benchmarks/bench_sampling.py [--device cuda] [--preset tiny|paper] [--batch 8]
        [--models edm-l64 edm] [--nfe 10 50 100] [--no-compile] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from edmcli.data.phantom import generate_patient
from edmcli.models.gamma_vae import GammaVAE, GammaVAEConfig
from edmcli.models.registry import build_model, get_spec
from edmcli.sampling.pipeline import generate


def labels_for(batch: int, size: int, device: torch.device) -> torch.Tensor:
    maps = [r["labels"] for p in range(batch) for r in generate_patient(0, p, size)[:1]]
    return torch.from_numpy(__import__("numpy").stack(maps).astype("int64")).to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int) -> float:
    fn()  # warm-up (and compilation)
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeats


def measure(name, args, labels, device, pixels, dtype) -> dict:
    """Per-NFE times (eager uncached/cached, compiled cached) and images/s per NFE."""
    decode, size = None, pixels
    spec = get_spec(name)
    if spec.is_latent:
        size = spec.net_size(pixels)
        base = 64 if args.preset == "paper" else 16
        vae = GammaVAE(GammaVAEConfig(pixels, size, base, 2 if base == 64 else 1,
                                      32 if base == 64 else 8))  # fmt: skip
        decode = vae.to(device).eval().decode
    net = build_model(name, args.preset, size).to(device).eval()
    x = torch.randn(args.batch, 1, size, size, device=device)
    sigma = torch.tensor(1.0, device=device)
    compiled = None if args.no_compile else torch.compile(net, dynamic=False)
    autocast = torch.autocast(device.type, dtype or torch.float32, enabled=dtype is not None)
    with torch.no_grad(), autocast:
        cache = net.spade_cache(labels)
        t_uncached = timed(lambda: net(x, sigma, labels), device, args.repeats)
        t_cached = timed(lambda: net(x, sigma, spade_cache=cache), device, args.repeats)
        t_compiled = float("nan")
        if compiled is not None:
            t_compiled = timed(lambda: compiled(x, sigma, spade_cache=cache), device, args.repeats)
        row = {
            "model": name, "net_size": size, "ms_per_nfe_eager_uncached": 1e3 * t_uncached,
            "ms_per_nfe_eager_cached": 1e3 * t_cached,
            "ms_per_nfe_compiled_cached": 1e3 * t_compiled,
            "cached_over_uncached_speedup": t_uncached / t_cached,
            "compiled_over_eager_speedup": t_cached / t_compiled,
        }  # fmt: skip
        best = compiled if compiled is not None else net
        for nfe in args.nfe:

            def run(steps=nfe):
                return generate(best, name, labels, range(args.batch), size, solver="euler",
                                steps=steps, decode=decode)  # fmt: skip

            row[f"images_per_s_nfe{nfe}"] = args.batch / timed(run, device, 1)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--image-size", type=int, default=None, help="pixels (default 64/256)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--models", nargs="+", default=["edm-l64", "edm-l128", "edm"])
    parser.add_argument("--nfe", type=int, nargs="+", default=[10, 50, 100])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    device = torch.device(args.device)
    pixels = args.image_size or (256 if args.preset == "paper" else 64)
    dtype = torch.bfloat16 if device.type == "cuda" else None
    print(f"device {device}, preset {args.preset}, {pixels}² images, batch {args.batch}")
    labels = labels_for(args.batch, pixels, device)
    rows = []
    for name in args.models:
        row = measure(name, args, labels, device, pixels, dtype)
        rows.append(row)
        print(
            f"{name:9s} {row['net_size']:4d}²  eager uncached "
            f"{row['ms_per_nfe_eager_uncached']:8.1f} ms/NFE"
            f" | cached {row['ms_per_nfe_eager_cached']:8.1f} "
            f"(×{row['cached_over_uncached_speedup']:.2f})"
            f" | compiled {row['ms_per_nfe_compiled_cached']:8.1f} "
            f"(×{row['compiled_over_eager_speedup']:.2f} over eager cached) | images/s "
            + ", ".join(f"NFE {n}: {row[f'images_per_s_nfe{n}']:.2f}" for n in args.nfe)
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
