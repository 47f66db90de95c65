"""The one training engine of echo-synth (Γ-VAE, diffusion models, downstream networks).

AdamW with linear warm-up, gradient clipping, an EMA of the weights, mixed precision on CUDA
(bf16 by default, fp16 with a gradient scaler), fp32 on CPU, gradient accumulation, DDP under
``torchrun``, atomic checkpoints, exact resume, a NaN guard and SIGINT/SIGTERM checkpoints.

Exact resume: everything random is a function of (seed, step) or (seed, epoch, sample): the data
order (:mod:`edmcli.training.sampler`), the augmentation of each sample (seeded by the task from
``(epoch, index)``) and the model's own noise (the global torch RNG is reseeded at every step).
A run killed at any point and rerun ends with the same weights as an uninterrupted run on CPU.

Crash drills: ``ECHO_SYNTH_FAULT_KILL=train-step:N`` SIGKILLs the process right after optimiser
step N, before that step's checkpoint (:mod:`edmcli.faults`).
"""

from __future__ import annotations

import math
import signal
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from edmcli.console import progress
from edmcli.errors import EchoSynthError, Interrupted
from edmcli.faults import maybe_kill
from edmcli.runs.checkpoint import (
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from edmcli.runs.distributed import DistEnv, all_reduce_mean, broadcast_flag
from edmcli.runs.folder import MetricsLog
from edmcli.training.ema import EMA
from edmcli.training.sampler import ResumableDistributedSampler

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


class TrainingInterrupted(Interrupted):
    """SIGINT/SIGTERM: a checkpoint was written; rerunning the command resumes."""


@dataclass
class TrainConfig:
    """Optimisation settings shared by every model (documented defaults, overridable)."""

    steps: int
    batch: int  # global batch (all ranks, all accumulation rounds)
    batch_gpu: int | None = None  # per-rank micro-batch; None: batch / world size
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float | None = 1.0
    ema_decay: float = 0.999
    precision: str = "auto"
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    grid_every: int = 0
    validate_every: int = 0  # steps between TrainingTask.validate calls (0: only at the end)
    num_workers: int = 0
    seed: int = 0

    @classmethod
    def from_values(
        cls, values: dict[str, Any], steps: int, precision: str, seed: int
    ) -> TrainConfig:
        """A config from resolved preset values (extra keys are ignored; missing optional
        keys keep their defaults)."""
        from dataclasses import fields

        known = {f.name for f in fields(cls)} - {"steps", "precision", "seed"}
        picked = {k: values[k] for k in known if values.get(k) is not None}
        return cls(steps=int(steps), precision=precision, seed=seed, **picked)

    def validate(self, world_size: int) -> None:
        if self.steps < 1:
            raise EchoSynthError(f"training needs at least one step (got {self.steps})")
        if not self.lr > 0:
            raise EchoSynthError(f"lr {self.lr} must be positive")
        if not 0.0 <= self.ema_decay < 1.0:
            raise EchoSynthError(f"ema_decay {self.ema_decay} must be in [0, 1)")
        if self.num_workers < 0:
            raise EchoSynthError(f"num_workers {self.num_workers} must be at least 0")
        if self.weight_decay < 0 or self.warmup_steps < 0:
            raise EchoSynthError("weight_decay and warmup_steps must be at least 0")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise EchoSynthError(f"grad_clip {self.grad_clip} must be positive (or None)")
        if self.precision not in PRECISIONS:
            raise EchoSynthError(f"precision {self.precision!r}: choose from {PRECISIONS}")
        per_rank, rest = divmod(self.batch, world_size)
        if self.batch < 1 or rest:
            raise EchoSynthError(
                f"batch {self.batch} must be a positive multiple of the {world_size} processes"
            )
        micro = self.batch_gpu or per_rank
        if micro < 1 or per_rank % micro:
            raise EchoSynthError(f"batch_gpu {micro} must divide the per-process batch {per_rank}")


class TrainingTask(ABC):
    """What a model contributes to the engine: its network, data, loss and reports."""

    @abstractmethod
    def build_model(self) -> nn.Module:
        """The trainable network (on CPU; the engine moves it)."""

    @abstractmethod
    def train_dataset(self) -> Dataset:
        """Items are fetched with keys ``(index, epoch)`` (see :class:`SeededItems`)."""

    @abstractmethod
    def loss(
        self, model: nn.Module, batch: Any, step: int, epoch: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Scalar loss to minimise and named terms to log."""

    def report(self, ema_model: nn.Module, step: int, run_dir: Path) -> dict[str, float]:
        """Periodic report on the main rank (sample/reconstruction grids); returns metrics."""
        return {}

    def validate(self, ema_model: nn.Module, step: int) -> dict[str, float] | None:
        """Validation on the main rank; a returned ``"score"`` (higher is better) selects the
        best checkpoint (``checkpoints/best.pt``). None: the task does not validate."""
        return None

    def augmentation(self) -> Callable | None:
        """Per-item ``augment(item, rng)`` (called after :meth:`train_dataset`), or None."""
        return None

    def collate(self) -> Callable | None:
        return None


class SeededItems(Dataset):
    """Wraps a dataset and a per-item ``augment(item, rng)``: key ``(index, epoch)`` → item
    augmented with a generator seeded by (seed, epoch, index), whichever worker loads it."""

    def __init__(self, dataset: Dataset, seed: int, augment: Callable | None = None) -> None:
        self.dataset, self.seed, self.augment = dataset, seed, augment

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, epoch = key
        item = self.dataset[index]
        if self.augment is None:
            return item
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch, index, 0xA06]))
        return self.augment(item, rng)


class _EpochKeyedSampler(ResumableDistributedSampler):
    def __iter__(self):
        for index in super().__iter__():
            yield (index, self.epoch)


def step_seed(seed: int, step: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, step, rank, 0x57E9]).generate_state(1)[0])


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """None (fp32) on CPU and for fp32; bf16 for ``auto`` on CUDA."""
    if device.type != "cuda" or precision == "fp32":
        return None
    return torch.float16 if precision == "fp16" else torch.bfloat16


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


@dataclass
class TrainResult:
    steps: int
    resumed_from: int
    images_per_second: float
    last_metrics: dict[str, float]
    checkpoint: Path
    best_score: float | None = None


class Trainer:
    """Runs a :class:`TrainingTask` in a run folder until ``config.steps`` optimiser steps."""

    def __init__(
        self, task: TrainingTask, config: TrainConfig, run_dir: Path, env: DistEnv
    ) -> None:
        config.validate(env.world_size)
        self.task, self.config, self.run_dir, self.env = task, config, Path(run_dir), env
        self._stop_signal: int | None = None
        self._best_score: float | None = None

    # ------------------------------------------------------------------ state
    def _state(self, model, ema, optimizer, scaler, step: int) -> dict[str, Any]:
        return {
            "format": "echo-synth-checkpoint",
            "step": step,
            "model": unwrap(model).state_dict(),
            "ema": ema.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "train_config": asdict(self.config),
            "best_score": self._best_score,
        }

    def _save(self, model, ema, optimizer, scaler, step: int) -> Path:
        path = checkpoint_path(self.run_dir, step)
        if self.env.is_main:
            state = self._state(model, ema, optimizer, scaler, step)
            save_checkpoint(state, path, keep=self.config.keep_checkpoints)
        return path

    def _validate(self, ema: EMA, step: int, metrics_log: MetricsLog) -> None:
        """Validate on the main rank; save ``best.pt`` when the score improves."""
        if self.env.is_main:
            metrics = self.task.validate(ema.model, step)
            if metrics:
                metrics_log.write({"step": step, **{f"val/{k}": v for k, v in metrics.items()}})
                score = metrics.get("score")
                if score is not None and (self._best_score is None or score > self._best_score):
                    self._best_score = float(score)
                    best = {
                        "format": "echo-synth-checkpoint",
                        "step": step,
                        "model": ema.state_dict(),
                        "val": metrics,
                    }
                    save_checkpoint(best, self.run_dir / "checkpoints" / "best.pt", keep=None)
        if self.env.distributed:
            torch.distributed.barrier()

    def _on_signal(self, signum, _frame) -> None:
        self._stop_signal = signum

    # ------------------------------------------------------------------- loop
    def fit(self) -> TrainResult:
        cfg, env = self.config, self.env
        device = env.device
        if env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)  # initial weights: the same on every rank
        model = self.task.build_model().to(device)
        ema = EMA(model, cfg.ema_decay)
        optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad],
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
        )
        amp_dtype = autocast_dtype(cfg.precision, device)
        scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None

        start_step = 0
        last = latest_checkpoint(self.run_dir)
        if last is not None:
            state = load_checkpoint(last, map_location=device)
            try:
                model.load_state_dict(state["model"])
                ema.load_state_dict(state["ema"])
                optimizer.load_state_dict(state["optimizer"])
            except (RuntimeError, ValueError, KeyError) as exc:
                raise EchoSynthError(
                    f"checkpoint {last} does not fit this model "
                    f"({str(exc).splitlines()[0][:120]}); use another run folder"
                ) from None
            if scaler is not None and state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            start_step = int(state["step"])
            self._best_score = state.get("best_score")

        train_model: nn.Module = model
        if env.distributed:
            ids = [device.index] if device.type == "cuda" else None
            train_model = DistributedDataParallel(model, device_ids=ids)

        dataset = SeededItems(self.task.train_dataset(), cfg.seed, self.task.augmentation())
        per_rank = cfg.batch // env.world_size
        micro = cfg.batch_gpu or per_rank
        rounds = per_rank // micro
        try:
            sampler = _EpochKeyedSampler(len(dataset), per_rank, cfg.seed, env.rank, env.world_size)
        except ValueError as exc:
            raise EchoSynthError(str(exc)) from None
        loader = DataLoader(
            dataset,
            batch_size=per_rank,
            sampler=sampler,
            num_workers=cfg.num_workers,
            persistent_workers=cfg.num_workers > 0,
            pin_memory=device.type == "cuda",
            drop_last=True,
            collate_fn=self.task.collate(),
        )
        metrics_log = MetricsLog(self.run_dir / "metrics.jsonl", start_step, env.is_main)
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        window: dict[str, float] = {}
        window_steps, window_start = 0, time.perf_counter()
        throughput: list[float] = []
        last_metrics: dict[str, float] = {}
        step = start_step
        ckpt = last
        try:
            if start_step >= cfg.steps:
                return TrainResult(step, start_step, 0.0, {}, last)
            with progress(
                cfg.steps - start_step, type(self.task).__name__, enabled=env.is_main
            ) as report:
                while step < cfg.steps:
                    epoch, offset = divmod(step, sampler.batches_per_epoch)
                    sampler.set_position(epoch, offset)
                    for batch in loader:
                        terms = self._step(
                            train_model, model, optimizer, scaler, amp_dtype, batch, step,
                            epoch, rounds, micro,
                        )  # fmt: skip
                        ema.update(model, step)
                        step += 1
                        for k, v in terms.items():
                            window[k] = window.get(k, 0.0) + v
                        window_steps += 1
                        report(1)
                        maybe_kill("train-step", step)
                        stop = broadcast_flag(self._stop_signal is not None, env)
                        if step % cfg.log_every == 0 or step == cfg.steps:
                            elapsed = time.perf_counter() - window_start
                            ips = window_steps * cfg.batch / max(elapsed, 1e-9)
                            throughput.append(ips)
                            last_metrics = {k: v / window_steps for k, v in window.items()}
                            lr = optimizer.param_groups[0]["lr"]
                            record = {"step": step, "epoch": epoch, "lr": lr, **last_metrics}
                            record["images_per_s"] = ips
                            metrics_log.write(record)
                            report.status(
                                " ".join(f"{k} {v:.4g}" for k, v in last_metrics.items())
                                + f" | {ips:.1f} img/s"
                            )
                            window, window_steps = {}, 0
                            window_start = time.perf_counter()
                        if cfg.grid_every and step % cfg.grid_every == 0 and env.is_main:
                            self.task.report(ema.model, step, self.run_dir)
                        validate_now = cfg.validate_every and step % cfg.validate_every == 0
                        if validate_now or step == cfg.steps:
                            self._validate(ema, step, metrics_log)
                        if stop or step % cfg.checkpoint_every == 0 or step == cfg.steps:
                            ckpt = self._save(model, ema, optimizer, scaler, step)
                        if stop:
                            raise TrainingInterrupted(
                                f"interrupted at step {step}; checkpoint {ckpt} written; rerun "
                                "the same command to resume"
                            )
                        if step >= cfg.steps:
                            break
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        if env.is_main:
            self.task.report(ema.model, step, self.run_dir)
        steady = throughput[1:] or throughput
        return TrainResult(
            step, start_step, float(np.mean(steady)), last_metrics, ckpt, self._best_score
        )

    def _step(
        self, train_model, model, optimizer, scaler, amp_dtype, batch, step, epoch, rounds, micro
    ) -> dict[str, float]:
        cfg, env = self.config, self.env
        torch.manual_seed(step_seed(cfg.seed, step, env.rank))
        lr = cfg.lr * min(1.0, (step + 1) / max(cfg.warmup_steps, 1))
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        for r in range(rounds):
            part = _slice_batch(batch, r * micro, (r + 1) * micro, env.device)
            sync = r == rounds - 1 or not env.distributed
            ctx = nullcontext() if sync else train_model.no_sync()
            with ctx:
                autocast = (
                    torch.autocast(env.device.type, dtype=amp_dtype)
                    if amp_dtype is not None
                    else nullcontext()
                )
                with autocast:
                    loss, terms = self.task.loss(train_model, part, step, epoch)
                if not broadcast_flag(not bool(torch.isfinite(loss.detach())), env):
                    scaled = loss / rounds
                    (scaler.scale(scaled) if scaler is not None else scaled).backward()
                else:
                    self._nan_stop(step, terms)
            for k, v in terms.items():
                totals[k] = totals.get(k, 0.0) + float(v.detach()) / rounds
        if scaler is not None:
            scaler.unscale_(optimizer)
        params = [p for p in model.parameters() if p.grad is not None]
        if cfg.grad_clip:
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        else:
            norm = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(p.grad) for p in params])
            )
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        elif not math.isfinite(float(norm)):
            self._nan_stop(step, {"grad_norm": norm})
        else:
            optimizer.step()
        for k, v in list(totals.items()):
            totals[k] = float(all_reduce_mean(torch.tensor(v, device=env.device), env))
        totals["grad_norm"] = float(norm)
        return totals

    def _nan_stop(self, step: int, terms: dict[str, torch.Tensor]) -> None:
        last = latest_checkpoint(self.run_dir)
        kept = f"the last good checkpoint {last} is kept" if last else "no checkpoint was written"
        values = ", ".join(f"{k}={float(v):.4g}" for k, v in terms.items())
        raise EchoSynthError(
            f"the loss became NaN/Inf at step {step} ({values}); {kept}; lower the learning "
            "rate, use fp32 precision or check the data"
        )


def _slice_batch(batch: Any, start: int, stop: int, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch[start:stop].to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _slice_batch(v, start, stop, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(_slice_batch(v, start, stop, device) for v in batch)
    return batch
