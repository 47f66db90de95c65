"""Our SPADE UNet against MONAI's ``SPADEDiffusionModelUNet`` at matched FLOPs per NFE.

MONAI's network is what users of this field already have; at the same channel list the two are
not the same amount of work (at channels (32, 64) ours has 1.71 M parameters, MONAI's 1.00 M), so
the comparison matches *FLOPs per NFE* instead: MONAI's network keeps our levels, blocks per
level, attention levels, SPADE hidden width and group count, and its channels per level are
chosen (:func:`match_widths`) so that one MONAI forward costs what one forward of ours costs with
SPADE γ/β computed from the label map (MONAI has no γ/β cache: it recomputes them at every call).
Both FLOP counts and parameter counts are reported; then, at the same resolution, batch and
noise level, one NFE of ours (γ/β recomputed, and cached) and one of MONAI's are timed, eager and
compiled.

MONAI runs with its own defaults otherwise (convolutional up/down-sampling, its attention through
``scaled_dot_product_attention``: ``use_flash_attention=True``, as ours).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from edmcli.bench.flops import count_flops, network_flops
from edmcli.models.spade import resolve_num_groups
from edmcli.models.unet import SpadeUNet, SpadeUNetConfig, labels_to_onehot

__all__ = ["match_widths", "monai_kwargs", "monai_flops", "our_unet_flops"]

META = torch.device("meta")


def monai_kwargs(config: SpadeUNetConfig, channels: Sequence[int]) -> dict[str, Any]:
    """Arguments of MONAI's ``SPADEDiffusionModelUNet`` with our ``config``'s structure (levels,
    blocks, attention levels, SPADE width, groups of the first level) and ``channels``."""
    levels = len(config.channel_mult)
    if len(channels) != levels:
        raise ValueError(f"channels must list {levels} widths, got {tuple(channels)}.")
    attention = set(config.attention_levels())
    head = config.attention_head_channels
    return {
        "spatial_dims": 2,
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "label_nc": config.label_classes,
        "num_res_blocks": config.num_blocks,
        "channels": tuple(int(c) for c in channels),
        "attention_levels": tuple(level in attention for level in range(levels)),
        "norm_num_groups": resolve_num_groups(config.model_channels, config.num_groups),
        "num_head_channels": tuple(int(c) if head is None else head for c in channels),
        "spade_intermediate_channels": config.spade_hidden,
        "use_flash_attention": True,
    }


def width_steps(config: SpadeUNetConfig) -> tuple[int, ...]:
    """Granularity of MONAI's width per level: a multiple of its group count, and at attention
    levels also of the head width."""
    groups = resolve_num_groups(config.model_channels, config.num_groups)
    head = config.attention_head_channels or groups
    attention = set(config.attention_levels())
    both = groups * head // math.gcd(groups, head)
    return tuple(
        both if level in attention else groups for level in range(len(config.channel_mult))
    )


def build_monai(kwargs: dict[str, Any]) -> nn.Module:
    """MONAI's ``SPADEDiffusionModelUNet`` (imported here: MONAI is only needed for the peer)."""
    from monai.networks.nets import SPADEDiffusionModelUNet

    return SPADEDiffusionModelUNet(**kwargs)


def monai_flops(kwargs: dict[str, Any], size: int) -> tuple[int, int]:
    """(FLOPs of one forward at batch 1, parameters) of MONAI's network, counted on meta."""
    with META:
        net = build_monai(kwargs).eval()
    x = torch.zeros(1, kwargs["in_channels"], size, size, device=META)
    seg = torch.zeros(1, kwargs["label_nc"], size, size, device=META)
    t = torch.zeros(1, dtype=torch.long, device=META)
    return count_flops(lambda: net(x, t, seg)).total, sum(p.numel() for p in net.parameters())


def our_unet_flops(config: SpadeUNetConfig) -> dict[str, int]:
    """FLOPs of one forward of our :class:`SpadeUNet` at batch 1 (γ/β recomputed, and from the
    cache) and its parameters, counted on meta by :func:`~edmcli.bench.flops.network_flops`."""
    n = config.image_size
    counted = network_flops(lambda: SpadeUNet(config), n, n)
    return {"uncached": counted.uncached, "cached": counted.cached, "params": counted.params}


def match_widths(
    base: Sequence[int],
    flops_of: Callable[[tuple[int, ...]], float],
    target: float,
    steps: Sequence[int],
    tol: float = 0.01,
    max_evals: int = 24,
) -> tuple[tuple[int, ...], float]:
    """Channel widths (level ``i`` a multiple of ``steps[i]``) whose ``flops_of`` is nearest
    ``target``.

    First a uniform scale of ``base`` (FLOPs grow about as its square: up to three secant steps
    on the square root), then rounds of one-step moves of one level at a time in the direction
    of the target, each round taking the best move, until within ``tol`` (relative), no move
    helps, or ``max_evals`` evaluations. Returns (widths, their FLOPs).
    """
    steps = tuple(int(s) for s in steps)
    if len(steps) != len(base) or min(steps) < 1 or target <= 0:
        raise ValueError(
            f"match_widths needs one step >= 1 per level and target > 0, got {steps}, {target}."
        )
    seen: dict[tuple[int, ...], float] = {}

    def flops(w: tuple[int, ...]) -> float:
        if w not in seen:
            seen[w] = float(flops_of(w))
        return seen[w]

    def error(w: tuple[int, ...]) -> float:
        return abs(flops(w) / target - 1.0)

    def scaled(scale: float) -> tuple[int, ...]:
        return tuple(max(st, round(scale * b / st) * st) for b, st in zip(base, steps, strict=True))

    scale, widths = 1.0, scaled(1.0)
    for _ in range(3):
        if error(widths) <= tol:
            break
        scale *= math.sqrt(target / flops(widths))
        nxt = scaled(scale)
        if nxt in seen:
            break
        widths = nxt
    best = min(seen, key=error)
    while error(best) > tol and len(seen) < max_evals:
        sign = 1 if flops(best) < target else -1
        moves = [
            best[:i] + (best[i] + sign * st,) + best[i + 1 :]
            for i, st in enumerate(steps)
            if best[i] + sign * st >= st
        ]
        moves = moves[: max(0, max_evals - len(seen))] or []
        if not moves:
            break
        candidate = min(moves, key=error)
        if error(candidate) >= error(best):
            break
        best = candidate
    return best, flops(best)


def match_peer(
    config: SpadeUNetConfig, ours: dict[str, int] | None = None, tol: float = 0.01
) -> dict[str, Any]:
    """MONAI's configuration at FLOPs matched to ours (γ/β recomputed), with both networks'
    FLOPs and parameters, and MONAI's at our channel list for reference.

    ``ours``: our network's :func:`our_unet_flops` when already counted (the preconditioning
    around the UNet adds no counted FLOPs)."""
    ours = ours or our_unet_flops(config)
    base = tuple(config.model_channels * m for m in config.channel_mult)
    size = config.image_size
    counted: dict[tuple[int, ...], tuple[int, int]] = {}

    def flops_of(widths: tuple[int, ...]) -> float:
        counted[widths] = monai_flops(monai_kwargs(config, widths), size)
        return counted[widths][0]

    steps = width_steps(config)
    same = tuple(max(st, round(b / st) * st) for b, st in zip(base, steps, strict=True))
    widths, matched = match_widths(same, flops_of, ours["uncached"], steps, tol)
    if same not in counted:
        flops_of(same)
    return {
        "ours": {"channels": list(base), **ours},
        "monai": {
            "channels": list(widths),
            "flops": int(matched),
            "params": counted[widths][1],
            "flops_rel_to_ours_uncached": matched / ours["uncached"] - 1.0,
            "kwargs": {
                k: list(v) if isinstance(v, tuple) else v
                for k, v in monai_kwargs(config, widths).items()
            },  # fmt: skip
        },
        "monai_at_our_channels": {
            "channels": list(same),
            "flops": counted[same][0],
            "params": counted[same][1],
        },
    }


def time_peer(
    our_unet: SpadeUNet,
    labels: torch.Tensor,
    match: dict[str, Any],
    measure: Any,
    compile_fn: Callable[[nn.Module], nn.Module] | None,
    autocast_ctx: Callable[[], Any],
) -> dict[str, Any]:
    """Time one NFE of ``our_unet`` (γ/β recomputed and cached) and of MONAI's matched network
    at the batch of ``labels``; eager, and compiled with ``compile_fn`` when given.

    ``measure`` is the target's measurer (its ``time(fn, flops, always_warm)`` and
    ``attempt(name, fn)``): the same budget and warm-up rules as every other timing.
    """
    config = our_unet.config
    device = labels.device
    batch, n = labels.shape[0], config.image_size
    monai = build_monai(match["monai"]["kwargs"]).to(device).eval().requires_grad_(False)
    x = torch.randn(batch, config.in_channels, n, n, device=device)
    c_noise = torch.full((batch,), 0.25, device=device)
    steps = torch.full((batch,), 500, dtype=torch.long, device=device)
    ours_f, monai_f = match["ours"], match["monai"]["flops"]
    timings: dict[str, Any] = {}
    with torch.no_grad():
        with autocast_ctx():
            seg = labels_to_onehot(labels, n, config.label_classes).to(x.dtype)
            cache = our_unet.spade_cache(labels)
            timings["ours_uncached_eager"] = measure.time(
                lambda: our_unet(x, c_noise, labels), ours_f["uncached"] * batch
            )
            timings["ours_cached_eager"] = measure.time(
                lambda: our_unet(x, c_noise, spade_cache=cache), ours_f["cached"] * batch
            )
            timings["monai_eager"] = measure.time(lambda: monai(x, steps, seg), monai_f * batch)
        if compile_fn is not None:
            ours_c, monai_c = compile_fn(our_unet), compile_fn(monai)

            def compiled(fn: Callable[[], object], flops: float):
                def run():
                    with autocast_ctx():
                        return measure.time(fn, flops, always_warm=True)

                return run

            for name, fn, flops in (
                ("ours_cached_compiled", lambda: ours_c(x, c_noise, spade_cache=cache),
                 ours_f["cached"] * batch),
                ("monai_compiled", lambda: monai_c(x, steps, seg), monai_f * batch),
            ):  # fmt: skip
                timing = measure.attempt(name, compiled(fn, flops))
                if timing is not None:
                    timings[name] = timing
    monai = None  # free it before the next network is built
    record = {key: t.to_dict() for key, t in timings.items()}
    med = {key: t.median_s for key, t in timings.items()}
    ratios = []
    for name, ours_key, monai_key, ours_flops in (
        ("MONAI / ours, γ/β cached, eager", "ours_cached_eager", "monai_eager", ours_f["cached"]),
        ("MONAI / ours, γ/β recomputed, eager", "ours_uncached_eager", "monai_eager",
         ours_f["uncached"]),
        ("MONAI / ours, γ/β cached, compiled", "ours_cached_compiled", "monai_compiled",
         ours_f["cached"]),
    ):  # fmt: skip
        if ours_key in med and monai_key in med:
            ratios.append({"name": name, "value": med[monai_key] / med[ours_key],
                           "flop_ceiling": monai_f / ours_flops, "source": "measured"})  # fmt: skip
    return {"batch": batch, "resolution": n, "timings": record, "ratios": ratios}
