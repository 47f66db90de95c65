"""Evaluation stage: is a (synthetic) dataset good for training? (paper sections III.C–D)

Each ``--train`` value trains one segmenter and/or one view classifier (``--task``) on the train
split of that store (``a.zarr,b.zarr``: one run on the union of several stores), picks the best
validation checkpoint and scores it on the *test* split of the ``--test`` store, which must be
real and held out. Runs live in ``OUT/runs/<task>-<stores>-<hash>/`` and resume when the same
command is run again; ``OUT/report.json``, ``OUT/report.md`` and ``OUT/plots/*.png`` are
rewritten at the end of every call.

* Real-trained reference: a train store whose provenance is not ``synthetic`` (typically the
  test store itself: its train split) is a *real* run; the first real run is the reference line
  of the report and of the gap (synthetic − real, paired patient-level bootstrap).
* Checkpoint choice (:func:`choose_validation`): by default the best checkpoint on real
  validation images; or on the synthetic store's held-out val split; or the last one. What
  chose each run's checkpoint is in the report.
* Held-out check: the test split's patients must not appear in the train split of any train
  store, in the validation split used, nor among the patients the generator of a synthetic
  store was trained or validated on (its provenance ``generator_patients``, and the
  ``training_patients.json`` of its ``run`` folder when that exists). A synthetic store that
  records neither is refused: the check cannot be made.
* Image sizes: stores whose images differ from the networks' input size (``--size``, preset
  ``paper`` 256, ``tiny`` 64) are resampled with a notice; test predictions are resampled back
  and scored at the test store's resolution (HD in its pixels, and in mm from its spacing).
* ``--fidelity``: each synthetic spec is also judged in seconds by the real-trained reference
  networks (label fidelity, classifier accuracy on synthetic images, FD / KID / PRDC in their
  feature spaces, diversity: :mod:`edmcli.evaluation.fidelity`), and with ≥ 3 synthetic specs
  each metric's rank correlation with the downstream mean Dice and accuracy is reported.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edmcli.console import console
from edmcli.data.labels import VIEWS
from edmcli.data.store import DatasetStore, code_version
from edmcli.errors import EchoSynthError

if TYPE_CHECKING:
    from edmcli.evaluation.downstream import RunLength
    from edmcli.training.engine import TrainConfig

SYNTHETIC = "synthetic"


# --------------------------------------------------------------------------- train stores
@dataclass
class TrainSpec:
    """One ``--train`` value: the store(s) of one run and what they are."""

    text: str
    stores: list[str]  # resolved paths
    label: str
    slug: str
    kind: str  # "real", "synthetic" or "mixed"
    provenance: list[dict[str, Any]]
    model: str | None = None
    nfe: int | None = None
    solver: str | None = None
    generator_patients: set[str] = field(default_factory=set)


def _slug(stores: list[str], label: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._+-]+", "_", label)[:60]
    digest = hashlib.sha1("\n".join(stores).encode()).hexdigest()[:6]
    return f"{safe}-{digest}"


def parse_train_spec(text: str) -> TrainSpec:
    """``a.zarr`` or ``a.zarr,b.zarr`` → a :class:`TrainSpec` (stores opened and checked)."""
    # A path that exists is one store, even with a comma in its name; else "a,b" is a union.
    parts = _store_paths(text)
    if not parts:
        raise EchoSynthError(f"--train {text!r} names no store")
    stores, provenance, labels = [], [], []
    generator: set[str] = set()
    for part in parts:
        reader = DatasetStore(part)
        if len(reader.indices("train")) == 0:
            raise EchoSynthError(
                f"--train {part} has no samples in its train split (its splits: "
                f"{', '.join(sorted(set(reader.column('split').tolist())))})"
            )
        prov = dict(reader.info.get("provenance") or {})
        stores.append(str(Path(part).resolve()))
        provenance.append(prov)
        labels.append(Path(part).name.removesuffix(".zarr"))
        if prov.get("source") == SYNTHETIC:
            generator |= _generator_patients(part, prov)
    synthetic = [p.get("source") == SYNTHETIC for p in provenance]
    kind = SYNTHETIC if all(synthetic) else "mixed" if any(synthetic) else "real"
    label = "+".join(labels)
    first = next((p for p in provenance if p.get("source") == SYNTHETIC), {})
    nfe = first.get("nfe")
    return TrainSpec(
        text=text,
        stores=stores,
        label=label,
        slug=_slug(stores, label),
        kind=kind,
        provenance=provenance,
        model=first.get("model"),
        nfe=int(nfe) if isinstance(nfe, int | float) else None,
        solver=first.get("solver"),
        generator_patients=generator,
    )


def _store_paths(text: str) -> list[str]:
    """The store paths of one ``--train`` value (see :func:`parse_train_spec`)."""
    return [text] if Path(text).exists() else [p.strip() for p in text.split(",") if p.strip()]


def _generator_patients(store: str, provenance: dict[str, Any]) -> set[str]:
    """Patients the generator of a synthetic store learnt from: the provenance's list and the
    ``training_patients.json`` of its diffusion run and of that run's Γ-VAE run (when the
    folders exist)."""
    from edmcli.runs.folder import PATIENTS_FILE, load_training_patients

    patients = {str(p) for p in provenance.get("generator_patients") or []}
    recorded = False
    for run in (provenance.get("run"), provenance.get("vae_run")):  # diffusion run, its Γ-VAE
        if run and (Path(run) / PATIENTS_FILE).is_file():
            patients |= {str(p) for p in load_training_patients(Path(run)).get("patients", [])}
            recorded = True
    if not patients and not recorded:
        raise EchoSynthError(
            f"synthetic store {store} does not record the patients its generator was trained on "
            "(provenance generator_patients, or a run folder with training_patients.json), so "
            "the test split cannot be checked to be held out"
        )
    return patients


def check_held_out(
    spec: TrainSpec,
    validation: tuple[str | None, str | None],
    test_store: str,
    test_patients: set[str],
) -> None:
    """Refuse a test split that shares patients with a run's training data, its validation
    split or the generator behind a synthetic store."""
    sources: list[tuple[str, set[str]]] = []
    for store in spec.stores:
        sources.append((f"the train split of {store}", set(DatasetStore(store).patients("train"))))
    val_store, val_split = validation
    if val_store is not None:
        val_patients = set(DatasetStore(val_store).patients(val_split))
        sources.append((f"the {val_split} split of {val_store}", val_patients))
    if spec.generator_patients:
        sources.append(
            (f"the patients the generator of {spec.label} was trained on", spec.generator_patients)
        )
    for what, patients in sources:
        shared = sorted(patients & test_patients)
        if shared:
            shown = ", ".join(shared[:3]) + (", ..." if len(shared) > 3 else "")
            raise EchoSynthError(
                f"the test split of {test_store} shares {len(shared)} patient(s) with {what} "
                f"({shown}); test patients must be held out from the generator and from "
                "training, so use a test store whose test split none of them has seen"
            )


CHECKPOINT_CHOICES = ("real", "synthetic", "last")


def choose_validation(
    spec: TrainSpec,
    specs: list[TrainSpec],
    test_store: str,
    task: str,
    choice: str = "real",
    val: str | None = None,
) -> tuple[str | None, str | None, str]:
    """(store, split, how): what picks the run's tested checkpoint.

    * ``real`` (default): the best checkpoint on real validation images — the val split of
      ``val`` when given, else the run's own store(s) when they are real, else the first real
      train store's, else the test store's (the held-out check keeps its patients apart from
      the test split's);
    * ``synthetic``: the best checkpoint on the run's own stores' val split (a synthetic store
      written with ``sample --holdout``);
    * ``last``: no validation; the last checkpoint is tested.
    """
    if choice not in CHECKPOINT_CHOICES:
        raise EchoSynthError(
            f"checkpoint choice {choice!r} is unknown; choose from {', '.join(CHECKPOINT_CHOICES)}"
        )
    if choice == "last":
        return None, None, "the last checkpoint (no validation)"
    views = VIEWS if task == "cls" else None

    def usable(store: str) -> bool:
        return len(DatasetStore(store).indices("val", views)) > 0

    def real(store: str) -> bool:
        prov = DatasetStore(store).info.get("provenance") or {}
        return prov.get("source") != SYNTHETIC

    if choice == "synthetic":
        for store in spec.stores:
            if usable(store):
                return store, "val", f"the best checkpoint on the val split of {store}"
        raise EchoSynthError(
            f"--train {spec.text} has no val split to choose a checkpoint on; write the "
            "synthetic store with sample --holdout F, or choose the checkpoint on real "
            "validation images (checkpoint real) or take the last one (checkpoint last)"
        )
    if val is not None:
        store = str(Path(val).resolve())
        if not real(store):
            raise EchoSynthError(f"--val {val} is a synthetic store; give real validation images")
        if not usable(store):
            raise EchoSynthError(f"--val {val} has no images in its val split")
        return store, "val", f"the best checkpoint on real images: the val split of {store}"
    candidates = [s for s in spec.stores if real(s)]
    candidates += [s for other in specs for s in other.stores if real(s)]
    candidates.append(test_store)
    for store in dict.fromkeys(candidates):
        if usable(store):
            return store, "val", f"the best checkpoint on real images: the val split of {store}"
    raise EchoSynthError(
        f"--train {spec.text}: no real store has a val split to choose the checkpoint on; "
        "give one with --val STORE, or take the last checkpoint (checkpoint last)"
    )


def check_views(store: str, split: str, role: str) -> None:
    """View classification needs both A2C and A4C images in the split."""
    from edmcli.evaluation.downstream import views_present

    counts = views_present(DatasetStore(store), split)
    missing = [v for v, n in counts.items() if n == 0]
    if missing:
        raise EchoSynthError(
            f"{role} {store} has no {' or '.join(missing)} images in its {split} split; view "
            "classification needs both A2C and A4C (use --task seg)"
        )


# --------------------------------------------------------------------------- the stage
def resolve_task_values(preset: str, task: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """Settings of one task (``seg`` or ``cls``): the settings layer's preset row with the
    command's non-None overrides that the task takes (``deep_supervision`` is the segmenter's)."""
    from edmcli.settings import known_settings, resolve

    known = known_settings(task)
    return resolve(task, preset, {k: v for k, v in overrides.items() if k in known})


def evaluate(
    train: list[str],
    test: Path,
    out: Path,
    preset: str = "paper",
    tasks: list[str] | tuple[str, ...] = ("seg", "cls"),
    overrides: dict[str, Any] | None = None,
    device: str = "auto",
    seed: int = 0,
    precision: str = "auto",
    bootstrap_iterations: int = 1000,
    bootstrap_fraction: float = 0.8,
    checkpoint: str = "real",
    val: Path | None = None,
    fidelity: bool = False,
) -> dict[str, Any] | None:
    """Train, test and report (the body of ``echo-synth evaluate``): ``overrides`` are settings of
    :data:`edmcli.settings.PRESETS` ``["seg"]``/``["cls"]`` (None: the preset decides). Returns
    the report on the main process (None on the other ranks of a ``torchrun`` launch).

    ``fidelity``: also judge each synthetic ``--train`` spec with the real-trained reference
    networks, without training (:mod:`edmcli.evaluation.fidelity`): a ``quality`` section in the
    report, and with ≥ 3 synthetic specs the rank correlation of each metric with the
    downstream numbers. It needs a real ``--train`` store (the reference runs)."""
    from edmcli.evaluation.downstream import (
        DownstreamSettings,
        count_train,
        load_split,
        make_task,
        run_length,
        steps_per_epoch,
        stop_reason,
        stopping_config,
        test_run,
    )
    from edmcli.evaluation.report import build_report, print_summary, write_report
    from edmcli.runs.distributed import broadcast_flag, init_distributed, shutdown_distributed
    from edmcli.runs.folder import prepare_run_dir
    from edmcli.runs.lock import run_lock
    from edmcli.training.engine import TrainConfig, Trainer
    from edmcli.training.run import train_config_dict

    overrides = dict(overrides or {})
    if not train:
        raise EchoSynthError("--train is required (a dataset store to train on)")
    if bootstrap_iterations < 1:
        raise EchoSynthError(f"--bootstrap {bootstrap_iterations} must be at least 1")
    if not 0.0 < bootstrap_fraction <= 1.0:
        raise EchoSynthError(f"--bootstrap-fraction {bootstrap_fraction} must be in (0, 1]")
    test_reader = DatasetStore(test)
    test_store = str(Path(test).resolve())
    if (test_reader.info.get("provenance") or {}).get("source") == SYNTHETIC:
        raise EchoSynthError(f"--test {test} is a synthetic store; test on real images")
    if len(test_reader.indices("test")) == 0:
        raise EchoSynthError(
            f"--test {test} has no samples in its test split; the test store must hold "
            "held-out real patients in split 'test'"
        )
    test_patients = set(test_reader.patients("test"))
    for store in dict.fromkeys([str(test), *(p for t in train for p in _store_paths(t))]):
        bad = DatasetStore(store).invalid_label_values()
        if bad:  # before training, not after it
            raise EchoSynthError(
                f"{store} has label values {bad} outside the convention 0..4; rebuild it with "
                "echo-synth prepare"
            )
    specs = [parse_train_spec(text) for text in train]
    slugs = [s.slug for s in specs]
    if len(set(slugs)) != len(slugs):
        raise EchoSynthError("the same --train store(s) are given twice")
    if fidelity and not any(s.kind == "real" for s in specs):
        raise EchoSynthError(
            "--fidelity judges synthetic images with the real-trained networks: add a real "
            "store with --train (for instance the --test store, whose train split trains them)"
        )

    env = init_distributed(device)
    try:
        plans: list[dict[str, Any]] = []
        notes: list[str] = []
        for task in tasks:
            values = resolve_task_values(preset, task, overrides)
            if task == "cls":
                check_views(test_store, "test", "--test")
            for spec in specs:
                if task == "cls":
                    for store in spec.stores:
                        check_views(store, "train", "--train")
                val_store, val_split, chosen_by = choose_validation(
                    spec, specs, test_store, task, checkpoint, None if val is None else str(val)
                )
                check_held_out(spec, (val_store, val_split), test_store, test_patients)
                n_train = count_train(spec.stores, task)
                batch_size = int(values["batch"])
                if n_train < batch_size:
                    raise EchoSynthError(
                        f"batch {batch_size} is larger than the {n_train} training images of "
                        f"{spec.label}; lower the batch"
                    )
                per_epoch = steps_per_epoch(n_train, batch_size)
                length = run_length(values, n_train)  # until convergence, within a cap
                settings = DownstreamSettings(
                    task=task,
                    train_stores=spec.stores,
                    val_store=None if val_store is None else str(Path(val_store).resolve()),
                    val_split=val_split,
                    checkpoint="last" if val_store is None else "best",
                    size=int(values["size"]),
                    augment=bool(values["augment"]),
                    base_filters=int(values.get("base_filters", 32)),
                    max_filters=int(values.get("max_filters", 512)),
                    deep_supervision=bool(values.get("deep_supervision", False)),
                    eval_batch=int(values["eval_batch"]),
                )
                settings.validate()
                validate_every = values.get("validate_every") or per_epoch
                ema = float(values["ema_decay"])
                if not 0.0 <= ema < 1.0:
                    raise EchoSynthError(f"ema_decay {ema} must be in [0, 1)")
                config = TrainConfig(
                    steps=length.steps,
                    batch=batch_size,
                    lr=float(values["lr"]),
                    weight_decay=float(values["weight_decay"]),
                    warmup_steps=int(values["warmup_steps"]),
                    grad_clip=values["grad_clip"],
                    ema_decay=ema,
                    precision=precision,
                    checkpoint_every=int(values["checkpoint_every"]),
                    log_every=int(values["log_every"]),
                    validate_every=int(validate_every),
                    num_workers=int(values["num_workers"]),
                    seed=seed,
                    **stopping_config(values),
                )
                config.validate(env.world_size)
                plans.append(
                    {"task": task, "spec": spec, "settings": settings, "config": config,
                     "n_train": n_train, "run_dir": Path(out) / "runs" / f"{task}-{spec.slug}",
                     "checkpoint_chosen_by": chosen_by, "length": length}
                )  # fmt: skip
        notes += _size_notices(specs, test_store, plans)

        if env.is_main:
            Path(out).mkdir(parents=True, exist_ok=True)
            for note in notes:
                console.print(f"note: {note}", highlight=False)
        started = time.perf_counter()
        for plan in plans:
            settings, config, run_dir = plan["settings"], plan["config"], plan["run_dir"]
            resolved = {"kind": f"downstream-{settings.task}", "preset": preset,
                        **settings.as_dict(), **train_config_dict(config)}  # fmt: skip
            agree = lambda refused: broadcast_flag(refused, env)  # noqa: E731
            with run_lock(run_dir, enabled=env.is_main, agree=agree):  # one writer per run
                resumed = prepare_run_dir(run_dir, resolved, env.is_main)
                if env.is_main:
                    console.print(
                        f"{'resuming' if resumed else 'training'} {settings.task} on "
                        f"{plan['spec'].label} ({plan['n_train']} images, {plan['spec'].kind}) in "
                        f"{run_dir}: batch {config.batch} on {env.device}, "
                        f"{_length_text(config, plan['length'])}; "
                        f"tested: {plan['checkpoint_chosen_by']}",
                        highlight=False,
                    )
                t0 = time.perf_counter()
                result = Trainer(make_task(settings), config, run_dir, env).fit()
                plan["train_wall_s"] = time.perf_counter() - t0
                plan["steps_done"] = result.steps
                plan["resumed_from"] = result.resumed_from
                plan["epochs_done"] = result.epochs
                plan["stop_reason"] = stop_reason(result.stop_reason, result.steps, plan["length"])
                if env.is_main:
                    console.print(
                        f"{settings.task} on {plan['spec'].label}: {result.steps} steps "
                        f"({result.epochs:.1f} epochs), stopped by {plan['stop_reason']}",
                        highlight=False,
                    )
        if not env.is_main:
            return None
        test_data = {task: load_split(test_store, "test") for task in tasks}
        if "cls" in test_data:
            data = test_data["cls"]
            test_data["cls"] = data.select(data.views >= 0)
        results = []
        for plan in plans:
            t0 = time.perf_counter()
            scored = test_run(
                plan["settings"], plan["run_dir"], test_data[plan["task"]], env.device
            )
            plan["test_wall_s"] = time.perf_counter() - t0
            results.append((plan, scored))
        quality = None
        if fidelity:
            from edmcli.evaluation.fidelity import quality_section

            quality = quality_section(plans, test_data, env.device, seed)
        report = build_report(
            results,
            test_store=test_store,
            test_data=test_data,
            settings={
                "preset": preset, "tasks": list(tasks), "overrides": {
                    k: v for k, v in overrides.items() if v is not None},
                "seed": seed, "device": str(env.device), "world_size": env.world_size,
                "precision": precision, "bootstrap_iterations": bootstrap_iterations,
                "checkpoint": checkpoint, "val": None if val is None else str(val),
                "bootstrap_fraction": bootstrap_fraction, "bootstrap_confidence": 0.95,
                "fidelity": fidelity, "code_version": code_version(),
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            },
            notes=notes,
            wall_s=time.perf_counter() - started,
        )  # fmt: skip
        if quality is not None:
            from edmcli.evaluation.fidelity import correlation_table

            quality["correlation"] = correlation_table(quality, report, bootstrap_iterations, seed)
            report["quality"] = quality
        write_report(report, Path(out), test_data, results)
        print_summary(report)
        console.print(
            f"report: {Path(out) / 'report.md'} (numbers: {Path(out) / 'report.json'}, plots: "
            f"{Path(out) / 'plots'})",
            highlight=False,
        )
        return report
    finally:
        shutdown_distributed()


def _length_text(config: TrainConfig, length: RunLength) -> str:
    """``400 steps (80 epochs)``, or ``at most 400 steps (80 epochs), fewer when 6 validations
    in a row bring no improvement`` with early stopping."""
    text = f"{config.steps} steps ({config.steps / length.steps_per_epoch:.3g} epochs)"
    if config.patience:
        text = (
            f"at most {text}, fewer when {config.patience} validations in a row bring no "
            "improvement"
        )
    return text


def _size_notices(specs: list[TrainSpec], test_store: str, plans: list[dict]) -> list[str]:
    """One notice per store whose images the networks see resampled."""
    sizes = sorted({p["settings"].size for p in plans})
    notes = []
    seen: set[str] = set()
    stores = [s for spec in specs for s in spec.stores] + [p["settings"].val_store for p in plans]
    for store in stores:
        if store is None or store in seen:
            continue
        seen.add(store)
        h, w = DatasetStore(store).image_size
        if any((h, w) != (s, s) for s in sizes):
            target = " and ".join(f"{s}×{s}" for s in sizes)
            notes.append(f"{store} has {h}×{w} images; they are resampled to {target}")
    h, w = DatasetStore(test_store).image_size
    if any((h, w) != (s, s) for s in sizes):
        target = " and ".join(f"{s}×{s}" for s in sizes)
        notes.append(
            f"test store {test_store} has {h}×{w} images; they are resampled to {target} for "
            f"the networks and the predictions are scored back at {h}×{w}"
        )
    return notes
