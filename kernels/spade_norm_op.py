"""The fused SPADE group normalisation as a differentiable ``torch.library`` custom op.

Public entry point: :func:`spade_group_norm`. It validates its arguments, then runs either

- the fused op ``torch.ops.echo_synth.spade_group_norm`` (Triton kernels of
  :mod:`kernels.spade_norm_triton`, forward and backward), or
- the torch reference :func:`kernels.reference.spade_group_norm_reference` (plain autograd).

Backend choice, read at every call: :func:`set_spade_backend` (or the :func:`spade_backend`
context manager) if set, else the environment variable ``ECHO_SYNTH_SPADE_BACKEND``, else
``"auto"``. ``"auto"`` takes the fused op for CUDA tensors when Triton is installed and the
reference otherwise; ``"triton"`` forces the fused op (CUDA tensors, or CPU tensors when
``TRITON_INTERPRET=1``, as the CPU tests do); ``"torch"`` forces the reference.

Under ``"auto"`` the fused path never crashes a run: if importing Triton or the kernel module,
compiling, or launching a kernel raises (an old Triton, no compiler for the card, a shape the
kernels refuse, a launch error), that call runs the op's torch formulation instead, one line is
logged (logger ``echo_synth_kernels``, level WARNING) naming the cause, and the process uses the
torch path from then on (``_fallback_cause`` records why). Forced ``"triton"`` raises instead.
Asynchronous CUDA faults (reported at a later synchronisation, with the CUDA context lost) cannot
be caught this way.

The interpreter mode is passed explicitly: the kernel module is imported once and
``spade_norm_triton.build(interpret)`` jits its device functions compiled or interpreted, so
``TRITON_INTERPRET`` is only read (here, at call time), never changed.

The custom ops carry fake (meta) implementations and an autograd registration, so
``torch.compile(fullgraph=True)`` traces through them without graph breaks. The forward op returns
``(y, mean, rstd)``; mean and rstd (N, G) are saved for the backward op, which returns
``[dx, dgamma]`` plus ``[dbeta]`` with SiLU (without SiLU dbeta is the incoming gradient itself,
so beta is neither saved nor read, and nothing is written for it). Each op runs the Triton
kernels on CUDA (and on CPU under the interpreter) and an equivalent torch formulation elsewhere,
so the op itself works on any device. Double backward is not supported by the fused op (the
reference supports it).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import math
import os
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Optional, TypeVar

import torch
from torch import Tensor

from .reference import acc_dtype, modulate, spade_group_norm_reference

if TYPE_CHECKING:  # the kernel module imports triton: only when a kernel first runs
    from .spade_norm_triton import SpadeNormKernels

__all__ = [
    "BACKENDS",
    "ENV_BACKEND",
    "TRITON_AVAILABLE",
    "get_spade_backend",
    "set_spade_backend",
    "spade_backend",
    "spade_group_norm",
    "spade_group_norm_backward_op",
    "spade_group_norm_op",
]

#: accepted backend names
BACKENDS: tuple[str, ...] = ("auto", "triton", "torch")
#: environment variable that selects the backend when :func:`set_spade_backend` has not
ENV_BACKEND = "ECHO_SYNTH_SPADE_BACKEND"
#: whether the ``triton`` package can be imported (it is not imported until a kernel runs)
TRITON_AVAILABLE: bool = importlib.util.find_spec("triton") is not None

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TRUTHY = ("1", "true", "on", "yes")  # what triton itself accepts for TRITON_INTERPRET
_backend_override: str | None = None


# ----------------------------------------------------------------------------------------------
# backend selection


def _check_backend(backend: str, source: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)}, got {backend!r}.")
    return backend


def set_spade_backend(backend: str | None) -> None:
    """Force the SPADE-norm backend for this process: ``"auto"``, ``"triton"``, ``"torch"``.

    ``None`` removes the override, so that ``ECHO_SYNTH_SPADE_BACKEND`` (default ``"auto"``)
    decides again.
    """
    global _backend_override
    _backend_override = None if backend is None else _check_backend(backend, "backend")


def get_spade_backend() -> str:
    """The backend in force: the :func:`set_spade_backend` override, else the environment."""
    if _backend_override is not None:
        return _backend_override
    return _check_backend(os.environ.get(ENV_BACKEND, "auto").strip().lower(), ENV_BACKEND)


@contextlib.contextmanager
def spade_backend(backend: str | None) -> Iterator[None]:
    """Context manager form of :func:`set_spade_backend`; restores the previous override."""
    previous = _backend_override
    set_spade_backend(backend)
    try:
        yield
    finally:
        set_spade_backend(previous)


def _interpret_requested() -> bool:
    """``TRITON_INTERPRET`` read here (not through ``triton.knobs``, which Triton 3.0-3.3 lack)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUTHY


#: device types on which ``auto`` takes the fused op (tests add "cpu", run by the interpreter)
_AUTO_DEVICES: tuple[str, ...] = ("cuda",)


def _use_fused(x: Tensor) -> bool:
    backend = get_spade_backend()
    if backend == "torch":
        return False
    if backend == "auto":
        return TRITON_AVAILABLE and _fallback_cause is None and x.device.type in _AUTO_DEVICES
    if not TRITON_AVAILABLE:
        raise RuntimeError("SPADE-norm backend 'triton' was forced but triton is not installed.")
    if x.device.type == "cuda" or (x.device.type == "cpu" and _interpret_requested()):
        return True
    raise RuntimeError(
        f"SPADE-norm backend 'triton' was forced for a {x.device.type} tensor: it needs CUDA "
        "tensors, or CPU tensors with TRITON_INTERPRET=1 (the Triton interpreter)."
    )


# ----------------------------------------------------------------------------------------------
# Triton kernels: a compiled and an interpreted set, built on first use

_KERNEL_MODULE = f"{__package__}.spade_norm_triton"
_kernel_sets: dict[bool, SpadeNormKernels] = {}
_kernel_lock = threading.Lock()


def _kernels(interpret: bool) -> SpadeNormKernels:
    """The kernels jitted for Triton's interpreter (``interpret``) or compiled for CUDA.

    The mode is passed to the kernel module's ``build`` explicitly: ``TRITON_INTERPRET`` is
    neither read by nor changed for it, and the module is imported (with triton) once.
    """
    with _kernel_lock:
        kernels = _kernel_sets.get(interpret)
        if kernels is None:
            kernels = importlib.import_module(_KERNEL_MODULE).build(interpret)
            _kernel_sets[interpret] = kernels
        return kernels


def _kernel_mode(device: torch.device) -> bool | None:
    """Which kernels run on ``device`` in this process (True: interpreted, False: compiled),
    or None where none can (the torch formulation runs)."""
    if not TRITON_AVAILABLE:
        return None
    if device.type == "cuda":
        return _interpret_requested()
    if device.type == "cpu" and _interpret_requested():
        return True
    return None


def _device_guard(x: Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it x's."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------
# fallback: a failure of the fused kernels under "auto" switches this process to torch

_logger = logging.getLogger("echo_synth_kernels")
#: why the fused kernels were given up in this process ("ExceptionType: message"), or None
_fallback_cause: str | None = None
_T = TypeVar("_T")


def _describe(exc: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message`` (at most ``limit`` characters)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _fall_back(exc: BaseException, what: str) -> None:
    """Give up the fused kernels for the rest of the process; log one line, the first time."""
    global _fallback_cause
    with _kernel_lock:
        if _fallback_cause is not None:
            return
        _fallback_cause = _describe(exc)
    _logger.warning(
        "echo_synth_kernels: the fused Triton SPADE norm failed (%s, %s); using the torch "
        "implementation for the rest of this process (ECHO_SYNTH_SPADE_BACKEND=triton raises "
        "instead).",
        what,
        _fallback_cause,
    )


def _run_fused(
    x: Tensor,
    what: str,
    fused: Callable[[SpadeNormKernels], _T],
    torch_path: Callable[[], _T],
) -> _T:
    """``fused(kernels)`` where the kernels can run on x's device, else ``torch_path()``.

    Unless the backend ``"triton"`` is forced, any exception from importing, building,
    compiling or launching the kernels runs ``torch_path()`` instead and switches the process
    to torch (:func:`_fall_back`); forced, it propagates. Out of GPU memory is not a kernel
    failure (the torch path needs more): it propagates and changes nothing.
    """
    strict = get_spade_backend() == "triton"
    interpret = _kernel_mode(x.device)
    if interpret is None or (_fallback_cause is not None and not strict):
        return torch_path()
    try:
        kernels = _kernels(interpret)
        with _device_guard(x):
            return fused(kernels)
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as exc:
        if strict:
            raise
        _fall_back(exc, what)
        return torch_path()


# ----------------------------------------------------------------------------------------------
# torch formulation of the op (devices without kernels); same maths as the Triton kernels, the
# modulation step shared with the reference


def _forward_torch(
    x: Tensor, gamma: Tensor, beta: Tensor, num_groups: int, eps: float, silu: bool
) -> tuple[Tensor, Tensor, Tensor]:
    acc = acc_dtype(x.dtype)
    xg = x.to(acc).reshape(x.shape[0], num_groups, -1)
    var, mean = torch.var_mean(xg, dim=-1, correction=0)
    rstd = torch.rsqrt(var + eps)
    x_hat = ((xg - mean[..., None]) * rstd[..., None]).reshape(x.shape)
    y = modulate(x_hat, gamma, beta, silu)
    return y.to(x.dtype).contiguous(), mean, rstd


def _backward_torch(
    dy: Tensor,
    x: Tensor,
    gamma: Tensor,
    beta: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    num_groups: int,
    silu: bool,
) -> list[Tensor]:
    acc = acc_dtype(x.dtype)
    shape = (x.shape[0], num_groups, -1)
    mean, rstd = mean.to(acc)[..., None], rstd.to(acc)[..., None]
    x_hat = (x.to(acc).reshape(shape) - mean) * rstd
    g1 = 1.0 + gamma.to(acc).reshape(shape)
    du = dy.to(acc).reshape(shape)
    if silu:
        u = x_hat * g1 + beta.to(acc).reshape(shape)
        s = torch.sigmoid(u)
        du = du * s * (1.0 + u * (1.0 - s))
    dx_hat = du * g1
    dx = rstd * (
        dx_hat - dx_hat.mean(-1, keepdim=True) - x_hat * (dx_hat * x_hat).mean(-1, keepdim=True)
    )
    grads = [
        dx.reshape(x.shape).to(x.dtype).contiguous(),
        (du * x_hat).reshape(x.shape).to(gamma.dtype).contiguous(),
    ]
    if silu:
        grads.append(du.reshape(x.shape).to(beta.dtype, copy=True).contiguous())
    return grads


# ----------------------------------------------------------------------------------------------
# custom ops


@torch.library.custom_op("echo_synth::spade_group_norm", mutates_args=())
def spade_group_norm_op(
    x: Tensor, gamma: Tensor, beta: Tensor, num_groups: int, eps: float, silu: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Fused forward: ``(y, mean, rstd)``, y in x's dtype (NCHW), mean/rstd (N, G) in fp32
    (fp64 for fp64 x). Arguments must be valid (see :func:`spade_group_norm`)."""
    return _run_fused(
        x,
        "forward",
        lambda kernels: kernels.forward(x, gamma, beta, num_groups, eps, silu),
        lambda: _forward_torch(x, gamma, beta, num_groups, eps, silu),
    )


@spade_group_norm_op.register_fake
def _spade_group_norm_fake(
    x: Tensor, gamma: Tensor, beta: Tensor, num_groups: int, eps: float, silu: bool
) -> tuple[Tensor, Tensor, Tensor]:
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    mean = x.new_empty((x.shape[0], num_groups), dtype=acc_dtype(x.dtype))
    return y, mean, torch.empty_like(mean)


@torch.library.custom_op("echo_synth::spade_group_norm_backward", mutates_args=())
def spade_group_norm_backward_op(
    dy: Tensor,
    x: Tensor,
    gamma: Tensor,
    beta: Optional[Tensor],  # noqa: UP045 (the schema inference of torch.library wants Optional)
    mean: Tensor,
    rstd: Tensor,
    num_groups: int,
    silu: bool,
) -> list[Tensor]:
    """Fused backward: ``[dx, dgamma]`` plus ``[dbeta]`` when ``silu``, in the dtypes of x,
    gamma, beta (NCHW). Without SiLU dbeta is dy itself: it is not computed and ``beta`` may be
    None (the forward then does not keep beta alive)."""
    if silu and beta is None:
        raise ValueError("spade_group_norm_backward needs beta when silu is True.")
    return _run_fused(
        x,
        "backward",
        lambda kernels: kernels.backward(dy, x, gamma, beta, mean, rstd, num_groups, silu),
        lambda: _backward_torch(dy, x, gamma, beta, mean, rstd, num_groups, silu),
    )


@spade_group_norm_backward_op.register_fake
def _spade_group_norm_backward_fake(
    dy: Tensor,
    x: Tensor,
    gamma: Tensor,
    beta: Optional[Tensor],  # noqa: UP045
    mean: Tensor,
    rstd: Tensor,
    num_groups: int,
    silu: bool,
) -> list[Tensor]:
    fmt = torch.contiguous_format
    grads = [torch.empty_like(x, memory_format=fmt), torch.empty_like(gamma, memory_format=fmt)]
    if silu:
        grads.append(torch.empty_like(beta, memory_format=fmt))
    return grads


def _setup_context(ctx, inputs, output) -> None:
    x, gamma, beta, num_groups, _eps, silu = inputs
    _y, mean, rstd = output
    # Without SiLU the backward does not need beta: do not keep it alive.
    ctx.save_for_backward(x, gamma, beta if silu else None, mean, rstd)
    ctx.num_groups = num_groups
    ctx.silu = silu
    ctx.beta_dtype = beta.dtype
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, dy: Tensor, _dmean: Tensor, _drstd: Tensor):
    x, gamma, beta, mean, rstd = ctx.saved_tensors
    grads = spade_group_norm_backward_op(dy, x, gamma, beta, mean, rstd, ctx.num_groups, ctx.silu)
    dbeta = grads[2] if ctx.silu else dy.to(ctx.beta_dtype)
    return grads[0], grads[1], dbeta, None, None, None


spade_group_norm_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# public API


def _validate(x: object, gamma: object, beta: object, num_groups: object, eps: object) -> None:
    for name, t in (("x", x), ("gamma", gamma), ("beta", beta)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}.")
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(
                f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}."
            )
    if x.ndim != 4:
        raise ValueError(f"x must have shape (N, C, H, W), got {tuple(x.shape)}.")
    if gamma.shape != x.shape or beta.shape != x.shape:
        raise ValueError(
            f"gamma {tuple(gamma.shape)} and beta {tuple(beta.shape)} must have x's shape "
            f"{tuple(x.shape)}."
        )
    if gamma.device != x.device or beta.device != x.device:
        raise ValueError(
            f"x, gamma and beta must be on one device, got {x.device}, {gamma.device}, "
            f"{beta.device}."
        )
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"num_groups must be a positive int, got {num_groups!r}.")
    if x.shape[2] * x.shape[3] == 0:
        raise ValueError(f"x must have a non-empty spatial size, got {tuple(x.shape)}.")
    if x.shape[1] % num_groups:
        raise ValueError(f"num_groups={num_groups} must divide the {x.shape[1]} channels of x.")
    if not isinstance(eps, (int, float)) or not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a positive finite number, got {eps!r}.")


def spade_group_norm(
    x: Tensor,
    gamma: Tensor,
    beta: Tensor,
    num_groups: int,
    eps: float = 1e-5,
    silu: bool = False,
) -> Tensor:
    """SPADE group normalisation ``y = GroupNorm(x)·(1+γ)+β`` (then SiLU if ``silu``).

    Args:
        x: activations (N, C, H, W), float16/bfloat16/float32/float64.
        gamma: spatial scale (N, C, H, W), any of those float dtypes.
        beta: spatial shift (N, C, H, W), any of those float dtypes.
        num_groups: number of groups G (affine-free group norm); must divide C.
        eps: added to the group variance.
        silu: apply SiLU to the modulated output.

    Returns:
        y with x's shape and dtype, differentiable w.r.t. x, gamma and beta. Statistics are
        accumulated in fp32 (fp64 for fp64 input on the fused path). The fused path returns a
        contiguous NCHW tensor.

    Raises:
        ValueError: bad shapes, dtypes, devices, ``num_groups`` or ``eps``.
        RuntimeError: backend ``"triton"`` forced where the kernels cannot run.
    """
    _validate(x, gamma, beta, num_groups, eps)
    if x.numel() > 0 and _use_fused(x):
        return spade_group_norm_op(x, gamma, beta, num_groups, float(eps), bool(silu))[0]
    return spade_group_norm_reference(x, gamma, beta, num_groups, eps=eps, silu=silu)
