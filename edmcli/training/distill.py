"""``echo-synth distill``: tune a trained EDM-family run into a few-step consistency student
(:mod:`edmcli.training.distill_plan` plans it, :mod:`edmcli.models.consistency` holds the maths).

The student trains with the engine every training command uses (resume by rerunning, the run's
lock, the NaN guard, torchrun, progress, EMA), on the teacher's training store with the teacher's
geometric augmentation and class dropout; only the loss differs from ``train-diffusion``
(:class:`ConsistencyTask`). Its weights start from the teacher's EMA weights (the teacher's
checkpoint frozen in the student's folder); a resumed run continues from its own checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from edmcli.data.labels import sector_mask
from edmcli.models.consistency import ECTLoss, ECTSchedule
from edmcli.runs.checkpoint import load_checkpoint
from edmcli.runs.diffusion_run import DiffusionSettings, build_network
from edmcli.runs.folder import Dependency
from edmcli.runs.vae_run import LoadedVAE, open_vae_run
from edmcli.training.diffusion import DiffusionTask, last_validation, vae_dependencies
from edmcli.training.diffusion_plan import PreviewFn
from edmcli.training.distill_plan import DistillPlan, plan_distill
from edmcli.training.run import train_run

__all__ = ["ConsistencyTask", "distill", "run_distill"]


class ConsistencyTask(DiffusionTask):
    """A diffusion task whose loss is :class:`~edmcli.models.consistency.ECTLoss` and whose
    network starts from the teacher's EMA weights."""

    def __init__(
        self,
        settings: DiffusionSettings,
        vae: LoadedVAE | None,
        teacher_checkpoint: Path,
        schedule: ECTSchedule,
        preview: PreviewFn | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(settings, vae, preview, seed)
        self.teacher_checkpoint = Path(teacher_checkpoint)
        self.consistency_loss = ECTLoss(schedule)

    def build_model(self) -> nn.Module:
        net = build_network(self.settings)
        state = load_checkpoint(
            self.teacher_checkpoint,
            "cpu",
            advice="retrain the teacher or distil another checkpoint",
        )
        net.load_state_dict(state["ema"])
        return net

    def loss(self, model, batch, step, epoch):
        labels = batch["labels"]
        target = self.to_model_space(batch["image"], labels)
        classes = self.class_labels(batch, step)
        loss, logs = self.consistency_loss(model, target, labels, sector_mask(labels), step,
                                           class_labels=classes)  # fmt: skip
        return loss, {"mse": logs["mse"], "gap": logs["gap"]}


def run_distill(plan: DistillPlan) -> dict[str, Any] | None:
    """Tune the planned student (resuming it when its folder exists); returns its summary on the
    main rank."""
    settings = plan.settings
    loaded_vae = open_vae_run(plan.vae, torch.device("cpu")) if plan.vae is not None else None

    def make_task(env):
        if loaded_vae is not None:
            loaded_vae.model.to(env.device)
        return ConsistencyTask(settings, loaded_vae, plan.teacher_checkpoint, plan.schedule,
                               plan.preview, seed=plan.train_config.seed)  # fmt: skip

    record = settings.consistency or {}
    teacher = Dependency("teacher", plan.teacher, plan.teacher_checkpoint, plan.teacher_sha256)
    return train_run(
        run=plan.run,
        device=plan.placement.device,
        resolved=plan.resolved,
        data=settings.data,
        train_config=plan.train_config,
        make_task=make_task,
        describe=f"a {record.get('method')} student of {plan.teacher.name}",
        report=lambda run, env: last_validation(run),
        title=f"{plan.model} student",
        head={
            "model": plan.model,
            "teacher": str(plan.teacher),
            "method": record.get("method"),
            "student NFEs": ", ".join(record.get("sigmas", {})),
        },  # fmt: skip
        depends_on=[teacher, *vae_dependencies(settings)],
    )


def distill(
    teacher: Path,
    *,
    run: Path | None = None,
    method: str = "ect",
    precision: str = "auto",
    device: str = "auto",
    seed: int = 0,
    preview: PreviewFn | None = None,
    **overrides: Any,
) -> dict[str, Any] | None:
    """Tune the EDM-family run ``teacher`` into a consistency student in ``run`` (default: the
    teacher's folder name + ``-student``); ``overrides`` are training settings (``steps``,
    default 3/4 of the teacher's; ``lr``, ``batch``, ``ema_decay``, ...). Returns the student's
    summary on the main rank."""
    plan = plan_distill(teacher, run=run, method=method, precision=precision, device=device,
                        seed=seed, preview=preview, **overrides)  # fmt: skip
    return run_distill(plan)
