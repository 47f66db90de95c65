"""``echo-synth sample``: label maps → a synthetic dataset store, resumable and scale-out.

Work is cut into shards of ``chunk`` samples, the store's shards. Each rank of a ``torchrun`` job
takes shards ``rank, rank + world, ...``, samples each in batches of ``batch`` and marks it done
in the store (``shard_done``, one chunk per shard, so writers never share one). Rerunning the same
command skips finished shards. Sample *i* uses label map ``i // K`` of the chosen splits under
transformation ``i % K`` (seeded by (seed, source index, k)) and start noise seeded by
(seed, i): the store is byte-identical whatever the number of processes or where a run resumed.

A class-conditional run (``train-diffusion --class-cond``) gives each sample the class of its
source label map (the map's view, or view and phase, from the label store's columns) and samples
with classifier-free guidance scale ``guidance`` (default 1: the conditional denoiser, no extra
cost). ``--nfe`` counts network evaluations: with two guidance branches every denoiser call costs
2, so the same NFE buys half the solver steps (:func:`guided_plan`). The store's provenance
records the class conditioning, the guidance scale and the evaluations per denoiser call.

:func:`sample` is :func:`run_sample` of :func:`~edmcli.sampling.sample_plan.plan_sample`: the
plan makes every check and resolves every default without writing anything or loading a
network; the run loads the network and samples.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from edmcli.console import console, print_summary, progress
from edmcli.data.card import write_card
from edmcli.data.dataset import PHASES, codes
from edmcli.data.label_transforms import LabelMapTransform
from edmcli.data.labels import VIEWS
from edmcli.data.store import DatasetStore
from edmcli.data.store_format import ATTRS_KEY, STRING_FIELDS, jsonable
from edmcli.data.store_replace import replace_store
from edmcli.data.store_writer import create_store, mark_complete, write_block
from edmcli.errors import EchoSynthError
from edmcli.faults import maybe_kill
from edmcli.models.guidance import guidance_branches
from edmcli.models.registry import get_spec
from edmcli.runs.diffusion_run import LoadedDiffusion, class_ids, latent_decoder
from edmcli.runs.distributed import DistEnv
from edmcli.runs.folder import load_training_patients
from edmcli.runs.grids import save_image_grid
from edmcli.sampling.compiled import compile_denoiser
from edmcli.sampling.pipeline import generate
from edmcli.sampling.privacy import REDRAW_STREAM, PrivacyFilter
from edmcli.sampling.sample_plan import (
    PIN_OUTSIDE_DEFAULT,
    SampleRequest,
    SamplingPlan,
    output_exists_error,
    plan_sample,
)

__all__ = [
    "EXTRA_FIELDS",
    "SampleResult",
    "compile_denoiser",
    "run_sample",
    "sample",
    "source_classes",
]

EXTRA_FIELDS = {"source_index": np.dtype("int64"), "transform": np.dtype("int16"),
                "seed": np.dtype("int64"), "source_split": str}  # fmt: skip
PRIVACY_FIELDS = {"redraws": np.dtype("int16")}  # with --privacy-filter: redraws per sample


@dataclass
class SampleResult:
    out: Path
    samples: int
    sampled_now: int
    seconds: float
    images_per_second: float
    steps: int
    nfe: int
    note: str
    grid: Path | None


def sample_seed(seed: int, index: int, stream: int = 0) -> int:
    return int(np.random.SeedSequence([seed, index, stream]).generate_state(1)[0])


def open_output(
    out: Path,
    n: int,
    size: int,
    chunk: int,
    provenance: dict[str, Any],
    identity: dict[str, Any],
    overwrite: bool,
    more_fields: dict[str, Any] | None = None,
) -> zarr.Group:
    """Create the output store, or reopen it to resume when it was started identically."""
    if out.exists():
        try:
            group = zarr.open_group(str(out), mode="r+")
            saved = group.attrs.get(ATTRS_KEY, {}).get("sample_config")
        except Exception:  # not a zarr store at all
            saved = None
        if saved == jsonable(identity) and "shard_done" in group.array_keys():
            return group
        if not overwrite:
            raise output_exists_error(out)
        replace_store(out)
    group = create_store(
        out, n, size, size, {"provenance": provenance, "sample_config": identity},
        extra_fields={**EXTRA_FIELDS, **(more_fields or {})}, shard=chunk,
    )  # fmt: skip
    n_shards = -(-n // chunk)
    group.create_array("shard_done", shape=(n_shards,), dtype="bool", chunks=(1,),
                       fill_value=False)  # fmt: skip
    return group


@dataclass
class _Job:
    """What every shard of one sampling run shares."""

    request: SampleRequest
    loaded: LoadedDiffusion
    store: DatasetStore
    sources: np.ndarray
    n: int
    group: zarr.Group
    net: torch.nn.Module
    device: torch.device
    autocast: bool
    steps: int
    transform: Callable[[np.ndarray, int], np.ndarray]  # LabelMapTransform, or none
    columns: dict[str, np.ndarray]
    held_out: np.ndarray  # source patients whose rows are written as split "val"
    privacy: PrivacyFilter | None = None  # --privacy-filter

    def shard_range(self, shard: int) -> tuple[int, int]:
        chunk = self.request.chunk
        return shard * chunk, min((shard + 1) * chunk, self.n)


def run_sampling(plan: SamplingPlan, loaded: LoadedDiffusion, env: DistEnv) -> SampleResult:
    """Fill ``plan.out`` with the samples this rank owns; rank 0 finalises the store."""
    request, out, n, step_plan = plan.request, plan.out, plan.count, plan.step_plan
    store = DatasetStore(request.label_store)
    sources = np.array(plan.sources, dtype=np.intp)
    settings = loaded.settings
    provenance = {
        "source": "synthetic",
        "model": request.model,
        "run": str(loaded.run),
        "checkpoint": str(loaded.checkpoint),
        "checkpoint_sha256": loaded.sha256,
        "checkpoint_step": loaded.step,
        "solver": request.solver,
        "nfe": step_plan.nfe,
        "steps": step_plan.steps,
        "churn": request.churn,
        "schedule": request.schedule or get_spec(request.model).schedule,
        "pin_outside": request.pin_outside,
        "label_transforms": "reference" if request.transforms else "none",
        "class_cond": settings.class_cond or "none",
        "guidance": request.guidance,
        "network_evaluations_per_denoiser_call": guidance_branches(request.guidance),
        "seed": request.seed,
        "k": request.k,
        "holdout": request.holdout,
        "splits_written": "val = held-out source patients, train = the rest"
        if request.holdout
        else "train (every row; the source map's split is in column source_split)",
        "label_store": str(Path(request.label_store).resolve()),
        "label_splits": request.splits,
        "generator_patients": generator_patients(loaded),
        "generator_stores": generator_stores(loaded),
        "vae_run": str(loaded.vae.run) if loaded.vae else None,
        "vae_checkpoint_sha256": loaded.vae.sha256 if loaded.vae else None,
    }
    privacy = None
    if request.privacy_filter is not None:
        runs = [loaded.run, *([loaded.vae.run] if loaded.vae else [])]
        patients = provenance["generator_patients"]
        privacy = PrivacyFilter.build(request.privacy_filter, runs, patients)
        provenance["privacy_filter"] = privacy.record
    size = settings.image_size
    if env.is_main:
        identity = request.identity(loaded)
        open_output(out, n, size, request.chunk, provenance, identity, plan.overwrite,
                    PRIVACY_FIELDS if privacy else None)  # fmt: skip
    if env.distributed:
        torch.distributed.barrier()
    group = zarr.open_group(str(out), mode="r+")
    done = group["shard_done"][:]
    mine = [s for s in range(env.rank, len(done), env.world_size) if not done[s]]
    job = _Job(
        request=request, loaded=loaded, store=store, sources=sources, n=n, group=group,
        net=compile_denoiser(loaded.net, env.device) if request.compile else loaded.net,
        device=env.device,
        autocast=request.precision == "bf16"
        or (request.precision == "auto" and env.device.type == "cuda"),
        steps=step_plan.steps,
        transform=LabelMapTransform(size) if request.transforms else _untransformed,
        columns={name: store.column(name) for name in (*STRING_FIELDS, "ef", "spacing")},
        held_out=np.array(plan.held_out, dtype=str), privacy=privacy,
    )  # fmt: skip
    todo = sum(hi - lo for lo, hi in map(job.shard_range, mine))
    start = time.perf_counter()
    with progress(todo, "sample", enabled=env.is_main) as advance:
        for count, shard in enumerate(mine):
            maybe_kill("sample-shard", count)
            _sample_shard(job, shard, advance)
    seconds = time.perf_counter() - start
    if env.distributed:
        torch.distributed.barrier()
    grid = None
    if env.is_main:
        if not bool(group["shard_done"][:].all()):
            raise EchoSynthError(f"{out} is missing shards after sampling; rerun to complete it")
        mark_complete(group)
        write_card(out)
        grid = _grid(out)
    return SampleResult(
        out, n, todo, seconds, todo / seconds if todo else 0.0, step_plan.steps, step_plan.nfe,
        step_plan.note, grid,
    )  # fmt: skip


def generator_patients(loaded: LoadedDiffusion) -> list[str]:
    """Every patient the generator learnt from: the diffusion run's and its Γ-VAE run's."""
    patients = set(load_training_patients(loaded.run)["patients"])
    if loaded.vae is not None:
        patients |= set(load_training_patients(loaded.vae.run)["patients"])
    return sorted(patients)


def generator_stores(loaded: LoadedDiffusion) -> list[str]:
    """The stores the generator's runs learnt from (their ``training_patients.json``)."""
    runs = [loaded.run, *([loaded.vae.run] if loaded.vae is not None else [])]
    stores = {load_training_patients(run).get("store") for run in runs}
    return sorted(str(store) for store in stores if store)


def _untransformed(labels: np.ndarray, _seed: int) -> np.ndarray:
    """``sample --no-transforms``: the label map as it is."""
    return labels


def _sample_shard(job: _Job, shard: int, advance) -> None:
    """Sample one shard in batches, write it, then mark it done."""
    request, settings = job.request, job.loaded.settings
    lo, hi = job.shard_range(shard)
    index = np.arange(lo, hi)
    src = job.sources[index // request.k]
    k = index % request.k
    label_maps = np.stack([
        job.transform(job.store.labels[int(s)], sample_seed(request.seed, int(s), 1000 + int(t)))
        for s, t in zip(src, k, strict=True)
    ])  # fmt: skip
    seeds = [sample_seed(request.seed, int(i)) for i in index]
    classes = source_classes(settings.class_cond, job.columns, src)
    images = np.empty((hi - lo, 1, settings.image_size, settings.image_size), dtype=np.uint8)
    redraws = np.zeros(hi - lo, dtype=np.int16)
    for b in range(0, hi - lo, request.batch):
        labels = torch.from_numpy(label_maps[b : b + request.batch].astype(np.int64))
        labels = labels.to(job.device)
        batch_classes = None if classes is None else classes[b : b + request.batch]
        batch_seeds = seeds[b : b + request.batch]
        pixels = _draw(job, labels, batch_seeds, batch_classes, lo + b)
        if job.privacy is not None:
            pixels, batch_seeds, redraws[b : b + len(labels)] = job.privacy.apply(
                pixels, labels, batch_seeds,
                new_seed=lambda row, a, b=b: sample_seed(request.seed, lo + b + row,
                                                         REDRAW_STREAM + a),
                redraw=lambda rows, fresh, labels=labels, c=batch_classes, b=b: _draw(
                    job, labels[torch.from_numpy(rows).to(labels.device)], fresh,
                    None if c is None else c[torch.from_numpy(rows)], lo + b + rows),
                first=lo + b,
            )  # fmt: skip
            seeds[b : b + len(labels)] = batch_seeds
        images[b : b + len(labels)] = pixels.cpu().numpy()
        advance(len(labels))
    meta = {name: values[src] for name, values in job.columns.items()}
    # Every synthetic row trains (the paper's 9000 = all maps × 5), unless its source patient is
    # held back as synthetic validation data; the source map's split stays as a column.
    meta["source_split"] = meta["split"]
    held = np.isin(meta["patient"], job.held_out)
    meta["split"] = np.where(held, "val", "train").astype(meta["split"].dtype)
    meta.update(source_index=src.astype(np.int64), transform=k.astype(np.int16),
                seed=np.asarray(seeds, dtype=np.int64))  # fmt: skip
    if job.privacy is not None:
        meta["redraws"] = redraws
    write_block(job.group, lo, images, label_maps, meta)
    job.group["shard_done"][shard] = True


def _draw(job: _Job, labels: torch.Tensor, seeds: list[int], classes: torch.Tensor | None,
          first: int | np.ndarray) -> torch.Tensor:  # fmt: skip
    """uint8 images (B, 1, H, W) of the label maps ``labels`` with start noise ``seeds``,
    checked (:func:`check_samples`; ``first``: the store index of the first, or of each)."""
    request, settings = job.request, job.loaded.settings
    decode = latent_decoder(job.loaded.vae, settings.norm)
    with torch.autocast(job.device.type, torch.bfloat16, enabled=job.autocast):
        batch = generate(
            job.net, request.model, labels, seeds, settings.net_size,
            solver=request.solver, steps=job.steps, decode=decode,
            solver_options=_solver_options(request), use_cache=request.spade_cache,
            schedule=request.schedule, pin_outside=request.pin_outside,
            outside_value=settings.norm.outside_value, channels=settings.channels,
            class_labels=classes, guidance=request.guidance,
            levels=settings.student_levels(request.nfe) if settings.consistency else None,
        )  # fmt: skip
    pixels = (batch.float() * 255).round().clamp(0, 255).to(torch.uint8)
    check_samples(batch, pixels, labels, seeds, first)
    return pixels


def source_classes(
    class_cond: str | None, columns: dict[str, np.ndarray], sources: np.ndarray
) -> torch.Tensor | None:
    """The class of each sample: the view (and phase) of its source label map (rows ``sources``
    of the label store's ``columns``); None for a map-only model."""
    if class_cond is None:
        return None
    views = torch.from_numpy(codes(columns["view"][sources], VIEWS))
    phases = torch.from_numpy(codes(columns["phase"][sources], PHASES))
    return class_ids(class_cond, views, phases)


def check_samples(
    batch: torch.Tensor,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    seeds: list[int],
    first: int | np.ndarray,
) -> None:
    """Refuse a batch that holds a broken sample before it is written (a store is never marked
    complete with one): a non-finite value anywhere (written as black by the uint8 conversion:
    ``--churn nan`` filled a complete store with black images), or an image with one grey level
    over its whole sector (a diverged solver or a broken checkpoint). ``first``: the store
    index of the batch's first sample, or each sample's (the privacy filter's redraws)."""
    finite = torch.isfinite(batch.float()).flatten(1).all(dim=1)
    sector = labels[:, None] > 0
    high = torch.where(sector, pixels, 0).flatten(1).amax(dim=1)
    low = torch.where(sector, pixels, 255).flatten(1).amin(dim=1)
    flat = (high == low) & (sector.flatten(1).sum(dim=1) > 1)
    for i in torch.nonzero(~finite | flat).flatten().tolist():
        what = "holds NaN/Inf values" if not finite[i] else f"is {int(low[i])} over its sector"
        raise EchoSynthError(
            f"sample {first + i if isinstance(first, int) else int(first[i])} (seed {seeds[i]}) "
            f"{what}: the solver diverged or the "
            "checkpoint is broken; nothing of its shard was written and the store stays "
            "incomplete (check --churn, --guidance, --nfe, or sample an earlier checkpoint)"
        )


def _privacy_summary(out: Path, percentile: float | None) -> dict[str, Any]:
    """With ``--privacy-filter``: how many samples were redrawn, and how often."""
    if percentile is None:
        return {}
    redraws = np.asarray(zarr.open_group(str(out), mode="r")["redraws"][:])
    return {"privacy filter": f"P{percentile:g}", "samples redrawn": int((redraws > 0).sum()),
            "redraws": int(redraws.sum())}  # fmt: skip


def _solver_options(request: SampleRequest) -> dict[str, Any]:
    return {"s_churn": request.churn} if request.solver == "heun" and request.churn else {}


def _grid(out: Path) -> Path:
    """Up to 8 samples above their label maps, next to the store."""
    group = zarr.open_group(str(out), mode="r")
    count = min(8, group["images"].shape[0])
    images = torch.from_numpy(group["images"][:count].astype(np.float32) / 255)
    labels = torch.from_numpy(group["labels"][:count].astype(np.float32) / 4).unsqueeze(1)
    return save_image_grid([labels, images], out.with_name(f"{out.stem}-grid.png"))


def sample(
    model: str | None = None,
    *,
    run: Path | None = None,
    runs_root: Path = Path("runs"),
    labels: Path | None = None,
    splits: str | list[str] = "train",
    k: int = 5,
    n: int | None = None,
    nfe: int | None = None,
    solver: str | None = None,
    churn: float = 0.0,
    seed: int = 0,
    batch: int = 16,
    chunk: int = 64,
    compile: bool = True,
    spade_cache: bool = True,
    holdout: float = 0.0,
    schedule: str | None = None,
    pin_outside: bool = PIN_OUTSIDE_DEFAULT,
    guidance: float | None = None,
    transforms: bool = True,
    privacy_filter: float | None = None,
    out: Path | None = None,
    overwrite: bool = False,
    precision: str = "auto",
    device: str = "auto",
) -> dict[str, Any] | None:
    """Generate a synthetic dataset store with a trained diffusion run (the body of
    ``echo-synth sample``). The run is ``run`` or ``runs_root/model``; with ``run`` the model is
    read from the run. Solver and NFE default to the model's spec (with two guidance branches:
    the spec's steps, i.e. twice its NFE). ``guidance``: the classifier-free guidance scale of a
    class-conditional run (default 1); refused for a map-only run. ``privacy_filter`` P:
    samples closer to a training image than the P-th percentile of new real patients are
    redrawn (:mod:`edmcli.sampling.privacy`). Returns the summary (also
    written next to the store) on the main rank.

    :func:`~edmcli.sampling.sample_plan.plan_sample` checks and plans, :func:`run_sample`
    samples."""
    return run_sample(plan_sample(
        model, run=run, runs_root=runs_root, labels=labels, splits=splits, k=k, n=n, nfe=nfe,
        solver=solver, churn=churn, seed=seed, batch=batch, chunk=chunk, compile=compile,
        spade_cache=spade_cache, holdout=holdout, schedule=schedule, pin_outside=pin_outside,
        guidance=guidance, transforms=transforms, privacy_filter=privacy_filter, out=out,
        overwrite=overwrite, precision=precision, device=device,
    ))  # fmt: skip


def run_sample(plan: SamplingPlan) -> dict[str, Any] | None:
    """Sample ``plan`` (:func:`~edmcli.sampling.sample_plan.plan_sample`): load the run's
    network, fill the output store under its lock (resuming it when this command started it),
    write the summary next to it. Returns the summary on the main rank, None on the others."""
    from edmcli.runs.diffusion_run import load_diffusion_run
    from edmcli.runs.distributed import broadcast_flag, init_distributed, shutdown_distributed
    from edmcli.runs.lock import store_lock

    model, out = plan.request.model, plan.out
    env = init_distributed(plan.device)
    try:
        loaded = load_diffusion_run(model, plan.run_dir, env.device)
        if env.is_main:
            console.print(
                f"sampling {model} ({plan.run_dir}, step {loaded.step}) with "
                f"{plan.request.solver}: "
                f"{plan.step_plan.note} → {out}",
                highlight=False,
            )
        with store_lock(
            out, enabled=env.is_main, agree=lambda refused: broadcast_flag(refused, env)
        ):
            result = run_sampling(plan, loaded, env)
        if not env.is_main:
            return None
        class_cond, guidance = plan.class_cond, plan.request.guidance
        summary = {
            "store": str(result.out),
            "samples": result.samples,
            "sampled now": result.sampled_now,
            "solver": plan.request.solver,
            "steps": result.steps,
            "NFE": result.nfe,
            **({"class conditioning": class_cond, "guidance": guidance} if class_cond else {}),
            **_privacy_summary(out, plan.request.privacy_filter),
            "seconds": result.seconds,
            "images/s": result.images_per_second,
            "grid": str(result.grid),
        }
        (out.parent / f"{out.stem}-summary.json").write_text(json.dumps(summary, indent=2))
        print_summary(f"{model} samples", summary)
        return summary
    finally:
        shutdown_distributed()
