"""Single-process or ``torchrun`` (DDP) execution: NCCL on CUDA, gloo on CPU."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from edmcli.errors import EchoSynthError


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: rank, world size and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``; one clear error otherwise."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise EchoSynthError(
            f"--device {spec!r} is not a device (auto, cpu, cuda or cuda:N)"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise EchoSynthError(f"--device {spec} asked for CUDA but no GPU is available")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    elif device.type != "cpu":
        raise EchoSynthError(f"--device {spec!r} is not supported (auto, cpu, cuda or cuda:N)")
    return device


def process_layout() -> tuple[int, int, int]:
    """(world size, rank, local rank) of this process: ``torchrun``'s variables, else (1, 0, 0)."""
    return (
        int(os.environ.get("WORLD_SIZE", "1")),
        int(os.environ.get("RANK", "0")),
        int(os.environ.get("LOCAL_RANK", "0")),
    )


def init_distributed(device_spec: str) -> DistEnv:
    """Join the process group when launched by ``torchrun`` (WORLD_SIZE > 1), else run alone."""
    world_size, rank, local_rank = process_layout()
    device = resolve_device(device_spec, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    return DistEnv(rank, world_size, local_rank, device)


def shutdown_distributed() -> None:
    """Leave the process group together: on a normal exit a barrier first, so that no rank tears
    gloo down while another is still in a collective (a gloo rank can abort with "terminate
    called without an active exception" when its peer destroys the group first). While an
    exception propagates (the callers run this in ``finally``) there is no barrier: the other
    ranks may be stuck in a collective, and torchrun ends them."""
    if dist.is_initialized():
        try:
            if sys.exc_info()[0] is None:
                dist.barrier()
        finally:
            dist.destroy_process_group()


def all_reduce_mean(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Mean over ranks (identity when alone)."""
    if env.distributed:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= env.world_size
    return value


def broadcast_flag(flag: bool, env: DistEnv) -> bool:
    """True on every rank when it is true on any rank (stop requests, NaN)."""
    if not env.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)
