"""``echo-synth sample``, planned: every check and every default of a sampling run, no work.

:func:`plan_sample` takes the arguments of :func:`edmcli.sampling.sample.sample` and returns a
:class:`SamplingPlan`: the model and run (and a latent model's Γ-VAE run), the solver, its steps
for the NFE budget (with two guidance branches: :func:`guided_plan`), the guidance scale, the σ
schedule, the label maps that are sampled (and the patients held out as ``val``), the output
store. Every refusal of the command is raised here, in the order the command always made them,
except those that need a checkpoint's weights or the store's lock, which
:func:`~edmcli.sampling.sample.run_sample` makes before it writes anything: an unreadable
diffusion or Γ-VAE checkpoint (now refused after the other checks), a store already being written
by another process (the store's lock: now after the checks of the label store and the output),
and an output store that this very command started from another checkpoint of the run (the
diffusion checkpoint's hash is not read here: refused, or replaced with ``--overwrite``, by run).

Planning reads the run's ``config.yaml``, the names in its ``checkpoints/``, the
``training_patients.json`` of the run and of its Γ-VAE run, the Γ-VAE checkpoint (hashed, as
:func:`~edmcli.runs.vae_run.find_vae_run` checks it), the label store (attributes, columns, label
values) and an existing output store's attributes, and writes nothing. It imports torch (the run,
model and solver registries and the device check do).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from edmcli.console import console
from edmcli.data.store import DatasetStore
from edmcli.data.store_format import ATTRS_KEY, jsonable
from edmcli.data.store_replace import (
    check_name_length,
    check_not_an_input,
    check_replaceable,
)
from edmcli.errors import EchoSynthError
from edmcli.models.guidance import guidance_branches
from edmcli.models.registry import get_spec
from edmcli.runs.checkpoint import latest_checkpoint
from edmcli.runs.diffusion_run import (
    DiffusionSettings,
    check_class_cond,
    diffusion_vae_ref,
    resolve_run,
    student_levels,
)
from edmcli.runs.distributed import process_layout, resolve_device
from edmcli.runs.folder import load_run_config, load_training_patients
from edmcli.runs.memory import sampling_check, sampling_memory
from edmcli.sampling.nfe import NFEError, StepPlan, plan
from edmcli.sampling.privacy import check_percentile, ordinal, reference_rows
from edmcli.sampling.schedules import SCHEDULES
from edmcli.sampling.solvers import SOLVERS, nfe_cost

__all__ = [
    "HOLDOUT_STREAM",
    "PIN_OUTSIDE_DEFAULT",
    "SampleRequest",
    "SamplingPlan",
    "guided_plan",
    "held_out_patients",
    "output_exists_error",
    "plan_sample",
    "resolve_guidance",
]

PIN_OUTSIDE_DEFAULT = False
HOLDOUT_STREAM = 7  # seed stream of the held-out patient draw
MAX_GUIDANCE = 100.0  # the largest guidance scale sample accepts


@dataclass(frozen=True)
class SampleRequest:
    model: str
    label_store: str
    splits: list[str]
    k: int
    n: int | None
    nfe: int
    solver: str
    churn: float
    seed: int
    batch: int
    chunk: int
    compile: bool
    spade_cache: bool
    precision: str
    holdout: float = 0.0  # fraction of source patients whose synthetic rows form split "val"
    schedule: str | None = None  # σ schedule (None: the model's)
    pin_outside: bool = PIN_OUTSIDE_DEFAULT
    guidance: float | None = None  # classifier-free guidance scale (None: a map-only model)
    transforms: bool = True  # each map randomly transformed (paper); False: the maps as they are
    privacy_filter: float | None = None  # percentile below which a sample is redrawn

    def content(self, run: Path) -> dict[str, Any]:
        """What the output store's content depends on, but the checkpoint's hash."""
        out = asdict(self)
        for key in ("batch", "compile", "precision", "spade_cache"):
            out.pop(key)  # change floating-point noise at most, not what is sampled
        if out["guidance"] is None:
            out.pop("guidance")  # map only: the identity of stores written before guidance
        if out["transforms"]:
            out.pop("transforms")  # the identity of stores written before the option
        if out["privacy_filter"] is None:
            out.pop("privacy_filter")  # likewise
        out.update(run=str(run))
        return out

    def identity(self, loaded) -> dict[str, Any]:
        """What the output store's content depends on (resume only when it is identical):
        :meth:`content` and the ``loaded`` run's checkpoint hash."""
        out = self.content(loaded.run)
        out.update(checkpoint_sha256=loaded.sha256)
        return out


@dataclass(frozen=True)
class SamplingPlan:
    """Everything a sampling run will do, checked (:func:`plan_sample`)."""

    request: SampleRequest  # what is sampled: the options the output store's identity reads
    run_dir: Path
    count: int  # what is sampled (request.n as asked; None: every label map × k)
    step_plan: StepPlan
    schedule_used: str  # request.schedule, or the model's when that is None
    class_cond: str | None
    out: Path
    overwrite: bool
    device: str  # as asked (``auto``, ``cpu``, ``cuda[:N]``)
    device_used: str  # what it resolves to here
    image_size: int
    vae_run: Path | None  # the Γ-VAE run that decodes a latent model's samples
    sources: tuple[int, ...]  # label store rows, in sample order (sample i: i // k)
    held_out: tuple[str, ...]  # source patients whose rows are written as split "val"

    def describe(self) -> list[str]:
        """Short lines for people (``study --dry-run``)."""
        r = self.request
        conditioning = f"classes: {self.class_cond}" if self.class_cond else "label maps only"
        lines = [
            f"sample {r.model} from run {self.run_dir} ({conditioning}"
            + ("" if self.vae_run is None else f", decoded by the Γ-VAE of {self.vae_run}")
            + ")",
            f"{self.step_plan.note}; schedule {self.schedule_used}"
            + (f", churn {r.churn:g}" if r.churn else "")
            + (", outside pinned" if r.pin_outside else "")
            + ("" if r.transforms else ", label maps untransformed"),
        ]
        if r.privacy_filter is not None:
            lines.append(
                f"privacy filter: redraw samples closer than the {ordinal(r.privacy_filter)} "
                "percentile of new real patients"
            )
        if self.class_cond:
            lines.append(f"guidance {r.guidance:g}")
        total = len(self.sources) * r.k
        lines.append(
            f"{self.count} samples"
            + (f" (the first of {total})" if self.count < total else "")
            + f": {len(self.sources)} label maps of {r.label_store} "
            f"({', '.join(r.splits)}) × {r.k} transforms, seed {r.seed}"
        )
        if self.held_out:
            lines.append(f"{len(self.held_out)} source patients held out as split val")
        lines.append(
            f"→ {self.out} (shards of {r.chunk}, batch {r.batch}"
            + (", --overwrite" if self.overwrite else "")
            + ")"
        )
        lines.append(
            f"device {self.device_used}, precision {r.precision}, "
            f"{'compiled' if r.compile else 'eager'}"
            + ("" if r.spade_cache else ", SPADE γ/β recomputed")
        )
        return lines


def guided_plan(solver: str, nfe: int, guidance: float | None) -> StepPlan:
    """The steps that spend exactly ``nfe`` network evaluations when every denoiser call costs
    :func:`~edmcli.models.guidance.guidance_branches` (``guidance``) of them: as
    :func:`~edmcli.sampling.nfe.plan` for one per call; with two (classifier-free guidance
    branches) half the calls, and an unreachable budget is refused with the two nearest."""
    per_call = guidance_branches(guidance)
    if per_call == 1:
        return plan(solver, nfe)
    costs = [per_call * nfe_cost(solver, n) for n in range(1, max(int(nfe), 1) + 2)]
    if nfe not in costs:
        lo = max((c for c in costs if c < nfe), default=None)
        hi = min(c for c in costs if c > nfe)
        options = " or ".join(str(c) for c in (lo, hi) if c is not None)
        raise EchoSynthError(
            f"guidance {guidance} evaluates the network twice per denoiser call (conditional and "
            f"unconditional), so {solver} cannot spend exactly {nfe} NFE; use {options}"
        )
    try:
        inner = plan(solver, nfe // per_call)
    except NFEError as exc:
        raise EchoSynthError(
            f"NFE {nfe} with guidance {guidance} is {nfe // per_call} denoiser calls of "
            f"{per_call} network evaluations: {exc}"
        ) from None
    note = (
        f"{inner.note.split(' = ')[0]} = {inner.nfe} denoiser calls × {per_call} (guidance "
        f"{guidance}: conditional + unconditional in one batched forward) = {nfe} NFE"
    )
    return StepPlan(steps=inner.steps, nfe=int(nfe), note=note)


def check_student(
    record: dict[str, Any],
    solver: str | None,
    nfe: int | None,
    schedule: str | None,
    guidance: float | None,
) -> tuple[str, int]:
    """(solver, NFE) of a consistency student: its own multistep sampler at one of the NFEs it
    was made for (default: 2, else the first), at its recorded levels; a solver, schedule or
    guidance scale it cannot use is refused in one sentence."""
    made = [int(n) for n in record.get("sigmas", {})]
    if solver not in (None, "consistency"):
        raise EchoSynthError(
            f"a distilled student samples with its own levels (solver consistency), not {solver}"
        )
    if schedule is not None:
        raise EchoSynthError("a distilled student samples at its recorded levels; drop --schedule")
    if guidance not in (None, 1.0):
        raise EchoSynthError(
            f"a distilled student is the conditional model alone; --guidance {guidance} needs "
            "its teacher"
        )
    nfe = (2 if 2 in made else made[0]) if nfe is None else nfe
    student_levels(record, nfe)  # refuses an NFE it was not made for
    return "consistency", nfe


def resolve_guidance(run_dir: Path, guidance: float | None) -> tuple[str | None, float | None]:
    """(class conditioning of the run, guidance scale to sample with): a class-conditional run
    samples with ``guidance`` (default 1, the conditional denoiser); a map-only run refuses one."""
    class_cond = check_class_cond(load_run_config(run_dir).get("class_cond"))
    if guidance is not None and (not np.isfinite(guidance) or not 0 <= guidance <= MAX_GUIDANCE):
        raise EchoSynthError(
            f"--guidance {guidance} must be a number from 0 to {MAX_GUIDANCE:g} (guidance scales "
            "in use are 1–10; 1e30 overflowed into all-black images)"
        )
    if class_cond is None:
        if guidance is not None:
            raise EchoSynthError(
                f"--guidance needs a model trained with classes (train-diffusion --class-cond "
                f"view); {run_dir} was trained on label maps only"
            )
        return None, None
    return class_cond, 1.0 if guidance is None else float(guidance)


def held_out_patients(
    store: DatasetStore, sources: np.ndarray, holdout: float, seed: int
) -> np.ndarray:
    """The source patients (a seeded ``holdout`` fraction, at least one when > 0) whose synthetic
    rows are written as split ``val``: a synthetic validation set for downstream checkpoint
    choice that shares no source patient with the training rows."""
    if holdout <= 0:
        return np.array([], dtype=str)
    patients = np.array(sorted(set(store.column("patient")[sources].tolist())), dtype=str)
    count = max(1, round(holdout * len(patients)))
    if count >= len(patients):
        raise EchoSynthError(
            f"holdout {holdout} would hold back all {len(patients)} source patients"
        )
    rng = np.random.default_rng([seed, HOLDOUT_STREAM])
    return np.sort(rng.choice(patients, size=count, replace=False))


def output_exists_error(out: Path) -> EchoSynthError:
    """The refusal of an output store that this exact command did not start."""
    return EchoSynthError(
        f"{out} exists and was not written by this exact sample command; pass "
        "--overwrite to replace it (or rerun the original command to resume it)"
    )


def plan_sample(
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
) -> SamplingPlan:
    """The checked plan of :func:`edmcli.sampling.sample.sample` with these arguments (see
    there); raises its refusals (module docstring), writes nothing. On CUDA it prints the
    estimated peak GPU memory at ``batch`` and refuses a batch that cannot fit
    (:mod:`edmcli.runs.memory`)."""
    if k < 1 or batch < 1 or chunk < 1:
        raise EchoSynthError("k, batch and chunk must each be at least 1")
    if not 0.0 <= holdout < 1.0:
        raise EchoSynthError(f"holdout {holdout} must be in [0, 1)")
    if schedule is not None and schedule not in SCHEDULES:
        raise EchoSynthError(
            f"schedule {schedule!r} is unknown; choose from {', '.join(SCHEDULES)}"
        )
    if churn < 0:
        raise EchoSynthError(f"churn {churn} must be at least 0")
    if privacy_filter is not None:
        check_percentile(privacy_filter)
    model, run_dir = resolve_run(model, run, runs_root)
    spec = get_spec(model)
    class_cond, guidance = resolve_guidance(run_dir, guidance)
    student = load_run_config(run_dir).get("consistency")
    if student:  # a distilled student samples with its own levels
        solver, nfe = check_student(student, solver, nfe, schedule, guidance)
    solver = solver or spec.solver
    if solver not in SOLVERS:
        raise EchoSynthError(f"solver {solver!r} is unknown; choose from {', '.join(SOLVERS)}")
    if solver == "consistency" and not student:
        raise EchoSynthError(
            f"--solver consistency samples a distilled student (echo-synth distill); {run_dir} "
            f"is a diffusion model: use {spec.solver}"
        )
    nfe = spec.nfe * guidance_branches(guidance) if nfe is None else nfe
    split_list = [s.strip() for s in splits.split(",")] if isinstance(splits, str) else splits
    step_plan = guided_plan(solver, nfe, guidance)
    _world, rank, local_rank = process_layout()
    device_used = resolve_device(device, local_rank)
    settings = _run_settings(model, run_dir)
    if labels is None and not Path(settings.data).exists():
        raise EchoSynthError(
            f"{settings.data}, the training store of run {run_dir} and so the default label "
            "maps, does not exist (moved or deleted?); name the label maps with --labels STORE"
        )
    vae = diffusion_vae_ref(run_dir, settings)
    request = SampleRequest(
        model=model, label_store=str(labels or settings.data),
        splits=[s for s in split_list if s], k=k, n=n, nfe=nfe, solver=solver, churn=churn,
        seed=seed, batch=batch, chunk=chunk, compile=compile, spade_cache=spade_cache,
        precision=precision, holdout=holdout, schedule=schedule, pin_outside=pin_outside,
        guidance=guidance, transforms=transforms, privacy_filter=privacy_filter,
    )  # fmt: skip
    out = Path(out) if out is not None else Path("synthetic") / f"{model}-nfe{nfe}.zarr"
    check_name_length(out)
    store, sources, count = _sources(request)
    if store.image_size != (settings.image_size, settings.image_size):
        raise EchoSynthError(
            f"label store {request.label_store} holds {store.image_size[0]}² maps but the "
            f"{request.model} run was trained on {settings.image_size}² images"
        )
    if chunk % batch and batch < chunk:
        raise EchoSynthError(f"--batch {batch} must divide --chunk {chunk}")
    patients: set[str] = set()
    for learnt in (run_dir, *([] if vae is None else [vae.run])):
        patients |= set(load_training_patients(learnt)["patients"])  # the provenance's
    if privacy_filter is not None:
        reference_rows(run_dir, sorted(patients))  # enough real test images to calibrate
    check_not_an_input(out, {"label store": request.label_store, "diffusion run": run_dir,
                             "Γ-VAE run": None if vae is None else vae.run})  # fmt: skip
    if rank == 0:  # the rank that writes the store checks it
        _check_output(out, request.content(run_dir.resolve()), overwrite)
    held_out = held_out_patients(store, sources, holdout, seed)
    memory = sampling_check(  # on CUDA: refuse a --batch that cannot fit, say what fits
        device_used,
        lambda: sampling_memory(
            settings, None if vae is None else vae.settings.model_config(), precision=precision,
            spade_cache=spade_cache, branches=guidance_branches(guidance),
        ),
        batch=batch, chunk=chunk,
    )  # fmt: skip
    if memory is not None and rank == 0:
        console.print(memory.message, highlight=False)
    return SamplingPlan(
        request=request, run_dir=run_dir, count=count, step_plan=step_plan,
        schedule_used=schedule or spec.schedule, class_cond=class_cond, out=out,
        overwrite=overwrite, device=device, device_used=str(device_used),
        image_size=settings.image_size, vae_run=None if vae is None else vae.run,
        sources=tuple(int(s) for s in sources), held_out=tuple(str(p) for p in held_out),
    )  # fmt: skip


def _run_settings(model: str, run_dir: Path) -> DiffusionSettings:
    """The run's settings, with the checks :func:`~edmcli.runs.diffusion_run.load_diffusion_run`
    makes before it reads the checkpoint (same sentences): a diffusion run of ``model`` that
    has a checkpoint."""
    config = load_run_config(run_dir)
    if config.get("kind") != "diffusion":
        raise EchoSynthError(
            f"{run_dir} is not a diffusion run (it is a {config.get('kind')!r} run)"
        )
    if config.get("model") != model:
        raise EchoSynthError(f"{run_dir} is a {config.get('model')} run, not {model}")
    settings = DiffusionSettings.from_config(config)
    if latest_checkpoint(run_dir) is None:
        raise EchoSynthError(f"{run_dir} has no checkpoint yet; train it first")
    return settings


def _sources(request: SampleRequest) -> tuple[DatasetStore, np.ndarray, int]:
    """(label store, its rows to sample, number of samples), the label store checked."""
    store = DatasetStore(request.label_store)
    info_names = store.info.get("label_names", {})
    if info_names.get("4") != "sector":
        raise EchoSynthError(
            f"label store {request.label_store} does not use the label convention "
            "(0 outside, 1 LV, 2 myocardium, 3 LA, 4 sector)"
        )
    bad = store.invalid_label_values()
    if bad:
        raise EchoSynthError(
            f"label store {request.label_store} has label values {bad} outside 0..4"
        )
    sources = store.indices(request.splits)
    if len(sources) == 0:
        raise EchoSynthError(f"{request.label_store} has no label maps in {request.splits}")
    total = len(sources) * request.k
    n = total if request.n is None else min(request.n, total)
    if n < 1:
        raise EchoSynthError("--n must be at least 1")
    return store, sources, n


def _check_output(out: Path, content: dict[str, Any], overwrite: bool) -> None:
    """The output-store refusals of :func:`~edmcli.sampling.sample.open_output` that do not
    depend on the checkpoint's hash: a store there that this command did not start whatever
    the checkpoint (refused; with ``overwrite``: checked to be one that may be deleted). A store
    started by this command, up to the checkpoint, is decided by run (resume, or the same
    refusal when the checkpoint changed)."""
    if not out.exists():
        return
    try:
        group = zarr.open_group(str(out), mode="r")
        saved = group.attrs.get(ATTRS_KEY, {}).get("sample_config")
        started = "shard_done" in group.array_keys()
    except Exception:  # not a zarr store at all
        saved, started = None, False
    if started and isinstance(saved, dict) and "checkpoint_sha256" in saved:
        rest = {key: value for key, value in saved.items() if key != "checkpoint_sha256"}
        if rest == jsonable(content):
            return
    if not overwrite:
        raise output_exists_error(out)
    check_replaceable(out)
