"""The plan of ``echo-synth distill``: a trained EDM-family run (the teacher) → a few-step student
run, every refusal before any work.

The student is an ordinary diffusion run of the teacher's model and network (same UNet, SPADE
conditioning, class conditioning, Γ-VAE and latent normalisation), initialised from the teacher's
EMA weights and tuned by Easy Consistency Tuning (:mod:`edmcli.models.consistency`). Its
``config.yaml`` carries the teacher's settings plus a ``consistency`` record: the method, the
teacher's run, checkpoint and hash, the tuning's level schedule, and the noise levels at which
``sample`` evaluates it for each NFE it was made for (:data:`STUDENT_NFES`). The teacher's
checkpoint is frozen into the student's folder like a latent run's Γ-VAE.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from edmcli.data.store import DatasetStore
from edmcli.errors import EchoSynthError
from edmcli.models.consistency import ECTSchedule, student_sigmas
from edmcli.models.preconditioning import EDMPrecond
from edmcli.models.registry import get_spec, model_names
from edmcli.runs.checkpoint import file_sha256, find_checkpoint, latest_checkpoint
from edmcli.runs.diffusion_run import DiffusionSettings, diffusion_vae_ref, resolve_run
from edmcli.runs.folder import frozen_dependency, load_run_config
from edmcli.runs.vae_run import VAERunRef
from edmcli.settings import resolve, training_steps
from edmcli.training.diffusion_plan import PreviewFn, settings_dict
from edmcli.training.engine import TrainConfig
from edmcli.training.plan_common import Placement, length_line, place
from edmcli.training.run import train_config_dict

__all__ = ["DistillPlan", "METHODS", "STUDENT_NFES", "is_edm", "plan_distill"]

METHODS = ("ect",)
TEACHER_SHARE = 0.75
"""The default length of a student, as a share of its teacher's steps: a tuning step costs a
training step plus one forward pass without gradient (about 4/3; measured 1.12x on the demo's
EDM-L64), so 3/4 of the steps cost no more than the teacher's training (0.95x measured)."""
STUDENT_NFES = (1, 2, 4)
"""The NFEs a student is made for (``sample --run STUDENT --nfe``), each with its recorded
levels."""


@dataclass(frozen=True)
class DistillPlan:
    """A planned student run: ``resolved`` is the ``config.yaml`` it writes (or checks on
    resume)."""

    model: str
    run: Path
    teacher: Path
    teacher_checkpoint: Path
    teacher_sha256: str
    settings: DiffusionSettings  # the student's: the teacher's plus ``consistency``
    schedule: ECTSchedule
    train_config: TrainConfig
    resolved: dict[str, Any]
    n_train: int
    placement: Placement
    vae: VAERunRef | None = None
    preview: PreviewFn | None = None

    def describe(self) -> list[str]:
        s = self.settings.consistency or {}
        levels = "; ".join(f"NFE {n}: " + ", ".join(f"{v:.3g}" for v in sig)
                           for n, sig in s.get("sigmas", {}).items())  # fmt: skip
        return [
            f"distill ({s.get('method')}): {self.teacher} → {self.run} ({self.model})",
            f"teacher checkpoint {self.teacher_checkpoint.name} (sha256 "
            f"{self.teacher_sha256[:12]}…)",
            self.placement.line(self.run),
            length_line(self.train_config, self.n_train),
            f"student levels: {levels}",
        ]


def is_edm(model: str) -> bool:
    """Whether ``model`` is of the EDM family (a teacher ``distill`` can tune)."""
    return get_spec(model).precond is EDMPrecond


def plan_distill(
    teacher: Path,
    *,
    run: Path | None = None,
    method: str = "ect",
    checkpoint: Path | None = None,
    precision: str = "auto",
    device: str = "auto",
    seed: int = 0,
    preview: PreviewFn | None = None,
    **overrides: Any,
) -> DistillPlan:
    """The plan of :func:`edmcli.training.distill.distill`. Refuses, in one sentence each: an
    unknown method; a teacher that is not a diffusion run, not of the EDM family (sdm, ve, vp
    sample with their own solvers), a student itself, without a checkpoint (or ``checkpoint``
    missing); a training store that is gone; the length and engine settings. ``overrides``: the
    ``train-diffusion`` settings of the tuning (``steps``, ``lr``, ``batch``, ``ema_decay``, ...;
    default: the teacher's preset row, and :data:`TEACHER_SHARE` of the teacher's steps)."""
    if method not in METHODS:
        raise EchoSynthError(f"--method {method!r}: choose from {', '.join(METHODS)}")
    model, teacher = resolve_run(None, Path(teacher), Path("runs"))
    if not is_edm(model):
        edm = ", ".join(n for n in model_names() if is_edm(n))
        raise EchoSynthError(
            f"{teacher} is a {model} run; distill tunes an EDM-family denoiser ({edm}), whose "
            "preconditioning gives the student its boundary D(x; 0) = x"
        )
    config = load_run_config(teacher)
    teacher_settings = DiffusionSettings.from_config(config)
    if teacher_settings.consistency:
        raise EchoSynthError(f"{teacher} is already a distilled student; distil its teacher")
    chosen = find_checkpoint(checkpoint, teacher) if checkpoint else latest_checkpoint(teacher)
    if chosen is None or not Path(chosen).is_file():
        raise EchoSynthError(f"the teacher {teacher} has no checkpoint; train it first")
    data = Path(teacher_settings.data)
    if not data.exists():
        raise EchoSynthError(
            f"{data}, the teacher's training store, does not exist (moved or deleted?)"
        )
    run = Path(run) if run is not None else teacher.with_name(f"{teacher.name}-student")
    frozen = frozen_dependency(run, "teacher")
    if frozen is not None and frozen.source_run == teacher.resolve():
        chosen, digest = frozen.source_checkpoint, frozen.sha256  # resuming: the same teacher
    else:
        digest = file_sha256(chosen)
    values = resolve("diffusion", teacher_settings.preset, overrides)
    n_train = len(DatasetStore(data).indices("train"))
    steps = overrides.get("steps")
    if steps is None and overrides.get("kimg") is None and overrides.get("epochs") is None:
        teacher_steps = int(config.get("steps") or 0)  # the preset's length is the teacher's
        steps = max(1, math.ceil(TEACHER_SHARE * teacher_steps)) if teacher_steps else None
    if steps is None:
        steps = training_steps(values, n_train)
    train_config = TrainConfig.from_values(values, int(steps), precision, seed)
    sigma_data = float(teacher_settings.precond.get("sigma_data", 0.5))
    sigma_max = float(teacher_settings.precond.get("sigma_max", 80.0))
    schedule = ECTSchedule(total_steps=train_config.steps, sigma_max=sigma_max,
                           sigma_min=sigma_data / 250).validate()  # fmt: skip
    record = {
        "method": method,
        "teacher_run": str(teacher.resolve()),
        "teacher_checkpoint": str(Path(chosen).resolve()),
        "teacher_sha256": digest,
        "schedule": schedule.record(),
        "sigmas": {str(n): student_sigmas(n, sigma_max, sigma_data) for n in STUDENT_NFES},
    }
    settings = replace(teacher_settings, consistency=record)
    resolved = {"kind": "diffusion", **settings_dict(settings),
                **train_config_dict(train_config)}  # fmt: skip
    placement = place(run, device, train_config)
    vae = diffusion_vae_ref(teacher, teacher_settings)
    return DistillPlan(model, run, teacher, Path(chosen), digest, settings, schedule,
                       train_config, resolved, n_train, placement, vae, preview)  # fmt: skip
