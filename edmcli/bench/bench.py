"""``echo-synth bench``: the paper's computational-cost study (section IV.C, Fig. 4) as a stage.

:func:`bench` measures, for each model, one or more *scales* (configurations) and writes
``bench.json`` and ``throughput.png`` (plus ``frontier.png`` with ``reports``) under ``out``:

- per scale and model: FLOPs per NFE and per image (:mod:`edmcli.bench.flops`), one NFE timed
  with SPADE γ/β cached and recomputed, eager and compiled, on CUDA also with the torch SPADE
  path (vs the fused Triton kernel) and in the other precision (bf16 vs fp32); the fixed costs
  per batch (γ/β cache, Γ-VAE decode, store write); the cost model and images/s at every NFE,
  checked end to end at a few NFEs (:mod:`edmcli.bench.throughput`);
- the ratios, each next to its FLOP ceiling (the same ratio of counted FLOPs): EDM-L64 / EDM and
  EDM-L64 / EDM-L128 per NFE and at :data:`RATIO_NFE` NFE, every model at :data:`RATIO_NFE`
  against SDM at 1000 NFE, cached vs recomputed γ/β, compiled vs eager, Triton vs torch SPADE and
  bf16 vs fp32;
- our UNet against MONAI's at matched FLOPs (:mod:`edmcli.bench.peer`).

Scales (``preset``):

| preset | CUDA | CPU |
|---|---|---|
| ``auto`` (default) | ``paper``, batch auto-sized | ``paper`` batch 1 + ``tiny`` batch 4 |
| ``paper`` / ``tiny`` | that preset, batch auto-sized | that preset, batch 1 (paper) or 4 (tiny) |
| ``run`` dirs given | the runs' own networks (trained weights) | the same |

On the CPU the ``auto`` ratio table times one NFE of each path at the paper's configurations:
the big networks once, without a separate warm-up, their optional paths (γ/β recomputed, the
MONAI peer) only where one call is predicted under :data:`CPU_AUTO_PAPER`'s cap, and nothing
compiled; the ``tiny`` sweep times every path and checks the cost model end to end.

Weights are random for the presets (speed does not depend on them); SDM at 1000 NFE is always
the cost model's prediction from SDM's measured per-NFE and fixed costs (it is never run for
1000 NFE here), and every images/s is labelled measured or predicted.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from edmcli.bench.flops import NetworkFlops, peak_flops
from edmcli.bench.peer import match_peer, time_peer
from edmcli.bench.plot import (
    cheapest_within,
    frontier_points,
    pareto_front,
    plot_frontier,
    plot_throughput,
    read_reports,
    sdm_reference,
)
from edmcli.bench.throughput import (
    Budget,
    Measurer,
    Settings,
    Target,
    measure_target,
    target_flops,
)
from edmcli.data.store import code_version, jsonable
from edmcli.errors import EchoSynthError
from edmcli.models.gamma_vae import GammaVAE
from edmcli.models.registry import PIXEL_SIZE, build_model, get_spec, model_names
from edmcli.runs.diffusion_run import (
    DiffusionSettings,
    build_network,
    check_model_name,
    load_diffusion_run,
    resolve_run,
)
from edmcli.runs.distributed import resolve_device
from edmcli.runs.folder import load_run_config
from edmcli.runs.vae_run import VAESettings
from edmcli.settings import PRESETS

__all__ = [
    "CPU_AUTO_PAPER",
    "DEFAULT_NFES",
    "RATIO_NFE",
    "Scale",
    "bench",
    "plan_scales",
    "ratio_rows",
    "render",
]

DEFAULT_NFES = (1, 2, 5, 10, 20, 50, 100, 200)
SDM_NFE = 1000  # the paper's reference: SDM's own 1000 steps (always predicted here)
RATIO_NFE = 100  # the NFE of the paper's throughput ratios
PRESET_CHOICES = ("auto", "tiny", "paper")
DTYPE_CHOICES = ("auto", "fp32", "bf16")
CPU_BATCH = {"paper": 1, "tiny": 4}
PEER_MODEL = "edm-l64"  # the model whose UNet meets MONAI's (else the first one measured)

# Time budgets (see throughput.Budget). The CPU default must finish in minutes: at the paper's
# configurations one pixel-space NFE takes ≈ 20–30 s on two cores, so those are timed once,
# without a separate warm-up, and their γ/β-recomputed path is not timed.
CPU_AUTO_PAPER = Budget(measure_s=6.0, optional_cap_s=10.0, check_s=5.0)
CPU_TINY = Budget(measure_s=10.0, optional_cap_s=None, check_s=15.0)
CPU_PAPER = Budget(measure_s=60.0, optional_cap_s=None, check_s=120.0)
CUDA_BUDGET = Budget(measure_s=10.0, optional_cap_s=None, check_s=15.0)


@dataclass(frozen=True)
class Scale:
    """One configuration of every model: what is measured and how.

    Attributes:
        name: ``paper``, ``tiny`` or ``runs``.
        title: one line for tables and plots.
        batch: images per batch; None: per target (auto-sized on CUDA, :data:`CPU_BATCH`).
        compile: whether the compiled path is timed.
        repeats: timed repeats per measurement (cut by the budget).
        budget: the time budget of each target.
        peer: whether MONAI's UNet is compared here.
    """

    name: str
    title: str
    batch: int | None
    compile: bool
    repeats: int
    budget: Budget
    peer: bool


def plan_scales(
    device_type: str,
    preset: str,
    runs: bool,
    batch: int | None,
    repeats: int | None,
    compile: bool | None,
    peer: bool,
) -> tuple[list[Scale], list[str]]:
    """The scales to measure for these options, and the notes that explain the choices."""
    cuda = device_type == "cuda"
    notes: list[str] = []
    if compile is None:
        compile = cuda
        if not cuda:
            notes.append(
                "compilation off on the CPU by default (torch.compile takes a minute or more per "
                "network here); --compile times it (in the auto mode: on the tiny sweep only)"
            )
    if runs:
        budget = CUDA_BUDGET if cuda else CPU_PAPER
        return [Scale("runs", "trained runs", batch, compile, repeats or (5 if cuda else 3),
                      budget, peer)], notes  # fmt: skip
    if cuda:
        name = "paper" if preset == "auto" else preset
        title = f"{name} configs, batch " + (str(batch) if batch else "auto-sized")
        return [Scale(name, title, batch, compile, repeats or 5, CUDA_BUDGET, peer)], notes
    if preset == "auto":
        notes.append(
            "CPU default: the ratio table at the paper's configurations, batch 1 (one NFE of each "
            "path; big networks timed once without a separate warm-up; paths predicted to take "
            f"over {CPU_AUTO_PAPER.optional_cap_s:.0f} s per call not timed), and the NFE sweep "
            "at the tiny configurations"
        )
        paper = Scale(
            "paper",
            f"paper configs, batch {batch or CPU_BATCH['paper']} (CPU)",
            batch or CPU_BATCH["paper"],
            False,
            repeats or 2,
            CPU_AUTO_PAPER,
            peer,
        )
        tiny = Scale(
            "tiny",
            f"tiny configs, batch {batch or CPU_BATCH['tiny']} (CPU)",
            batch or CPU_BATCH["tiny"],
            compile,
            repeats or 3,
            CPU_TINY,
            peer,
        )
        return [paper, tiny], notes  # fmt: skip
    size = batch or CPU_BATCH[preset]
    budget = CPU_PAPER if preset == "paper" else CPU_TINY
    return [Scale(preset, f"{preset} configs, batch {size} (CPU)", size, compile,
                  repeats or (2 if preset == "paper" else 3), budget, peer)], notes  # fmt: skip


# --------------------------------------------------------------------------- inputs
def _split(values: Sequence[str] | None) -> list[str]:
    return [part.strip() for value in values or () for part in str(value).split(",")
            if part.strip()]  # fmt: skip


def parse_models(values: Sequence[str] | None) -> list[str]:
    """``--models`` (repeatable, comma lists) → registry names, in order, each once."""
    names = _split(values) or list(model_names())
    for name in names:
        check_model_name(name)
    return list(dict.fromkeys(names))


def parse_nfes(values: Sequence[str | int] | None) -> list[int]:
    """``--nfe`` (repeatable, comma lists) → sorted distinct integers ≥ 1."""
    if not values:
        return list(DEFAULT_NFES)
    out = []
    for part in _split([str(v) for v in values]):
        try:
            nfe = int(part)
        except ValueError:
            raise EchoSynthError(f"--nfe {part!r} is not an integer") from None
        if nfe < 1:
            raise EchoSynthError(f"--nfe {nfe} must be at least 1 (network evaluations)")
        out.append(nfe)
    return sorted(set(out))


def _vae_config(preset: str, image_size: int, latent: int):
    row = PRESETS["vae"][preset]
    settings = VAESettings(
        data="", latent=latent, image_size=image_size, base_channels=row["base_channels"],
        num_res_blocks=row["num_res_blocks"], norm_groups=row["norm_groups"],
    )  # fmt: skip
    return settings.model_config()


def _on(device: torch.device, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    with device:
        return build()


def preset_target(model: str, preset: str, nfes: Sequence[int], batch: int | None) -> Target:
    """A randomly initialised ``model`` at ``preset``'s configuration."""
    spec = get_spec(model)
    image_size = PIXEL_SIZE[preset]
    net_size = spec.net_size(image_size)

    def net() -> torch.nn.Module:
        return build_model(model, preset, net_size)

    meta_vae = load_vae = None
    if spec.is_latent:
        config = _vae_config(preset, image_size, spec.latent)

        def meta_vae() -> torch.nn.Module:
            return GammaVAE(config)

        def load_vae(device: torch.device) -> torch.nn.Module:
            return _on(device, meta_vae)

    return Target(
        label=model, model=model, preset=preset, image_size=image_size, net_size=net_size,
        meta_net=net, load_net=lambda device: _on(device, net), meta_vae=meta_vae,
        load_vae=load_vae, weights="random (speed does not depend on the weights)",
        nfes=_model_nfes(model, nfes), batch=batch,
    )  # fmt: skip


def run_target(run: Path, nfes: Sequence[int], batch: int | None, device: torch.device) -> Target:
    """The network (EMA weights) and Γ-VAE of a trained diffusion run."""
    model, path = resolve_run(None, run, Path("runs"))
    config = load_run_config(path)
    names = {f.name for f in fields(DiffusionSettings)}
    settings = DiffusionSettings(**{k: v for k, v in config.items() if k in names})

    @lru_cache(maxsize=1)
    def loaded():
        return load_diffusion_run(model, path, device)

    latent = get_spec(model).is_latent
    if batch is None and device.type != "cuda":
        batch = CPU_BATCH["paper" if settings.preset == "paper" else "tiny"]
    return Target(
        label=path.name, model=model, preset="run", image_size=settings.image_size,
        net_size=settings.net_size, meta_net=lambda: build_network(settings),
        load_net=lambda _device: loaded().net,
        meta_vae=(lambda: GammaVAE(loaded().vae.settings.model_config())) if latent else None,
        load_vae=(lambda _device: loaded().vae.model) if latent else None,
        weights=f"trained run {path}", nfes=_model_nfes(model, nfes), batch=batch,
    )  # fmt: skip


def _model_nfes(model: str, nfes: Sequence[int]) -> list[int]:
    return sorted(set(nfes) | ({SDM_NFE} if model == "sdm" else set()))


# --------------------------------------------------------------------------- ratios
def per_image_flops(entry: dict[str, Any], nfe: int) -> float:
    """FLOPs of one image at ``nfe``: γ/β cache + decode + NFE × the cached network."""
    f = entry["flops_per_image"]
    return f["spade_cache"] + f["decode"] + nfe * f["cached"]


def images_per_second(entry: dict[str, Any], nfe: int) -> float:
    """Images/s of a measured ``entry`` at ``nfe``, from its cost model (batch / (fixed +
    NFE × per-NFE seconds))."""
    c = entry["cost_model"]
    return c["batch"] / (c["fixed_s"] + nfe * c["per_nfe_s"])


def _median(entry: dict[str, Any], key: str) -> float | None:
    timing = entry["timings"].get(key)
    return None if timing is None else timing["median_s"]


def ratio_rows(entries: Sequence[dict[str, Any]], peaks: dict[str, float | None]) -> list[dict]:
    """Every ratio of the paper's cost study that ``entries`` (one scale) allow, each with its
    ceiling: the same ratio of counted FLOPs, or for a change that keeps the FLOPs (compiled vs
    eager, Triton vs torch SPADE) 1, or for bf16 vs fp32 the ratio of the device's peaks."""
    by_model: dict[str, dict[str, Any]] = {}
    for entry in entries:
        by_model.setdefault(entry["model"], entry)
    rows: list[dict[str, Any]] = []

    def row(name, at, value, ceiling, kind, source):
        rows.append({"name": name, "at": at, "value": value, "ceiling": ceiling,
                     "ceiling_kind": kind, "source": source})  # fmt: skip

    for fast, slow in (("edm-l64", "edm"), ("edm-l64", "edm-l128")):
        a, b = by_model.get(fast), by_model.get(slow)
        if a is None or b is None:
            continue
        path = "compiled" if a["cost_model"]["per_nfe_path"].endswith("compiled") else "eager"
        row(f"{fast} / {slow} per NFE (γ/β cached, {path})", "1 NFE",
            b["cost_model"]["per_nfe_s"] * a["batch"] / (a["cost_model"]["per_nfe_s"] * b["batch"]),
            b["flops_per_image"]["cached"] / a["flops_per_image"]["cached"], "FLOP ratio",
            "measured")  # fmt: skip
        row(f"{fast} / {slow} images/s", f"{RATIO_NFE} NFE",
            images_per_second(a, RATIO_NFE) / images_per_second(b, RATIO_NFE),
            per_image_flops(b, RATIO_NFE) / per_image_flops(a, RATIO_NFE), "FLOP ratio",
            "cost model (measured per-NFE and fixed costs)")  # fmt: skip
    sdm = by_model.get("sdm")
    if sdm is not None:
        for entry in entries:
            if entry["model"] == "sdm":
                continue
            row(f"{entry['label']} at {RATIO_NFE} NFE / sdm at {SDM_NFE} NFE (images/s)",
                f"{RATIO_NFE} vs {SDM_NFE} NFE",
                images_per_second(entry, RATIO_NFE) / images_per_second(sdm, SDM_NFE),
                per_image_flops(sdm, SDM_NFE) / per_image_flops(entry, RATIO_NFE), "FLOP ratio",
                f"cost model; sdm at {SDM_NFE} NFE predicted from its per-NFE cost")  # fmt: skip
    for entry in entries:
        f, label = entry["flops_per_image"], entry["label"]
        cached, uncached = _median(entry, "nfe_cached_eager"), _median(entry, "nfe_uncached_eager")
        if cached and uncached:
            row(f"{label}: γ/β cached vs recomputed", "1 NFE, eager", uncached / cached,
                f["uncached"] / f["cached"], "FLOP ratio", "measured")  # fmt: skip
        compiled = _median(entry, "nfe_cached_compiled")
        if cached and compiled:
            row(f"{label}: compiled vs eager", "1 NFE, γ/β cached", cached / compiled, 1.0,
                "same FLOPs", "measured")  # fmt: skip
        torch_spade = _median(entry, "nfe_cached_torch_spade")
        if cached and torch_spade:
            row(f"{label}: Triton vs torch SPADE", "1 NFE, γ/β cached, eager",
                torch_spade / cached, 1.0, "same FLOPs", "measured")  # fmt: skip
        other = _median(entry, "nfe_cached_other_precision")
        if cached and other:
            bf16, fp32 = (cached, other) if entry["precision"] == "bf16" else (other, cached)
            ceiling = peaks["bf16"] / peaks["fp32"] if peaks["bf16"] and peaks["fp32"] else None
            row(f"{label}: bf16 vs fp32", "1 NFE, γ/β cached, eager", fp32 / bf16, ceiling,
                "peak ratio", "measured")  # fmt: skip
    return rows


# --------------------------------------------------------------------------- environment
def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict[str, Any]:
    """Device, memory, threads and versions of this run."""
    info: dict[str, Any] = {
        "device": str(device),
        "cpu": _cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "triton": _version("triton"),
        "monai": _version("monai"),
        "echo_synth": code_version(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info |= {
            "device_name": torch.cuda.get_device_name(device),
            "device_memory_bytes": props.total_memory,
            "cuda": torch.version.cuda,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        }
    else:
        info["device_name"] = info["cpu"]
    return info


def device_peaks(device: torch.device) -> dict[str, float | None]:
    """Peak FLOP/s for bf16 and for fp32 work (TF32 tensor cores where cuDNN may use them, as
    PyTorch lets its fp32 convolutions do by default); None on a CPU or an unknown card."""
    if device.type != "cuda":
        return {"bf16": None, "fp32": None}
    name = torch.cuda.get_device_name(device)
    fp32 = "tf32" if torch.backends.cudnn.allow_tf32 else "fp32"
    return {"bf16": peak_flops(name, "bf16"), "fp32": peak_flops(name, fp32)}


def _write_json(path: Path, result: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(jsonable(result), indent=2))
    os.replace(tmp, path)


# --------------------------------------------------------------------------- the stage
def bench(
    models: Sequence[str] | None = None,
    preset: str = "auto",
    run: Sequence[Path] | None = None,
    nfe: Sequence[str | int] | None = None,
    batch: int | None = None,
    repeats: int | None = None,
    compile: bool | None = None,
    peer: bool = True,
    dtype: str = "auto",
    device: str = "auto",
    out: Path = Path("bench"),
    reports: Sequence[Path] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Measure generation cost and throughput; write ``bench.json`` and the plots under ``out``.

    Args:
        models: model names (comma lists allowed); default every registered model.
        preset: ``auto`` (see the module docstring), ``tiny`` or ``paper``.
        run: trained diffusion runs to measure instead of the presets.
        nfe: NFEs of the throughput curves (default :data:`DEFAULT_NFES`; 1000 added for sdm).
        batch: images per batch (default: auto-sized on CUDA; 1 at paper, 4 at tiny on CPU).
        repeats: timed repeats per measurement (cut to the time budget of each scale).
        compile: time the ``torch.compile``d denoiser (default: on CUDA only).
        peer: compare our UNet with MONAI's at matched FLOPs.
        dtype: ``auto`` (bf16 on CUDA, fp32 on CPU), ``fp32`` or ``bf16`` (autocast).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        out: output folder (``bench.json``, ``throughput.png``, ``frontier.png``).
        reports: ``echo-synth evaluate`` folders (or report.json files) for the frontier plot.
        log: progress lines (default: none).

    Returns:
        The result (also ``out/bench.json``): ``environment``, ``settings``, ``notes``,
        ``scales`` (each with its ``entries``, ``ratios`` and ``peer``), ``frontier`` (with
        reports) and ``files``.

    Raises:
        EchoSynthError: for a bad option, naming it.
    """
    log = log or (lambda _line: None)
    start = time.perf_counter()
    if preset not in PRESET_CHOICES:
        raise EchoSynthError(f"--preset {preset!r}: choose from {', '.join(PRESET_CHOICES)}")
    if dtype not in DTYPE_CHOICES:
        raise EchoSynthError(f"--dtype {dtype!r}: choose from {', '.join(DTYPE_CHOICES)}")
    if batch is not None and batch < 1:
        raise EchoSynthError(f"--batch {batch} must be at least 1")
    if repeats is not None and repeats < 1:
        raise EchoSynthError(f"--repeats {repeats} must be at least 1")
    runs = list(run or [])
    if runs and models:
        raise EchoSynthError("--models and --run: give one or the other (a run names its model)")
    names = [] if runs else parse_models(models)
    nfes = parse_nfes(nfe)
    report_data = read_reports(list(reports or []))
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise EchoSynthError(f"--out {out} is a file, not a folder")
    dev = resolve_device(device)
    if runs:
        for path in runs:
            resolve_run(None, path, Path("runs"))
    autocast = (
        torch.bfloat16 if dtype == "bf16" or (dtype == "auto" and dev.type == "cuda") else None
    )

    scales, notes = plan_scales(dev.type, preset, bool(runs), batch, repeats, compile, peer)
    notes.insert(0, "weights are random for the presets: speed does not depend on them")
    notes.append(f"sdm at {SDM_NFE} NFE is predicted by its cost model (never run for "
                 f"{SDM_NFE} NFE here)")  # fmt: skip
    peaks = device_peaks(dev)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "format": "echo-synth-bench",
        "format_version": 1,
        "complete": False,
        "environment": environment(dev),
        "peak_flops_per_s": peaks,
        "settings": {
            "models": names,
            "preset": preset,
            "runs": [str(p) for p in runs],
            "nfe": nfes,
            "batch": batch,
            "repeats": repeats,
            "compile": compile,
            "peer": peer,
            "precision": "bf16" if autocast else "fp32",
            "device": str(dev),
            "ratio_nfe": RATIO_NFE,
            "sdm_nfe": SDM_NFE,
        },  # fmt: skip
        "notes": notes,
        "scales": [],
    }
    path_json = out / "bench.json"
    for scale in scales:
        record = _measure_scale(scale, names, runs, nfes, dev, autocast, peaks, log,
                                lambda partial: _write_json(path_json, {**result, "scales": [
                                    *result["scales"], partial]}))  # fmt: skip
        result["scales"].append(record)
        _write_json(path_json, result)
    files = {"json": str(path_json)}
    figure = plot_throughput(result["scales"], out / "throughput.png")
    if figure is not None:
        files["throughput_plot"] = str(figure)
    if report_data:
        result["frontier"], plot = _frontier(report_data, result["scales"], out)
        if plot is not None:
            files["frontier_plot"] = str(plot)
    result["files"] = files
    result["wall_s"] = time.perf_counter() - start
    result["complete"] = True
    _write_json(path_json, result)
    return jsonable(result)


def _measure_scale(scale, names, runs, nfes, dev, autocast, peaks, log, checkpoint) -> dict:
    """Measure every target of one scale (cheapest first, so the FLOP rate that plans the
    repeats comes from small networks), the peer, and the ratios."""
    if scale.name == "runs":
        targets = [run_target(p, nfes, scale.batch, dev) for p in runs]
    else:
        per = None if dev.type == "cuda" else CPU_BATCH[scale.name]
        targets = [preset_target(m, scale.name, nfes, scale.batch or per) for m in names]
    counted: list[tuple[Target, NetworkFlops]] = []
    for target in targets:
        log(f"[{scale.name}] counting FLOPs of {target.label}")
        counted.append((target, target_flops(target)))
    counted.sort(key=lambda item: item[1].cached)
    settings = Settings(dev, autocast, scale.compile, scale.repeats, scale.budget, log=log)
    peer_label = next((t.label for t, _ in counted if t.model == PEER_MODEL), counted[0][0].label)
    record: dict[str, Any] = {
        "name": scale.name, "title": scale.title, "budget": vars(scale.budget),
        "compile": scale.compile, "entries": [], "ratios": [], "peer": None,
    }  # fmt: skip
    for target, flops in counted:
        hook = _peer_hook(scale) if scale.peer and target.label == peer_label else None
        log(f"[{scale.name}] measuring {target.label}")
        entry = measure_target(target, settings, peaks, flops, hook)
        if entry.get("peer") is not None:
            record["peer"] = {"model": target.label, **entry.pop("peer")}
        else:
            entry.pop("peer", None)
        record["entries"].append(entry)
        checkpoint(record)
    record["ratios"] = ratio_rows(record["entries"], peaks)
    ref = sdm_reference(record["entries"])
    for entry in record["entries"]:
        for row in entry["throughput"]:
            row["relative_to_sdm_1000"] = row["images_per_s"] / ref if ref else None
    return record


def _peer_hook(scale: Scale):
    def hook(unet, labels, settings: Settings, flops: NetworkFlops) -> dict[str, Any]:
        measure = Measurer(settings)
        ours = {"uncached": flops.uncached, "cached": flops.cached,
                "params": sum(p.numel() for p in unet.parameters())}  # fmt: skip
        settings.log(f"[{scale.name}] peer: matching MONAI's widths to our FLOPs")
        match = match_peer(unet.config, ours)
        flops_uncached = match["ours"]["uncached"] * labels.shape[0]
        if not measure.optional("peer", flops_uncached):
            return {"match": match, "skipped": measure.skipped["peer"]}
        settings.log(f"[{scale.name}] peer: MONAI at channels {match['monai']['channels']}")
        from edmcli.sampling.sample import compile_denoiser

        compile_fn = (lambda net: compile_denoiser(net, labels.device)) if scale.compile else None
        timed = time_peer(unet, labels, match, measure, compile_fn, settings.autocast_ctx)
        return {"match": match, **timed, "skipped": measure.skipped}

    return hook


def _frontier(reports, scales, out: Path) -> tuple[dict[str, Any], Path | None]:
    scale = next((s for s in scales if s["name"] in ("paper", "runs")), scales[0])
    points, real, notes = frontier_points(reports, scale["entries"])
    pick = cheapest_within(points)
    plot = plot_frontier(points, real, out / "frontier.png")
    return {
        "images_per_s_from": scale["title"],
        "points": points,
        "real": real,
        "pareto_dice": pareto_front(points, "dice_mean"),
        "pareto_accuracy": pareto_front(points, "accuracy"),
        "cheapest_within_1_dice_point": pick,
        "notes": notes,
        "reports": [r["_path"] for r in reports],
    }, plot


# --------------------------------------------------------------------------- printing
def _fmt(value: float | None, spec: str = ".3g", scale: float = 1.0) -> str:
    return "–" if value is None else format(value * scale, spec)


def _ms(timings: dict[str, Any], key: str) -> str:
    """``median ±spread`` in milliseconds, or – when not measured."""
    t = timings.get(key)
    return "–" if t is None else f"{1e3 * t['median_s']:.4g} ±{100 * t['spread']:.0f}%"


def render(result: dict[str, Any], console) -> None:
    """The human tables of a :func:`bench` result on a rich ``console`` (at least 120 columns
    wide when it is not a terminal, e.g. a CI log)."""
    from rich.console import Console
    from rich.table import Table

    if not console.is_terminal and console.width < 120:  # a log: room for the tables
        console = Console(file=console.file, width=120, soft_wrap=True, emoji=False)

    def show(item) -> None:
        console.print(item, highlight=False)

    env = result["environment"]
    show(
        f"echo-synth bench on {env['device_name']} ({env['device']}, {env['cpu_threads']} CPU "
        f"threads), torch {env['torch']}, triton {env['triton']}, monai {env['monai']}; "
        f"precision {result['settings']['precision']}"
    )
    for note in result["notes"]:
        show(f"- {note}")
    for scale in result["scales"]:
        entries = scale["entries"]
        per_nfe = Table(title=f"One NFE — {scale['title']}", title_justify="left")
        for col in ("model", "net", "batch", "GFLOP cached", "GFLOP recomp.", "ms cached",
                    "ms recomputed", "ms compiled", "GFLOP/s", "MFU"):  # fmt: skip
            per_nfe.add_column(col, justify="left" if col == "model" else "right")
        fixed = Table(title="Fixed costs per batch, cost model", title_justify="left")
        for col in ("model", "γ/β cache ms", "decode ms", "write ms", "fixed s", "per NFE s",
                    "peak memory"):  # fmt: skip
            fixed.add_column(col, justify="left" if col == "model" else "right")
        for e in entries:
            t, f, c = e["timings"], e["flops_per_image"], e["cost_model"]
            best = t.get(c["per_nfe_path"]) or {}
            per_nfe.add_row(
                e["label"], f"{e['net_size']}²", str(e["batch"]), f"{f['cached'] / 1e9:.4g}",
                f"{f['uncached'] / 1e9:.4g}", _ms(t, "nfe_cached_eager"),
                _ms(t, "nfe_uncached_eager"), _ms(t, "nfe_cached_compiled"),
                _fmt(best.get("achieved_flops_per_s"), ".4g", 1e-9), _fmt(best.get("mfu"), ".1%"),
            )  # fmt: skip
            peak = e["peak_memory_bytes"]
            fixed.add_row(
                e["label"], _ms(t, "spade_cache"), _ms(t, "decode"), _ms(t, "store_write"),
                f"{c['fixed_s']:.3g}", f"{c['per_nfe_s']:.3g} ({c['per_nfe_path'][4:]})",
                "–" if not peak else f"{peak / 2**30:.3g} GiB",
            )  # fmt: skip
        show(per_nfe)
        show(fixed)
        nfes = sorted({r["nfe"] for e in entries for r in e["throughput"]})
        curve = Table(
            title="images/s by NFE (cost model; * timed end to end: the measured value)",
            title_justify="left",
        )
        curve.add_column("model")
        for n in nfes:
            curve.add_column(str(n), justify="right")
        for e in entries:
            cells = {
                r["nfe"]: f"{r['measured_images_per_s']:.3g}*"
                if r.get("measured_images_per_s")
                else f"{r['images_per_s']:.3g}"
                for r in e["throughput"]
            }
            curve.add_row(e["label"], *(cells.get(n, "") for n in nfes))
        show(curve)
        for e in entries:
            checks = [c for c in e["checks"] if "measured_s" in c]
            if checks:
                show(
                    f"{e['label']}: cost model vs end to end ({checks[0]['solver']}): "
                    + "; ".join(
                        f"NFE {c['nfe']} predicted {c['predicted_s']:.3g} s, measured "
                        f"{c['measured_s']:.3g} s ({100 * c['relative_error']:+.1f} %)"
                        for c in checks
                    )
                )
        ratios = Table(title="Ratios, each next to its ceiling", title_justify="left")
        for col in ("ratio", "at", "value", "ceiling", "source"):
            ratios.add_column(col, justify="right" if col in ("value", "ceiling") else "left")
        for r in scale["ratios"]:
            ceiling = "–" if r["ceiling"] is None else f"{r['ceiling']:.3g}× {r['ceiling_kind']}"
            source = "measured" if r["source"] == "measured" else "cost model"
            ratios.add_row(r["name"], r["at"], f"{r['value']:.3g}×", ceiling, source)
        peer = scale.get("peer")
        if peer and peer.get("ratios"):
            at = f"batch {peer['batch']}, {peer['resolution']}²"
            for r in peer["ratios"]:
                ratios.add_row(f"{peer['model']} UNet: {r['name']}", at, f"{r['value']:.3g}×",
                               f"{r['flop_ceiling']:.3g}× FLOP ratio", r["source"])  # fmt: skip
        show(ratios)
        if peer:
            m = peer["match"]
            skipped = peer.get("skipped")
            show(
                f"peer: our {peer['model']} UNet {m['ours']['uncached'] / 1e9:.4g} GFLOP per NFE "
                f"({m['ours']['cached'] / 1e9:.4g} with γ/β cached), "
                f"{m['ours']['params'] / 1e6:.4g} M params; "
                f"MONAI channels {m['monai']['channels']}: "
                f"{m['monai']['flops'] / 1e9:.4g} GFLOP "
                f"({100 * m['monai']['flops_rel_to_ours_uncached']:+.1f} %), "
                f"{m['monai']['params'] / 1e6:.4g} M params (at our channels "
                f"{m['monai_at_our_channels']['channels']}: "
                f"{m['monai_at_our_channels']['flops'] / 1e9:.4g} GFLOP, "
                f"{m['monai_at_our_channels']['params'] / 1e6:.4g} M params)"
                + (f"; {skipped}" if isinstance(skipped, str) else "")
            )
        skipped = sorted({f"{k}: {v}" for e in entries for k, v in e["skipped"].items()})
        if skipped:
            show("not measured in this scale: " + "; ".join(skipped))
    frontier = result.get("frontier")
    if frontier:
        pick = frontier["cheapest_within_1_dice_point"]
        if pick:
            show(
                f"frontier: the cheapest setting within 1 Dice point of the best is {pick['model']}"
                f" at {pick['nfe']} NFE ({pick['images_per_s']:.3g} images/s, mean Dice "
                f"{100 * pick['dice_mean']:.1f} %)"
            )
        for note in frontier["notes"]:
            show(f"frontier: {note}")
    show("wrote " + ", ".join(result["files"].values()))
