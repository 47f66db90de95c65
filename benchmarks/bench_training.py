"""Training speed: a few optimiser steps of every model at its paper configuration.

For each model the network and loss come from the registry (``build_model`` / ``build_loss``,
random weights), the batch is the paper's (``ModelSpec.paper_batch``: 24 at 256² pixels, 54 at
128², 120 at 64² latents) or, when that runs out of memory, the largest power-of-two fraction of
it that fits. Each step is what the training engine does: bf16 autocast (CUDA), the model's
masked loss on random images/latents with phantom label maps, backward, gradient clipping,
AdamW. Warm-up steps are timed apart from the steady state; reported: images/s (median over the
timed steps), seconds per step, peak memory, and an estimated MFU (3 × the forward FLOPs per
image, counted on the meta device, against the card's bf16 peak where known).

    python benchmarks/bench_training.py [--device cuda] [--preset paper|tiny] [--models ...]
        [--steps 5] [--warmup 2] [--batch N] [--json FILE]

Latent models train on latents (one channel at 64² or 128²) with label maps at 256²; the Γ-VAE
encoder is not in the step (training encodes once, before the loop).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edmcli.bench.flops import network_flops, peak_flops  # noqa: E402
from edmcli.bench.throughput import label_batch  # noqa: E402
from edmcli.data.labels import sector_mask  # noqa: E402
from edmcli.models.registry import (  # noqa: E402
    build_loss,
    build_model,
    get_spec,
    loss_settings,
    model_names,
    precond_settings,
)
from edmcli.settings import PIXEL_SIZE  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_steps(name: str, preset: str, batch: int, device: torch.device, steps: int,
                warmup: int, bf16: bool) -> dict:  # fmt: skip
    """Time ``warmup`` + ``steps`` optimiser steps of ``name`` at ``batch``."""
    spec = get_spec(name)
    pixels = PIXEL_SIZE[preset]
    size = spec.net_size(pixels)
    with device:
        net = build_model(name, preset, size).train()
    loss_fn = build_loss(name, **loss_settings(name, precond_settings(name)))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    labels = label_batch(batch, pixels, device)
    sector = sector_mask(labels)
    images = torch.rand(batch, 1, size, size, device=device) * 2 - 1
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step() -> float:
        sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            loss, _ = loss_fn(net, images, labels, sector)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sync(device)
        return time.perf_counter() - start

    warm = [step() for _ in range(warmup)]
    timed = [step() for _ in range(steps)]
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"warmup_s": warm, "step_s": timed, "peak_bytes": peak, "net_size": size}


def measure(name: str, args, device: torch.device, peak: float | None) -> dict:
    spec = get_spec(name)
    wanted = args.batch or spec.paper_batch
    batch, oom = wanted, []
    run = None
    while run is None:
        if device.type == "cuda":  # the previous model's (or attempt's) memory back first
            torch.cuda.empty_cache()
        try:
            run = train_steps(name, args.preset, batch, device, args.steps, args.warmup,
                              args.bf16)  # fmt: skip
        except torch.OutOfMemoryError:
            oom.append(batch)
            if batch == 1:
                return {"model": name, "batch": None, "error": "out of memory at batch 1"}
            batch = max(1, batch // 2)
    size = run["net_size"]
    flops = network_flops(lambda: build_model(name, args.preset, size), size,
                          PIXEL_SIZE[args.preset])  # fmt: skip
    median = statistics.median(run["step_s"])
    ips = batch / median
    return {
        "model": name, "preset": args.preset, "net_size": size, "paper_batch": spec.paper_batch,
        "batch": batch, "paper_batch_fits": batch == wanted, "out_of_memory_at": oom,
        "images_per_s": ips, "step_s_median": median, "step_s": run["step_s"],
        "warmup_s": run["warmup_s"], "peak_memory_bytes": run["peak_bytes"],
        "forward_flops_per_image": flops.uncached,
        "mfu_estimate": 3 * flops.uncached * ips / peak if peak else None,
        "precision": "bf16" if args.bf16 else "fp32",
    }  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default="paper", choices=("paper", "tiny"))
    parser.add_argument("--models", nargs="+", default=list(model_names()))
    parser.add_argument("--steps", type=int, default=5, help="timed optimiser steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed-in-median warm-up steps")
    parser.add_argument("--batch", type=int, help="override the paper batch")
    parser.add_argument("--fp32", dest="bf16", action="store_false", help="no bf16 autocast")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was asked for but CUDA is not available")
    if device.type != "cuda":
        args.bf16 = False
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_flops(name, "bf16") if args.bf16 else None
    print(f"device {name}; preset {args.preset}; {'bf16' if args.bf16 else 'fp32'}; "
          f"{args.warmup} warm-up + {args.steps} timed steps")  # fmt: skip
    rows = []
    for model in args.models:
        row = measure(model, args, device, peak)
        rows.append(row)
        if row.get("error"):
            print(f"{model:9s} {row['error']}")
            continue
        mem, mfu = row["peak_memory_bytes"], row["mfu_estimate"]
        print(
            f"{model:9s} {row['net_size']:4d}² batch {row['batch']:4d}"
            f"{'' if row['paper_batch_fits'] else ' (paper ' + str(row['paper_batch']) + ')'}: "
            f"{row['images_per_s']:8.2f} img/s, {row['step_s_median']:.3f} s/step, "
            f"peak {'n/a' if mem is None else f'{mem / 2**30:.1f} GiB'}, MFU≈"
            f"{'n/a' if mfu is None else f'{100 * mfu:.0f} %'}"
        )
        if args.json:  # written after every model: a time limit still leaves the rows so far
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"device": name, "rows": rows}, indent=2))
    return {"device": name, "rows": rows}


if __name__ == "__main__":
    main()
