"""Peak GPU memory of a training step and of a sampling batch, estimated before a run starts.

``bench`` sizes its batches on CUDA by trying; a training or sampling run cannot (it would fail an
hour in), so the plans of ``train-vae``, ``train-diffusion`` and ``sample`` ask this module first
(:func:`memory_check`): on a CUDA device they print one line with the estimated peak at the chosen
per-GPU batch and the largest batch that fits the device's free memory with a :data:`MARGIN`, and
refuse a batch whose estimate cannot fit, naming the option to lower and the value that fits. Off
CUDA nothing is estimated. The decision is the pure :func:`check_memory` (estimate, free bytes,
batch → ok, largest batch, message); the device is asked only in :func:`free_memory`.

Method: the step is *run*, on fake tensors, not modelled by a formula. Under torch's
``FakeTensorMode`` every tensor is a CUDA tensor without storage: the shapes, dtypes and code
paths are those of the real run (bf16 autocast as the engine uses it, the fused SPADE op,
``torch.autocast(enabled=False)`` around the Γ-VAE), no memory is allocated and no GPU is needed.
Attention takes SDPA's math path there (the fake device has no fused kernels; the UNet's q/k/v,
strided in their last dimension, are likely refused by them on a GPU too): where a GPU runs a
fused kernel instead, the estimate is high by the attention matrices (a few % at 256²).

A ``TorchDispatchMode`` (:class:`LiveBytes`) adds up the bytes of every storage the step creates
and subtracts them when torch frees it (a weak reference per storage), each rounded up to the CUDA
caching allocator's 512-byte blocks; the peak of that running sum is the estimate of
``torch.cuda.max_memory_allocated``. Backward runs through a small replica of the autograd
engine (:func:`fake_backward`), because torch's own engine needs a real device for CUDA tensors:
nodes run in the engine's order (the highest sequence number first once every gradient into them
is in), and a node's saved tensors go as soon as the node has run, as the engine releases them.

A training step is what :class:`~edmcli.training.engine.Trainer` does with one micro-batch in
steady state (step two on): the fp32 weights, the EMA copy and AdamW's two moments are there
before the step; the micro-batch (images, label maps) is moved to the device; the task's loss runs
under autocast (a latent model first encodes with its frozen Γ-VAE, in fp32 without gradients);
backward adds the fp32 gradients. Then, independent of the batch (the *floor*): AdamW's foreach
step (one more fp32 copy of the weights for ``sqrt(v)``) and the periodic validation pass of the
EMA network (16 images, fp32, no gradients) and sample preview (8 images) while the gradients are
still allocated. A resumed run also keeps the checkpoint's model and EMA tensors on the device for
the whole run (``Trainer.fit`` holds the loaded state), and DDP keeps a gradient bucket per
weight; both are added. A sampling batch is the network (EMA weights, eval, no gradients) and, for
a latent model, the whole Γ-VAE; the SPADE γ/β cache of the batch (tiled for two guidance
branches), the solver's state and one network evaluation under the sampling precision, then the
Γ-VAE decoder while the cache is alive.

Linear in the batch: the step is run at per-GPU batch 1 and 2; ``per_sample = peak(2) − peak(1)``
and ``fixed = peak(1) − per_sample``. On a CPU the same count (fp32, torch SPADE) is within 6 % of
the peak that torch's CPU allocator reports for the real step (tiny EDM at 32² and 64², Γ-VAE at
64², sampling; ``tests/training/test_memory_estimate.py``). Not counted, hence
:data:`CUDA_WORKSPACE` and the margin: the CUDA context (outside the free memory already),
cuBLAS/cuDNN workspaces, the allocator's fragmentation, ``torch.compile`` / CUDA-graph pools of
``sample --compile``.
"""

from __future__ import annotations

import heapq
import itertools
import json
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from echo_synth_kernels import get_spade_backend
from edmcli.errors import EchoSynthError
from edmcli.models.gamma_vae import GammaVAE, GammaVAEConfig
from edmcli.runs.diffusion_run import DiffusionSettings, build_network
from edmcli.runs.vae_run import VAESettings

__all__ = [
    "CUDA_BLOCK",
    "CUDA_WORKSPACE",
    "MARGIN",
    "LiveBytes",
    "MemoryCheck",
    "MemoryEstimate",
    "check_memory",
    "diffusion_training_memory",
    "fake_backward",
    "free_memory",
    "memory_check",
    "sampling_memory",
    "vae_training_memory",
]

MARGIN = 0.10  # of the free memory, kept free: fragmentation, workspaces, estimate error
CUDA_BLOCK = 512  # the CUDA caching allocator rounds every block up to this many bytes
CUDA_WORKSPACE = 512 * 2**20  # cuBLAS/cuDNN workspaces and kernels' scratch, not in the count
VALIDATION_BATCH = 16  # DiffusionTask.validate: up to 16 monitoring images, fp32, no gradients
PREVIEW_BATCH = 8  # the sample grids of a training run (diffusion previews, Γ-VAE recons)
# The periodic passes of a diffusion run go through the EMA network this many images at a time
# (the results do not depend on it): at 256² the 8-image preview with the SPADE γ/β cache (2.5 GiB
# per image for EDM) and the 16-image validation pass alone needed 18–32 GiB, more than a 24 GiB
# card, whatever --batch-gpu.
VALIDATION_CHUNK = 4
PREVIEW_CHUNK = 2
_GIB = 2**30


# ------------------------------------------------------------------------------- the decision
@dataclass(frozen=True)
class MemoryEstimate:
    """Peak device bytes of a step as a function of the per-GPU batch ``b``:
    ``max(floor, fixed + per_sample · b) + workspace``.

    Attributes:
        fixed: bytes at any batch while forward and backward run: weights, EMA copy, AdamW
            moments, gradients, frozen networks.
        per_sample: bytes each sample of the per-GPU batch adds (the activations).
        floor: a peak that does not depend on the batch (AdamW's step, validation, previews).
        workspace: bytes the count does not see (:data:`CUDA_WORKSPACE`).
        floor_note: what sets the floor, for the messages.
    """

    fixed: int
    per_sample: int
    floor: int = 0
    workspace: int = 0
    floor_note: str = ""

    def at(self, batch: int) -> int:
        return max(self.floor, self.fixed + self.per_sample * int(batch)) + self.workspace

    def largest_batch(self, budget: int) -> int:
        """The largest batch whose estimate fits ``budget`` bytes (0: not even one sample)."""
        if self.at(1) > budget:
            return 0
        if self.per_sample <= 0:
            return UNLIMITED
        return min(UNLIMITED, max(1, (budget - self.workspace - self.fixed) // self.per_sample))


UNLIMITED = 2**31 - 1


@dataclass(frozen=True)
class MemoryCheck:
    """The outcome of :func:`check_memory`: ``ok`` when ``batch`` fits; ``fits`` the largest
    allowed batch that does (0: none); ``message`` the one line to print or refuse with."""

    ok: bool
    batch: int
    fits: int
    needed: int
    free: int
    usable: int
    message: str


def size_text(n: float) -> str:
    """Bytes as ``12.3 GiB`` (``456 MiB`` below one GiB)."""
    return f"{n / _GIB:.1f} GiB" if n >= _GIB else f"{n / 2**20:.0f} MiB"


def check_memory(
    estimate: MemoryEstimate,
    free: int,
    batch: int,
    *,
    option: str,
    choices: Sequence[int] | None = None,
    rule: str = "",
    device: str = "cuda",
    unit: str = "sample",
    margin: float = MARGIN,
) -> MemoryCheck:
    """Whether ``batch`` fits ``free`` bytes less ``margin`` by ``estimate``, and the largest batch
    that does: among ``choices`` when given (e.g. the divisors of the per-process batch that
    ``--batch-gpu`` takes, which ``rule`` says in words), else any. Pure: asks no device.

    The message names ``option`` (the setting to lower) and the value that fits; when not even a
    batch of 1 fits, what needs the memory."""
    usable = int(free * (1.0 - margin))
    needed = estimate.at(batch)
    largest = estimate.largest_batch(usable)
    fits = largest if choices is None else max((c for c in choices if c <= largest), default=0)
    parts = f"{size_text(estimate.fixed + estimate.workspace)} fixed + "
    parts += f"{size_text(estimate.per_sample)} per {unit}"
    if estimate.floor > estimate.fixed + estimate.per_sample * batch:
        parts += f", at least {size_text(estimate.floor + estimate.workspace)}"
        parts += f" for {estimate.floor_note}" if estimate.floor_note else ""
    room = f"{size_text(free)} free on {device}, {size_text(usable)} usable with a "
    room += f"{margin:.0%} margin"
    if needed <= usable:
        cap = "any" if fits >= UNLIMITED else f"up to {fits}"
        message = (
            f"GPU memory: ≈ {size_text(needed)} peak at {option} {batch} ({parts}); {room}: "
            f"{option} {cap} fits"
        )
        return MemoryCheck(True, int(batch), int(fits), needed, int(free), usable, message)
    head = f"{option} {batch} needs ≈ {size_text(needed)} of GPU memory ({parts}) but {device} has "
    head += f"{size_text(free)} free ({size_text(usable)} usable with a {margin:.0%} margin)"
    if fits:
        message = f"{head}; lower {option} to {fits}{rule}"
    else:
        least = min(choices) if choices else 1
        what = ""
        floored = estimate.floor > estimate.fixed + estimate.per_sample * least
        if floored and estimate.floor_note and estimate.floor_note not in parts:
            what = f" ({estimate.floor_note})"
        message = (
            f"{head}, and even {option} {least} needs ≈ {size_text(estimate.at(least))}{what}: "
            f"free memory on {device} or use a GPU with more"
        )
    return MemoryCheck(False, int(batch), int(fits), needed, int(free), usable, message)


def free_memory(device: str | torch.device) -> int | None:
    """Free bytes on ``device`` (``torch.cuda.mem_get_info``); None off CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return int(torch.cuda.mem_get_info(device)[0])


MAX_SUGGESTED_BATCH = 1 << 16  # the largest batch a memory check suggests


def divisors(n: int, up_to: int = MAX_SUGGESTED_BATCH) -> list[int]:
    """The positive divisors of ``n`` up to ``up_to``, ascending: O(up_to) whatever ``n`` (a
    ``--chunk`` of 2⁶² must not stall a command's checks)."""
    n = int(n)
    return [d for d in range(1, min(n, up_to) + 1) if n % d == 0] if n > 0 else []


def memory_check(
    device: str | torch.device,
    estimate: Callable[[], MemoryEstimate],
    batch: int,
    *,
    option: str,
    choices: Sequence[int] | None = None,
    rule: str = "",
    unit: str = "sample",
) -> MemoryCheck | None:
    """:func:`check_memory` of ``estimate()`` on the free memory of ``device``: None off CUDA
    (nothing is estimated); raises :class:`EchoSynthError` with the check's line when ``batch``
    cannot fit. An estimate that fails (a network with an operator the fake device lacks) is
    said in the line and refuses nothing."""
    free = free_memory(device)
    if free is None:
        return None
    try:
        found = estimate()
    except Exception as exc:  # the estimate must never stop a run it cannot judge
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:160]
        line = f"GPU memory: not estimated ({reason}); {size_text(free)} free on {device}"
        return MemoryCheck(True, int(batch), 0, 0, free, free, line)
    check = check_memory(found, free, batch, option=option, choices=choices, rule=rule,
                         device=str(device), unit=unit)  # fmt: skip
    if not check.ok:
        raise EchoSynthError(check.message)
    return check


def training_check(
    device: str | torch.device,
    estimate: Callable[[], MemoryEstimate],
    *,
    batch: int,
    batch_gpu: int | None,
    world_size: int,
) -> MemoryCheck | None:
    """:func:`memory_check` of a training step at its micro-batch (``batch_gpu``, else the
    per-process batch), lowered by ``--batch-gpu`` to a divisor of the per-process batch (the
    engine accumulates gradients, so the global batch stays)."""
    per_rank = max(1, batch // max(1, world_size))
    rule = f" (a divisor of the per-process batch {per_rank}; gradient accumulation keeps it)"
    return memory_check(device, estimate, batch_gpu or per_rank, option="--batch-gpu",
                        choices=divisors(per_rank), rule=rule, unit="image")  # fmt: skip


def sampling_check(
    device: str | torch.device,
    estimate: Callable[[], MemoryEstimate],
    *,
    batch: int,
    chunk: int,
) -> MemoryCheck | None:
    """:func:`memory_check` of ``sample``: a network call takes ``min(batch, chunk)`` samples
    (a shard at most), and ``--batch`` divides ``--chunk``."""
    return memory_check(device, estimate, min(batch, chunk), option="--batch",
                        choices=divisors(chunk), rule=f" (a divisor of --chunk {chunk})",
                        unit="sample")  # fmt: skip


# ------------------------------------------------------------------------------ the counting
# Elementwise ops with no meta/fake kernel in torch (the Γ-VAE's Gamma.rsample backward): on fake
# or meta tensors their output is an empty tensor like their first argument.
_SAME_AS_FIRST = {torch.ops.aten._standard_gamma_grad.default}


def _holds_data(tensor: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return not (tensor.is_meta or isinstance(tensor, FakeTensor))


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages that are alive, and their peak, as torch creates and frees them.

    Every storage an operator returns is counted once (views share it), rounded up to ``block``
    bytes, and uncounted when torch frees it (a weak reference to the storage). Works on real,
    meta and fake tensors alike; only storages created while the mode is active count.
    """

    def __init__(self, block: int = CUDA_BLOCK) -> None:
        super().__init__()
        self.block = max(1, int(block))
        self.current = 0
        self.peak = 0
        self._refs: dict[int, weakref.ref] = {}

    def reset_peak(self) -> None:
        self.peak = self.current

    def _freed(self, key: int, size: int, _ref: Any) -> None:
        if self._refs.pop(key, None) is not None:
            self.current -= size

    def track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = id(storage)
        ref = self._refs.get(key)
        if ref is not None and ref() is storage:
            return
        size = -(-storage.nbytes() // self.block) * self.block
        self._refs[key] = weakref.ref(storage, lambda r, k=key, s=size: self._freed(k, s, r))
        self.current += size
        self.peak = max(self.peak, self.current)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _SAME_AS_FIRST and not _holds_data(args[0]):
            out = torch.empty_like(args[0])  # an op without a fake kernel: its output's shape
        else:
            out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self.track(value)
        return out


def _node_key(node: Any) -> Any:
    variable = getattr(node, "variable", None)  # AccumulateGrad: one per leaf
    return ("leaf", id(variable)) if variable is not None else node._sequence_nr()


def _node_inputs(node: Any) -> int:
    return len(node._input_metadata)


def _as_input(grad: torch.Tensor, metadata: Any) -> torch.Tensor:
    """The gradient as the engine's ``validate_outputs`` hands it on: summed to the input's shape
    (broadcasts), in its dtype."""
    shape = tuple(metadata.shape)
    if tuple(grad.shape) != shape:
        grad = grad.sum_to_size(shape)
    if grad.dtype != metadata.dtype:
        grad = grad.to(metadata.dtype)
    return grad


def fake_backward(holder: list[torch.Tensor]) -> None:
    """``holder.pop().backward()`` by a replica of torch's autograd engine, for tensors its own
    engine cannot run (fake CUDA tensors without a GPU). The loss is taken out of ``holder`` so
    that nothing but the graph keeps its nodes: each node, called under ``no_grad`` once all its
    gradients are summed (highest sequence number first, as the engine's ready queue), is freed
    right after with its saved tensors. Gradients of leaves go to ``.grad`` as the engine's
    ``AccumulateGrad`` puts them."""
    loss = holder.pop()
    root = loss.grad_fn
    if root is None:
        return
    grad = torch.ones_like(loss)
    del loss
    dependencies: dict[Any, int] = {}
    seen = {_node_key(root)}
    stack = [root]
    while stack:
        for child, _ in stack.pop().next_functions:
            if child is None:
                continue
            key = _node_key(child)
            dependencies[key] = dependencies.get(key, 0) + 1
            if key not in seen:
                seen.add(key)
                stack.append(child)
    del stack, seen
    order = itertools.count()
    buffers: dict[Any, list] = {_node_key(root): [grad] + [None] * (_node_inputs(root) - 1)}
    ready = [(-root._sequence_nr(), next(order), root)]
    del root, grad
    with torch.no_grad():
        while ready:
            node = heapq.heappop(ready)[2]
            grads = buffers.pop(_node_key(node))
            edges = node.next_functions
            if hasattr(node, "_forward_cls"):  # a Python autograd.Function: its own apply,
                grads = [  # with missing gradients as zeros (materialize_grads, the default)
                    torch.zeros(tuple(m.shape), dtype=m.dtype, device=m.device) if g is None else g
                    for g, m in zip(grads, node._input_metadata, strict=True)
                ]
                outs = node.apply(*grads)
                outs = outs if isinstance(outs, tuple) else (outs,)
                outs = [g for g, need in zip(outs, node.needs_input_grad, strict=False) if need]
                edges = tuple(e for e in edges if e[0] is not None)
            else:
                outs = node(*grads)
                outs = outs if isinstance(outs, tuple | list) else (outs,)
            del node, grads
            child = g = None
            for (child, slot), g in zip(edges, outs, strict=False):
                if child is None:
                    continue
                key = _node_key(child)
                buffer = buffers.get(key)
                if buffer is None:
                    buffer = buffers[key] = [None] * _node_inputs(child)
                if g is not None:
                    g = _as_input(g, child._input_metadata[slot])
                    buffer[slot] = g if buffer[slot] is None else buffer[slot] + g
                dependencies[key] -= 1
                if dependencies[key] == 0:
                    heapq.heappush(ready, (-child._sequence_nr(), next(order), child))
            del edges, outs, child, g


# ------------------------------------------------------------------------- the fake device
@contextmanager
def _fake_cuda(block: int) -> Iterator[LiveBytes]:
    """Fake CUDA tensors (no GPU, no memory) counted by a :class:`LiveBytes`."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with warnings.catch_warnings():
        # torch.autocast("cuda") warns without a GPU (the Γ-VAE turns it off around itself)
        warnings.simplefilter("ignore")
        with FakeTensorMode(allow_non_fake_inputs=True), LiveBytes(block) as live:
            yield live


@contextmanager
def _autocast(dtype: torch.dtype | None) -> Iterator[None]:
    """CUDA autocast at ``dtype`` (None: off), on where torch would refuse it without a GPU."""
    if dtype is None:
        yield
        return
    enabled, previous = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    torch.set_autocast_dtype("cuda", dtype)
    torch.set_autocast_enabled("cuda", True)
    torch.autocast_increment_nesting()
    try:
        yield
    finally:
        if torch.autocast_decrement_nesting() == 0:
            torch.clear_autocast_cache()
        torch.set_autocast_enabled("cuda", enabled)
        torch.set_autocast_dtype("cuda", previous)


def training_dtype(precision: str) -> torch.dtype | None:
    """The engine's autocast dtype on CUDA (``autocast_dtype``): bf16 unless fp16 or fp32."""
    return {"fp32": None, "fp16": torch.float16}.get(precision, torch.bfloat16)


def sampling_dtype(precision: str) -> torch.dtype | None:
    """``sample``'s autocast dtype on CUDA: bf16 for ``auto`` and ``bf16``, else fp32."""
    return torch.bfloat16 if precision in ("auto", "bf16") else None


def _on_device(module: nn.Module) -> nn.Module:
    """A module built on the meta device, with new (fake) CUDA tensors for its weights and
    buffers (``to_empty`` cannot swap tensors that the fake mode has seen)."""
    for sub in module.modules():
        for name, param in sub._parameters.items():
            if param is not None:
                empty = torch.empty_like(param, device="cuda")
                sub._parameters[name] = nn.Parameter(empty, requires_grad=param.requires_grad)
        for name, buffer in sub._buffers.items():
            if buffer is not None:
                sub._buffers[name] = torch.empty_like(buffer, device="cuda")
    return module


def _empty_copies(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.empty_like(t) for t in tensors]


@dataclass
class _Step:
    """How one kind of training step runs on the fake device."""

    build: Callable[[], nn.Module]  # the trainable network, on meta
    frozen: Callable[[], list[nn.Module]]  # frozen networks on the device, on meta
    loss: Callable[[nn.Module, list[nn.Module], int], torch.Tensor]  # under autocast
    # the periodic passes of the EMA network on the main rank (validation, previews): what
    # each is called in the messages, and the pass (fp32, no gradients, as the engine runs them)
    passes: list[tuple[str, Callable[[nn.Module, list[nn.Module]], None]]]


def _rounded(tensors: Iterator[torch.Tensor] | Sequence[torch.Tensor], block: int) -> int:
    return sum(-(-t.untyped_storage().nbytes() // block) * block for t in tensors)


def _training_estimate(
    step: _Step,
    dtype: torch.dtype | None,
    world_size: int,
    resuming: bool,
    block: int,
    workspace: int,
) -> MemoryEstimate:
    peaks: dict[int, int] = {}
    floors: list[tuple[int, str]] = []
    for batch in (1, 2):
        model, frozen = step.build(), step.frozen()  # on meta, outside the fake mode
        with _fake_cuda(block) as live:
            model = _on_device(model).train()
            frozen = [_on_device(m).eval().requires_grad_(False) for m in frozen]
            params = [p for p in model.parameters() if p.requires_grad]
            state = list(itertools.chain(model.parameters(), model.buffers()))
            kept = _empty_copies(state)  # the EMA copy
            kept += _empty_copies(params) + _empty_copies(params)  # AdamW's two moments
            if resuming:  # Trainer.fit keeps the loaded checkpoint's model and EMA tensors
                kept += _empty_copies(state) + _empty_copies(state)
            if world_size > 1:  # DDP's gradient buckets
                kept += _empty_copies(params)
            live.reset_peak()
            with _autocast(dtype):
                holder = [step.loss(model, frozen, batch)]
            fake_backward(holder)
            peaks[batch] = live.peak
            if batch == 2:
                # foreach AdamW: sqrt of the second moments, one more fp32 copy of the weights
                floors.append((live.current + _rounded(params, block), "AdamW's step"))
                model.eval()
                for note, run_pass in step.passes:  # the gradients are still allocated
                    live.reset_peak()
                    with torch.no_grad():
                        run_pass(model, frozen)
                    floors.append((live.peak, note))
            del model, frozen, params, state, kept
    per_sample = peaks[2] - peaks[1]
    floor, note = max(floors)
    return MemoryEstimate(peaks[1] - per_sample, per_sample, floor, workspace, note)


# --------------------------------------------------------------------------- diffusion models
def _labels(batch: int, size: int) -> torch.Tensor:
    return torch.zeros(batch, size, size, dtype=torch.long, device="cuda")


def _image(batch: int, size: int) -> torch.Tensor:
    return torch.empty(batch, 1, size, size, device="cuda")


def _classes(settings: DiffusionSettings, batch: int) -> dict[str, torch.Tensor]:
    if not settings.num_classes:
        return {}
    return {"class_labels": torch.zeros(batch, dtype=torch.long, device="cuda")}


def _model_space(frozen: list[nn.Module], image: torch.Tensor, labels: torch.Tensor):
    """DiffusionTask.to_model_space: pixels in [−1, 1], or the frozen Γ-VAE's latents."""
    from edmcli.data.labels import sector_mask

    if not frozen:
        return image * 2 - 1
    with torch.no_grad():
        return frozen[0].encode(image, sector_mask(labels))


def _sample_batch(
    net: nn.Module,
    frozen: list[nn.Module],
    settings: DiffusionSettings,
    batch: int,
    *,
    use_cache: bool = True,
    branches: int = 1,
) -> None:
    """What one batch of ``generate`` holds at its peak: the label maps, the γ/β cache (tiled for
    two guidance branches), the solver's state, one network evaluation, then the decoding."""
    from edmcli.data.labels import sector_mask

    labels = _labels(batch, settings.image_size)
    extra = _classes(settings, batch)
    if extra and branches == 2:
        extra["guidance"] = 2.0
    with torch.no_grad():
        cache = net.spade_cache(labels) if use_cache else None
        if cache is not None and branches == 2:
            cache = cache.tile(2)
        x = torch.empty(
            batch, settings.channels, settings.net_size, settings.net_size, device="cuda"
        )
        state = [torch.empty_like(x) for _ in range(3)]  # Heun: d, x_next, d_next
        sigma = torch.ones(batch, device="cuda")
        if cache is not None:
            out = net(x, sigma, spade_cache=cache, **extra)
        else:
            out = net(x, sigma, labels, **extra)
        del out, state
        if frozen:
            frozen[0].decode(x, sector_mask(labels), labels)


def _diffusion_step(settings: DiffusionSettings, vae: GammaVAEConfig | None) -> _Step:
    """DiffusionTask's training step, validation and preview, on the fake device."""
    from edmcli.data.labels import sector_mask
    from edmcli.models.registry import build_loss, loss_settings

    size = settings.image_size
    loss_fn = build_loss(
        settings.model, **loss_settings(settings.model, settings.precond), **settings.loss
    )

    def build() -> nn.Module:
        with torch.device("meta"):
            return build_network(settings)

    def frozen() -> list[nn.Module]:
        if vae is None:
            return []
        with torch.device("meta"):
            return [GammaVAE(vae)]

    def loss(model: nn.Module, nets: list[nn.Module], batch: int) -> torch.Tensor:
        image, labels = _image(batch, size), _labels(batch, size)
        y = _model_space(nets, image, labels)
        value, _ = loss_fn(model, y, labels, sector_mask(labels), **_classes(settings, batch))
        return value

    def validate(model: nn.Module, nets: list[nn.Module]) -> None:  # DiffusionTask.validate
        labels = _labels(VALIDATION_CHUNK, size)
        y = _model_space(nets, _image(VALIDATION_CHUNK, size), labels)
        sigma = torch.ones(VALIDATION_CHUNK, device="cuda")
        model(y + torch.randn_like(y), sigma, labels, **_classes(settings, VALIDATION_CHUNK))

    def preview(model: nn.Module, nets: list[nn.Module]) -> None:  # DiffusionTask.report
        _sample_batch(model, nets, settings, PREVIEW_CHUNK)

    passes = [
        (f"the validation pass ({VALIDATION_CHUNK} images at a time, fp32)", validate),
        (f"the sample previews ({PREVIEW_CHUNK} images at a time, fp32, SPADE γ/β cache)",
         preview),
    ]  # fmt: skip
    return _Step(build, frozen, loss, passes)


def _settings_key(settings: Any) -> str:
    return json.dumps(asdict(settings), sort_keys=True, default=str)


def diffusion_training_memory(
    settings: DiffusionSettings,
    vae: GammaVAEConfig | None = None,
    *,
    precision: str = "auto",
    world_size: int = 1,
    resuming: bool = False,
    block: int = CUDA_BLOCK,
    workspace: int = CUDA_WORKSPACE,
) -> MemoryEstimate:
    """Peak GPU memory of a ``train-diffusion`` step per GPU as a function of ``--batch-gpu``
    (module docstring): the network of ``settings``, the Γ-VAE ``vae`` of a latent model, the
    engine's autocast for ``precision`` on CUDA."""
    return _diffusion_training(
        _settings_key(settings), vae, precision, world_size, resuming, block, workspace,
        get_spade_backend(),
    )  # fmt: skip


@lru_cache(maxsize=16)
def _diffusion_training(key, vae, precision, world_size, resuming, block, workspace, _backend):
    step = _diffusion_step(DiffusionSettings(**json.loads(key)), vae)
    return _training_estimate(
        step, training_dtype(precision), world_size, resuming, block, workspace
    )


# ------------------------------------------------------------------------------ sampling
def sampling_memory(
    settings: DiffusionSettings,
    vae: GammaVAEConfig | None = None,
    *,
    precision: str = "auto",
    spade_cache: bool = True,
    branches: int = 1,
    block: int = CUDA_BLOCK,
    workspace: int = CUDA_WORKSPACE,
) -> MemoryEstimate:
    """Peak GPU memory of ``sample`` per GPU as a function of ``--batch`` (module docstring);
    ``branches`` 2: classifier-free guidance with both branches in one forward."""
    return _sampling(
        _settings_key(settings), vae, precision, spade_cache, branches, block, workspace,
        get_spade_backend(),
    )  # fmt: skip


@lru_cache(maxsize=16)
def _sampling(key, vae, precision, spade_cache, branches, block, workspace, _backend):
    settings = DiffusionSettings(**json.loads(key))
    peaks = {}
    for batch in (1, 2):
        with torch.device("meta"):  # outside the fake mode: construction may read values
            net = build_network(settings)
            frozen = [GammaVAE(vae)] if vae is not None else []
        with _fake_cuda(block) as live:
            net = _on_device(net).eval().requires_grad_(False)
            frozen = [_on_device(m).eval().requires_grad_(False) for m in frozen]
            live.reset_peak()
            with _autocast(sampling_dtype(precision)):
                _sample_batch(net, frozen, settings, batch, use_cache=spade_cache,
                              branches=branches)  # fmt: skip
            peaks[batch] = live.peak
            del net, frozen
    per_sample = peaks[2] - peaks[1]
    return MemoryEstimate(peaks[1] - per_sample, per_sample, 0, workspace)


# ------------------------------------------------------------------------------- the Γ-VAE
def _meta_perceptual(net: str) -> nn.Module | None:
    """:class:`~edmcli.models.perceptual.MaskedLPIPS` on the meta device without its ImageNet
    weights (their values do not matter here; the shapes and the forward do)."""
    if net == "none":
        return None
    import lpips

    from edmcli.models.perceptual import MaskedLPIPS

    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        model = lpips.LPIPS(pretrained=True, net=net, pnet_rand=True, spatial=True, verbose=False)
    module = MaskedLPIPS.__new__(MaskedLPIPS)
    nn.Module.__init__(module)
    module.backbone = net
    module.lpips = model
    return module.requires_grad_(False).train(False)


def vae_training_memory(
    settings: VAESettings,
    *,
    precision: str = "auto",
    world_size: int = 1,
    resuming: bool = False,
    block: int = CUDA_BLOCK,
    workspace: int = CUDA_WORKSPACE,
) -> MemoryEstimate:
    """Peak GPU memory of a ``train-vae`` step per GPU as a function of ``--batch-gpu``: the
    Γ-VAE and its loss with the perceptual term on (after its warm-up), under the engine's
    autocast; the floor adds the reconstruction grid of 8 images."""
    return _vae_training(
        _settings_key(settings), precision, world_size, resuming, block, workspace,
        get_spade_backend(),
    )  # fmt: skip


@lru_cache(maxsize=16)
def _vae_training(key, precision, world_size, resuming, block, workspace, _backend):
    from edmcli.models.vae_loss import GammaVAELoss

    settings = VAESettings(**json.loads(key))
    config = settings.model_config()
    size = settings.image_size

    def build() -> nn.Module:
        with torch.device("meta"):
            return GammaVAE(config)

    def frozen() -> list[nn.Module]:
        perceptual = _meta_perceptual(settings.perceptual)
        return [] if perceptual is None else [perceptual]

    def loss(model: nn.Module, nets: list[nn.Module], batch: int) -> torch.Tensor:
        loss_fn = GammaVAELoss(
            prior_shape=settings.prior_shape, prior_rate=settings.prior_rate,
            weights=settings.loss_weights(),
            kl_direction=settings.kl_direction, perceptual=nets[0] if nets else None,
            warmup_epochs=0,
        )  # fmt: skip
        image, labels = _image(batch, size), _labels(batch, size)
        sector = torch.ones_like(image)
        output = model(image, sector, sample=True, labels=labels)
        return loss_fn(image, sector, output, epoch=0)["total"]

    def grid(model: nn.Module, nets: list[nn.Module]) -> None:  # GammaVAETask.report
        image, labels = _image(PREVIEW_BATCH, size), _labels(PREVIEW_BATCH, size)
        model(image, torch.ones_like(image), sample=False, labels=labels)

    passes = [(f"the reconstruction grid of {PREVIEW_BATCH} images", grid)]
    step = _Step(build, frozen, loss, passes)
    return _training_estimate(
        step, training_dtype(precision), world_size, resuming, block, workspace
    )
