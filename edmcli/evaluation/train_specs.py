"""The ``--train`` values of ``echo-synth evaluate`` (:class:`TrainSpec`, :func:`parse_train_spec`):
the store(s) one run trains on, whether they are real, synthetic or mixed, what generated them,
and the patients their generator learnt from, against which the test split is checked to be
held out (:func:`check_held_out`); and the validation split that picks each run's tested
checkpoint (:func:`choose_validation`), which must hold patients none of the run's training rows
came from (:func:`check_validation_unseen`)."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edmcli.data.labels import VIEWS
from edmcli.data.store import DatasetStore
from edmcli.errors import EchoSynthError
from edmcli.runs.folder import PATIENTS_FILE, load_training_patients

SYNTHETIC = "synthetic"


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
    parts = store_paths(text)
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
        if prov.get("source") == SYNTHETIC and "test" in (prov.get("label_splits") or []):
            raise EchoSynthError(
                f"--train {part} was sampled from test label maps: a probe store, for judging "
                "(evaluate --fidelity --probe), never for training; sample the training store "
                "with --splits train"
            )
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


def store_paths(text: str) -> list[str]:
    """The store paths of one ``--train`` value (see :func:`parse_train_spec`)."""
    return [text] if Path(text).exists() else [p.strip() for p in text.split(",") if p.strip()]


def _generator_patients(store: str, provenance: dict[str, Any]) -> set[str]:
    """Patients the generator of a synthetic store learnt from: the provenance's list and the
    ``training_patients.json`` of its diffusion run and of that run's Γ-VAE run (when the
    folders exist)."""
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


def check_validation_unseen(spec: TrainSpec, validation: tuple[str | None, str | None]) -> None:
    """Refuse a checkpoint-choosing split whose patients a run's training rows came from.

    A synthetic row's ``patient`` is the patient of its source label map, so a store sampled from
    the train *and* val maps (``sample --splits train,val``) trains on the val patients' maps; a
    checkpoint chosen on those patients' real images is chosen on maps the run has learnt, and
    the tested number is optimistic. Real stores are checked the same way (their splits must not
    share patients)."""
    val_store, val_split = validation
    if val_store is None:
        return
    val_patients = set(DatasetStore(val_store).patients(val_split))
    for store in spec.stores:
        reader = DatasetStore(store)
        shared = sorted(set(reader.patients("train")) & val_patients)
        if not shared:
            continue
        shown = ", ".join(shared[:3]) + (", ..." if len(shared) > 3 else "")
        synthetic = (reader.info.get("provenance") or {}).get("source") == SYNTHETIC
        what = (
            f"synthetic store {store} was sampled from their label maps"
            if synthetic
            else f"the train split of {store} holds them"
        )
        raise EchoSynthError(
            f"the checkpoint of the run on {spec.label} would be chosen on the {val_split} split "
            f"of {val_store}, but {len(shared)} of its patients ({shown}) are among the run's "
            f"training rows ({what}); sample the store with --splits train, or choose on the "
            "store's own held-out split (sample --holdout F, evaluate --checkpoint synthetic), "
            "or give --val a store of other patients"
        )


# What makes two synthetic stores the same generator's images: the checkpoint and every
# sampling setting (the label maps, transforms and seeds may differ), and the privacy filter's
# percentile (sample --privacy-filter).
GENERATOR_KEYS = ("checkpoint_sha256", "nfe", "solver", "churn", "schedule", "pin_outside",
                  "class_cond", "guidance")  # fmt: skip


def generator_identity(provenance: dict[str, Any]) -> tuple[Any, ...]:
    """The generator and sampling settings of a synthetic store (:data:`GENERATOR_KEYS`, and
    the privacy filter's percentile)."""
    privacy = (provenance.get("privacy_filter") or {}).get("percentile")
    return (*(provenance.get(key) for key in GENERATOR_KEYS), privacy)


def match_probes(probes: list[str], specs: list[TrainSpec]) -> dict[str, str]:
    """Synthetic spec slug → the resolved path of its ``--probe`` store: a store the same
    generator sampled with the same settings from label maps of patients the reference networks
    never saw (typically ``sample --labels TEST_STORE --splits test``), that
    ``evaluate --fidelity`` judges label fidelity and classifier accuracy on. Refuses a probe
    that is not synthetic or that no synthetic ``--train`` store shares a generator with."""
    matched: dict[str, str] = {}
    for probe in probes:
        prov = DatasetStore(probe).info.get("provenance") or {}
        if prov.get("source") != SYNTHETIC:
            raise EchoSynthError(f"--probe {probe} is not a synthetic store (written by sample)")
        mine = generator_identity(prov)
        owners = [
            spec for spec in specs
            if spec.kind == SYNTHETIC and generator_identity(spec.provenance[0]) == mine
        ]  # fmt: skip
        if not owners:
            raise EchoSynthError(
                f"--probe {probe} was sampled by a generator or with settings (checkpoint, NFE, "
                "solver, guidance) that no synthetic --train store shares; sample it from the "
                "same run with the same options"
            )
        for spec in owners:
            if spec.slug in matched:
                raise EchoSynthError(
                    f"--probe {probe} and --probe {matched[spec.slug]} both match --train "
                    f"{spec.text}; give one probe per generator"
                )
            matched[spec.slug] = str(Path(probe).resolve())
    return matched


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
