"""Triton kernels of the fused SPADE group normalisation (forward and backward).

For x, gamma, beta of shape (N, C, H, W), contiguous NCHW, G groups of C/G channels:

    x̂ = (x - μ_ng) · rstd_ng,   u = x̂ · (1 + γ) + β,   y = u  or  y = silu(u),

with μ_ng and rstd_ng = 1/sqrt(var_ng + eps) the (biased) statistics of group g of sample n.
In NCHW a group is one contiguous run of L = (C/G)·H·W elements, and γ/β are full tensors (no
per-channel parameters), so every kernel works on flat per-group ranges.

Three launch shapes, chosen per call from the group size L and the number of groups N·G:

- L <= 8192, 4096 for fp64 (the UNets' deeper levels): ``_fwd_single_kernel`` /
  ``_bwd_single_kernel``, one program per group holding it in registers (16 elements a thread);
  one launch per pass, every tensor moved once (:func:`single_config`).
- otherwise the group is cut into tiles of BLOCK elements and ``split`` programs share it
  (program k takes tiles k, k + split, …), enough to fill the GPU even at batch 1 and with at
  most 8 tiles each (:func:`launch_config`). split = 1: ``_fwd_rows_kernel`` /
  ``_bwd_rows_kernel``, one launch, each program loops over its group twice (the second loop
  often hits L2). split > 1: two launches per pass:

forward   1. ``_fwd_stats_kernel``  grid (N·G, split): each lane accumulates Σ(x−K) and Σ(x−K)²
             around its own first element K (no barrier in the loop, no cancellation when
             |μ| ≫ σ); lanes are merged with Chan's formula into the program's (count, mean, M2),
             the mean taken relative to the group's first element.
          2. ``_fwd_apply_kernel``  grid (N·G, split): merges the group's partials (Chan again),
             program k = 0 stores μ and rstd for the backward, every program writes its y tiles.
backward  1. ``_bwd_reduce_kernel`` grid (N·G, split): du = dy · silu'(u) (u recomputed from
             x, γ, β), dγ = du · x̂, dβ = du (SiLU only: without it dβ = dy), and partial sums
             of dx̂ = du · (1 + γ) and of dx̂ · x̂.
          2. ``_bwd_apply_kernel``  grid (N·G, split):
             dx = rstd · (dx̂ − mean(dx̂) − x̂ · mean(dx̂ · x̂)).

Loads are converted to the accumulation type ACC (fp32; fp64 for fp64 inputs) and each result is
rounded once to its output's dtype. Memory traffic in tensor passes (single / rows and split):
forward 4 / 5 (the looping kernels read x twice), backward 5 / 8 without SiLU (dβ = dy is not
written) and 7 / 11 with SiLU (β is read to recompute u). The kernels use Triton builtins only
(no ``tl.sum``/``tl.zeros``, see ``_sum``), so that interpreted kernels also run in a process
that imported triton before setting ``TRITON_INTERPRET``.

The functions below are plain Python marked ``@_device``; nothing is jitted at import, whatever
``TRITON_INTERPRET`` says. :func:`build` (``interpret`` passed explicitly) gives a
:class:`SpadeNormKernels`: every device function cloned into a namespace of its own and wrapped
as a compiled ``triton.runtime.jit.JITFunction`` or, for ``interpret=True``, as the interpreter's
``triton.runtime.interpreter.InterpretedFunction`` (both exist since Triton 3.0), so compiled and
interpreted kernels live side by side in one process. :meth:`SpadeNormKernels.compile` builds
one launch variant for a CUDA architecture without a GPU (triton ships ptxas), and
:func:`launch_variants` lists the variants the launchers pick for given shapes, so CPU-only CI
can check every variant the runtime would run (``kernels.ptxas_check``).
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple, TypeVar

import torch
import triton
import triton.language as tl

from .reference import acc_dtype

_MAX_BLOCK = 2048  # elements per tile: 8 per thread at 8 warps = one 16-byte load of bf16
_MIN_BLOCK = 512
_MAX_SPLIT = 256  # programs per group; the apply kernels merge this many partials
_PROGRAMS_PER_SM = 8  # grid size target: 64 warps per SM (about 1.3 waves at 40 registers)
_MAX_TILES_PER_PROGRAM = 8  # short programs: many waves, so little tail at the end
_MAX_INDEX = 2**31 - 1 - _MAX_BLOCK  # in-group offsets are int32
# Groups up to _SINGLE_MAX elements take the one-program-per-group kernels, 16 elements a thread
# (num_warps = BLOCK / 512, so 16 warps at 8192): at 512 threads ptxas may give a thread 128
# registers, which the fp32 backward fits (<= 101 on sm_80-sm_90, docs/kernels-ptxas.md) but the
# fp64 backward does not (it spills), so fp64 groups take them up to _SINGLE_MAX_FP64 only.
_SINGLE_MAX = 8192
_SINGLE_MAX_FP64 = 4096

_F = TypeVar("_F", bound=Callable[..., Any])
#: the device functions (kernels and the helpers they call) by name, in definition order
_DEVICE_FUNCTIONS: dict[str, Callable[..., Any]] = {}


def _device(fn: _F) -> _F:
    """Mark ``fn`` as Triton device code; :func:`build` jits it (compiled or interpreted)."""
    _DEVICE_FUNCTIONS[fn.__name__] = fn
    return fn


# ----------------------------------------------------------------------------------------------
# building blocks (inlined into the kernels)


@_device
def _add(a, b):
    return a + b


# tl.sum and tl.zeros are @triton.jit functions of triton.language, compiled or interpreted as
# TRITON_INTERPRET was when *triton* was imported, so an interpreted kernel cannot call them in a
# process that imported triton first. Builtins (tl.reduce, tl.full) work in both modes, so the
# kernels use only builtins; the interpreter recognises tl.sum's combine function (numpy sum).
# :func:`build` binds ``_SUM_COMBINE`` per namespace (``_add`` of that namespace if triton has
# no ``_sum_combine``).


@_device
def _sum(v):
    return tl.reduce(v, 0, _SUM_COMBINE)  # noqa: F821 (bound by build())


@_device
def _stats_tiles(x_ptr, base, L, k, num_tiles, split, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """``(count, mean − ref, M2, ref)`` of tiles k, k + split, … of the group at ``base``;
    ref is the group's first element.

    Each lane sums (x − K) and (x − K)² around K, its element in the first tile: no barrier in
    the loop, no cancellation when |mean| ≫ std. Lanes are merged with Chan's formula, means
    relative to ref so that the merge subtracts small numbers only.
    """
    lanes = tl.arange(0, BLOCK)
    ref = tl.load(x_ptr + base).to(ACC)
    first = k * BLOCK + lanes
    shift = tl.load(x_ptr + base + first, mask=first < L, other=0.0).to(ACC)
    s1 = tl.full([BLOCK], 0.0, ACC)
    s2 = tl.full([BLOCK], 0.0, ACC)
    for t in range(k, num_tiles, split):
        offs = t * BLOCK + lanes
        mask = offs < L
        v = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(ACC)
        d = tl.where(mask, v - shift, 0.0)
        s1 += d
        s2 += d * d
    # a lane saw one element per tile, except in the group's ragged last tile
    last = num_tiles - 1
    ragged = ((last - k) % split == 0) & (lanes >= L - last * BLOCK)
    n = ((num_tiles - k + split - 1) // split - ragged.to(tl.int32)).to(ACC)
    n_safe = tl.where(n > 0, n, 1.0)
    lane_mean = (shift - ref) + s1 / n_safe
    lane_m2 = tl.maximum(s2 - s1 * s1 / n_safe, 0.0)
    count = _sum(n)
    mean_rel = _sum(n * lane_mean) / count
    dm = lane_mean - mean_rel
    m2 = _sum(lane_m2 + n * dm * dm)
    return count, mean_rel, m2, ref


@_device
def _normalize_tiles(
    x_ptr,
    g_ptr,
    b_ptr,
    y_ptr,
    base,
    L,
    k,
    num_tiles,
    split,
    ref,
    mean_rel,
    rstd,
    BLOCK: tl.constexpr,
    SILU: tl.constexpr,
    ACC: tl.constexpr,
):
    """y = x̂ · (1 + γ) + β (then SiLU) on tiles k, k + split, … of one group."""
    lanes = tl.arange(0, BLOCK)
    for t in range(k, num_tiles, split):
        offs = t * BLOCK + lanes
        mask = offs < L
        v = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(ACC)
        g = tl.load(g_ptr + base + offs, mask=mask, other=0.0).to(ACC)
        b = tl.load(b_ptr + base + offs, mask=mask, other=0.0).to(ACC)
        u = ((v - ref) - mean_rel) * rstd * (1.0 + g) + b
        if SILU:
            u = u / (1.0 + tl.exp(-u))
        tl.store(y_ptr + base + offs, u.to(y_ptr.dtype.element_ty), mask=mask)


@_device
def _grad_preact(dy, v, g, b, mean, rstd, SILU: tl.constexpr):
    """x̂ and du = dL/du (u = x̂(1+γ)+β, recomputed for the SiLU derivative)."""
    xhat = (v - mean) * rstd
    if SILU:
        u = xhat * (1.0 + g) + b
        s = 1.0 / (1.0 + tl.exp(-u))
        du = dy * s * (1.0 + u * (1.0 - s))
    else:
        du = dy
    return xhat, du


@_device
def _load_grad_inputs(
    dy_ptr, x_ptr, g_ptr, b_ptr, offs, mask, SILU: tl.constexpr, ACC: tl.constexpr
):
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
    v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC)
    if SILU:
        b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(ACC)
    else:
        b = g  # unused without SiLU (beta is None)
    return dy, v, g, b


@_device
def _grad_sums_tiles(
    dy_ptr,
    x_ptr,
    g_ptr,
    b_ptr,
    dg_ptr,
    db_ptr,
    base,
    L,
    k,
    num_tiles,
    split,
    mean,
    rstd,
    BLOCK: tl.constexpr,
    SILU: tl.constexpr,
    ACC: tl.constexpr,
):
    """Writes dγ = du · x̂ (and dβ = du with SiLU) and returns Σ dx̂ and Σ dx̂ · x̂ over tiles
    k, k + split, … of one group (dx̂ = du · (1 + γ))."""
    lanes = tl.arange(0, BLOCK)
    acc_a = tl.full([BLOCK], 0.0, ACC)
    acc_b = tl.full([BLOCK], 0.0, ACC)
    for t in range(k, num_tiles, split):
        offs = t * BLOCK + lanes
        mask = offs < L
        dy, v, g, b = _load_grad_inputs(dy_ptr, x_ptr, g_ptr, b_ptr, base + offs, mask, SILU, ACC)
        xhat, du = _grad_preact(dy, v, g, b, mean, rstd, SILU)
        dxhat = du * (1.0 + g)
        acc_a += dxhat
        acc_b += dxhat * xhat
        tl.store(dg_ptr + base + offs, (du * xhat).to(dg_ptr.dtype.element_ty), mask=mask)
        if SILU:  # without SiLU dbeta is dy itself: the caller uses dy
            tl.store(db_ptr + base + offs, du.to(db_ptr.dtype.element_ty), mask=mask)
    return _sum(acc_a), _sum(acc_b)


@_device
def _grad_x_tiles(
    dy_ptr,
    x_ptr,
    g_ptr,
    b_ptr,
    dx_ptr,
    base,
    L,
    k,
    num_tiles,
    split,
    mean,
    rstd,
    c_a,
    c_b,
    BLOCK: tl.constexpr,
    SILU: tl.constexpr,
    ACC: tl.constexpr,
):
    """dx = rstd · (dx̂ − c_a − x̂ · c_b) on tiles k, k + split, … of one group."""
    lanes = tl.arange(0, BLOCK)
    for t in range(k, num_tiles, split):
        offs = t * BLOCK + lanes
        mask = offs < L
        dy, v, g, b = _load_grad_inputs(dy_ptr, x_ptr, g_ptr, b_ptr, base + offs, mask, SILU, ACC)
        xhat, du = _grad_preact(dy, v, g, b, mean, rstd, SILU)
        dx = (du * (1.0 + g) - c_a - xhat * c_b) * rstd
        tl.store(dx_ptr + base + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# kernels: one program per group, whole group in registers (L <= BLOCK <= 8192)


@_device
def _fwd_single_kernel(
    x_ptr,
    g_ptr,
    b_ptr,
    y_ptr,
    mean_ptr,
    rstd_ptr,
    L,
    eps,
    BLOCK: tl.constexpr,
    SILU: tl.constexpr,
    ACC: tl.constexpr,
):
    ng = tl.program_id(0)
    base = ng.to(tl.int64) * L
    offs = tl.arange(0, BLOCK)
    mask = offs < L
    v = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(ACC)
    ref = tl.load(x_ptr + base).to(ACC)  # shift: the sums stay exact-ish when |mean| >> std
    v = tl.where(mask, v - ref, 0.0)
    mean_rel = _sum(v) / L
    d = tl.where(mask, v - mean_rel, 0.0)
    rstd = 1.0 / tl.sqrt(_sum(d * d) / L + eps)
    tl.store(mean_ptr + ng, ref + mean_rel)
    tl.store(rstd_ptr + ng, rstd)
    g = tl.load(g_ptr + base + offs, mask=mask, other=0.0).to(ACC)
    b = tl.load(b_ptr + base + offs, mask=mask, other=0.0).to(ACC)
    u = d * rstd * (1.0 + g) + b
    if SILU:
        u = u / (1.0 + tl.exp(-u))
    tl.store(y_ptr + base + offs, u.to(y_ptr.dtype.element_ty), mask=mask)


@_device
def _bwd_single_kernel(
    dy_ptr,
    x_ptr,
    g_ptr,
    b_ptr,
    mean_ptr,
    rstd_ptr,
    dx_ptr,
    dg_ptr,
    db_ptr,
    L,
    BLOCK: tl.constexpr,
    SILU: tl.constexpr,
    ACC: tl.constexpr,
):
    ng = tl.program_id(0)
    mean = tl.load(mean_ptr + ng).to(ACC)
    rstd = tl.load(rstd_ptr + ng).to(ACC)
    base = ng.to(tl.int64) * L
    offs = tl.arange(0, BLOCK)
    mask = offs < L
    dy, v, g, b = _load_grad_inputs(dy_ptr, x_ptr, g_ptr, b_ptr, base + offs, mask, SILU, ACC)
    xhat, du = _grad_preact(dy, v, g, b, mean, rstd, SILU)
    dxhat = du * (1.0 + g)
    c_a = _sum(dxhat) / L
    c_b = _sum(dxhat * xhat) / L
    dx = (dxhat - c_a - xhat * c_b) * rstd
    tl.store(dx_ptr + base + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dg_ptr + base + offs, (du * xhat).to(dg_ptr.dtype.element_ty), mask=mask)
    if SILU:
        tl.store(db_ptr + base + offs, du.to(db_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# kernels: one program per group looping over its tiles twice (enough groups to fill the GPU;
# the second pass over a group often hits L2)


@_device
def _fwd_rows_kernel(
    x_ptr,
    g_ptr,
    b_ptr,
    y_ptr,
    mean_ptr,
    rstd_ptr,
    L,
    num_tiles,
    eps,
    BLOCK: tl.constexpr,
    SILU: tl.constexpr,
    ACC: tl.constexpr,
):
    ng = tl.program_id(0)
    base = ng.to(tl.int64) * L
    count, mean_rel, m2, ref = _stats_tiles(x_ptr, base, L, 0, num_tiles, 1, BLOCK, ACC)
    rstd = 1.0 / tl.sqrt(m2 / count + eps)
    tl.store(mean_ptr + ng, ref + mean_rel)
    tl.store(rstd_ptr + ng, rstd)
    _normalize_tiles(
        x_ptr, g_ptr, b_ptr, y_ptr, base, L, 0, num_tiles, 1, ref, mean_rel, rstd, BLOCK, SILU, ACC
    )


@_device
def _bwd_rows_kernel(
    dy_ptr,
    x_ptr,
    g_ptr,
    b_ptr,
    mean_ptr,
    rstd_ptr,
    dx_ptr,
    dg_ptr,
    db_ptr,
    L,
    num_tiles,
    BLOCK: tl.constexpr,
    SILU: tl.constexpr,
    ACC: tl.constexpr,
):
    ng = tl.program_id(0)
    mean = tl.load(mean_ptr + ng).to(ACC)
    rstd = tl.load(rstd_ptr + ng).to(ACC)
    base = ng.to(tl.int64) * L
    sum_a, sum_b = _grad_sums_tiles(
        dy_ptr, x_ptr, g_ptr, b_ptr, dg_ptr, db_ptr, base, L, 0, num_tiles, 1, mean, rstd,
        BLOCK, SILU, ACC,
    )  # fmt: skip
    _grad_x_tiles(
        dy_ptr, x_ptr, g_ptr, b_ptr, dx_ptr, base, L, 0, num_tiles, 1, mean, rstd, sum_a / L,
        sum_b / L, BLOCK, SILU, ACC,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# kernels: ``split`` programs per group, two launches per pass (small batches of large groups)


@_device
def _fwd_stats_kernel(
    x_ptr, part_ptr, L, num_tiles, split, part_stride, BLOCK: tl.constexpr, ACC: tl.constexpr
):
    ng = tl.program_id(0)
    k = tl.program_id(1)
    base = ng.to(tl.int64) * L
    count, mean_rel, m2, _ = _stats_tiles(x_ptr, base, L, k, num_tiles, split, BLOCK, ACC)
    idx = ng * split + k
    tl.store(part_ptr + idx, count)
    tl.store(part_ptr + part_stride + idx, mean_rel)
    tl.store(part_ptr + 2 * part_stride + idx, m2)


@_device
def _fwd_apply_kernel(
    x_ptr,
    g_ptr,
    b_ptr,
    y_ptr,
    part_ptr,
    mean_ptr,
    rstd_ptr,
    L,
    num_tiles,
    split,
    part_stride,
    eps,
    BLOCK: tl.constexpr,
    SPLIT_P2: tl.constexpr,
    SILU: tl.constexpr,
    ACC: tl.constexpr,
):
    ng = tl.program_id(0)
    k = tl.program_id(1)
    base = ng.to(tl.int64) * L
    ref = tl.load(x_ptr + base).to(ACC)  # the partial means are relative to it
    # merge the group's partials (Chan's formula)
    j = tl.arange(0, SPLIT_P2)
    valid = j < split
    idx = ng * split + j
    cnt = tl.load(part_ptr + idx, mask=valid, other=0.0)
    mu = tl.load(part_ptr + part_stride + idx, mask=valid, other=0.0)
    m2 = tl.load(part_ptr + 2 * part_stride + idx, mask=valid, other=0.0)
    n = _sum(cnt)
    mean_rel = _sum(cnt * mu) / n
    dm = mu - mean_rel
    rstd = 1.0 / tl.sqrt((_sum(m2) + _sum(cnt * dm * dm)) / n + eps)
    if k == 0:
        tl.store(mean_ptr + ng, ref + mean_rel)
        tl.store(rstd_ptr + ng, rstd)
    _normalize_tiles(
        x_ptr, g_ptr, b_ptr, y_ptr, base, L, k, num_tiles, split, ref, mean_rel, rstd, BLOCK,
        SILU, ACC,
    )  # fmt: skip


@_device
def _bwd_reduce_kernel(
    dy_ptr,
    x_ptr,
    g_ptr,
    b_ptr,
    mean_ptr,
    rstd_ptr,
    dg_ptr,
    db_ptr,
    part_ptr,
    L,
    num_tiles,
    split,
    part_stride,
    BLOCK: tl.constexpr,
    SILU: tl.constexpr,
    ACC: tl.constexpr,
):
    ng = tl.program_id(0)
    k = tl.program_id(1)
    mean = tl.load(mean_ptr + ng).to(ACC)
    rstd = tl.load(rstd_ptr + ng).to(ACC)
    base = ng.to(tl.int64) * L
    sum_a, sum_b = _grad_sums_tiles(
        dy_ptr, x_ptr, g_ptr, b_ptr, dg_ptr, db_ptr, base, L, k, num_tiles, split, mean, rstd,
        BLOCK, SILU, ACC,
    )  # fmt: skip
    idx = ng * split + k
    tl.store(part_ptr + idx, sum_a)
    tl.store(part_ptr + part_stride + idx, sum_b)


@_device
def _bwd_apply_kernel(
    dy_ptr,
    x_ptr,
    g_ptr,
    b_ptr,
    mean_ptr,
    rstd_ptr,
    dx_ptr,
    part_ptr,
    L,
    num_tiles,
    split,
    part_stride,
    BLOCK: tl.constexpr,
    SPLIT_P2: tl.constexpr,
    SILU: tl.constexpr,
    ACC: tl.constexpr,
):
    ng = tl.program_id(0)
    k = tl.program_id(1)
    mean = tl.load(mean_ptr + ng).to(ACC)
    rstd = tl.load(rstd_ptr + ng).to(ACC)
    j = tl.arange(0, SPLIT_P2)
    valid = j < split
    sum_a = _sum(tl.load(part_ptr + ng * split + j, mask=valid, other=0.0))
    sum_b = _sum(tl.load(part_ptr + part_stride + ng * split + j, mask=valid, other=0.0))
    base = ng.to(tl.int64) * L
    _grad_x_tiles(
        dy_ptr, x_ptr, g_ptr, b_ptr, dx_ptr, base, L, k, num_tiles, split, mean, rstd, sum_a / L,
        sum_b / L, BLOCK, SILU, ACC,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# jitting: one namespace per mode


def _clone(fn: Callable[..., Any], namespace: dict[str, Any]) -> types.FunctionType:
    """``fn`` with ``namespace`` as its globals (same code, so same source for Triton).

    ``tl.constexpr`` annotations (strings here: ``from __future__ import annotations``) become
    the ``tl.constexpr`` class itself: Triton 3.0's interpreter only recognises that form.
    """
    clone = types.FunctionType(fn.__code__, namespace, fn.__name__, fn.__defaults__, fn.__closure__)
    clone.__kwdefaults__ = fn.__kwdefaults__
    clone.__annotations__ = {
        name: tl.constexpr if ann in ("tl.constexpr", "constexpr") else ann
        for name, ann in fn.__annotations__.items()
    }
    clone.__doc__, clone.__module__, clone.__qualname__ = fn.__doc__, fn.__module__, fn.__qualname__
    return clone


def _jitted_namespace(interpret: bool) -> dict[str, Any]:
    """This module's globals with every device function jitted in the wanted mode.

    A kernel finds the helpers it calls in its globals: compiled kernels must see compiled
    helpers and interpreted kernels interpreted ones, so each mode gets its own namespace (the
    interpreter also adds names of its own to it).
    """
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction as wrap
    else:
        from triton.runtime.jit import JITFunction as wrap
    namespace = dict(globals())
    for name, fn in _DEVICE_FUNCTIONS.items():
        namespace[name] = wrap(_clone(fn, namespace))
    # tl.sum's combine function (the interpreter recognises it), as long as it is of the wanted
    # kind: triton.language jits it as TRITON_INTERPRET was when triton was imported
    combine = getattr(tl.standard, "_sum_combine", None)
    if combine is None or not (interpret or isinstance(combine, wrap)):
        combine = namespace["_add"]
    namespace["_SUM_COMBINE"] = combine
    return namespace


#: names of the kernels (launched from the host), in definition order
KERNEL_NAMES: tuple[str, ...] = tuple(n for n in _DEVICE_FUNCTIONS if n.endswith("_kernel"))


# ----------------------------------------------------------------------------------------------
# launch heuristics


@functools.lru_cache(maxsize=16)
def _sm_count(device_type: str, index: int | None) -> int:
    if device_type == "cuda":
        return torch.cuda.get_device_properties(index).multi_processor_count
    return 1  # the interpreter runs programs one after another: few programs are fastest


def _device_sm_count(device: torch.device) -> int:
    index = device.index
    if device.type == "cuda" and index is None:
        index = torch.cuda.current_device()
    return _sm_count(device.type, index)


def _check_sizes(num_rows: int, row_len: int) -> None:
    if num_rows < 1 or row_len < 1:
        raise ValueError(f"Need at least one non-empty group, got {num_rows} of {row_len}.")
    if row_len > _MAX_INDEX:
        raise ValueError(f"A group holds {row_len} elements; the kernels index up to {_MAX_INDEX}.")


def launch_config(
    num_rows: int,
    row_len: int,
    device: torch.device | None = None,
    block: int | None = None,
    split: int | None = None,
    *,
    sm_count: int | None = None,
) -> tuple[int, int, int, int]:
    """``(BLOCK, split, num_warps, num_tiles)`` for ``num_rows`` groups of ``row_len`` elements.

    Without overrides: tiles of 2048 elements, halved (down to 512) while the grid would hold
    fewer tiles than 8 programs per SM; then enough programs per group to reach 8 per SM and to
    give no program more than 8 tiles, at most one per tile and 256 per group.
    num_warps = BLOCK / 256 (8 elements a thread). ``split == 1`` selects the one-launch
    ``_*_rows_kernel``; otherwise the two-launch split kernels run. The SM count is
    ``device``'s, or ``sm_count`` (no device needed).
    """
    _check_sizes(num_rows, row_len)
    if sm_count is None:
        sm_count = _device_sm_count(device)
    target = _PROGRAMS_PER_SM * sm_count
    if block is None:
        block = min(_MAX_BLOCK, max(16, triton.next_power_of_2(row_len)))
        while block > _MIN_BLOCK and num_rows * triton.cdiv(row_len, block) < target:
            block //= 2
    elif block < 2 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 2, got {block}.")
    num_tiles = triton.cdiv(row_len, block)
    if split is None:
        split = max(triton.cdiv(target, num_rows), triton.cdiv(num_tiles, _MAX_TILES_PER_PROGRAM))
    elif split < 1:
        raise ValueError(f"split must be >= 1, got {split}.")
    split = max(1, min(split, num_tiles, _MAX_SPLIT))
    if num_rows * split > 2**31 - 1:
        raise ValueError(f"{num_rows} groups are too many for one launch.")
    num_warps = max(1, min(8, block // 256))
    return block, split, num_warps, num_tiles


def single_config(row_len: int, acc: torch.dtype = torch.float32) -> tuple[int, int] | None:
    """``(BLOCK, num_warps)`` of the one-program-per-group kernels, or None when a group of
    ``row_len`` elements does not fit (more than 8192, or 4096 when the accumulation dtype
    ``acc`` is fp64): then the looping or split kernels run.
    """
    block = max(16, triton.next_power_of_2(row_len))
    if block > (_SINGLE_MAX_FP64 if acc == torch.float64 else _SINGLE_MAX):
        return None
    return block, max(1, min(16, block // 512))


class _Plan(NamedTuple):
    """How one pass runs: ``kind`` "single", "rows" or "split", and its launch sizes."""

    kind: str
    block: int
    num_warps: int
    split: int = 1
    num_tiles: int = 1

    @property
    def split_p2(self) -> int:
        """SPLIT_P2 of the split apply kernels: the partials padded to a power of two."""
        return max(2, triton.next_power_of_2(self.split))


def _plan(
    num_rows: int,
    row_len: int,
    device: torch.device | None = None,
    block: int | None = None,
    split: int | None = None,
    *,
    sm_count: int | None = None,
    acc: torch.dtype = torch.float32,
) -> _Plan:
    """The launch the forward and backward passes make (the same for both), for accumulation
    dtype ``acc``."""
    _check_sizes(num_rows, row_len)
    single = single_config(row_len, acc) if block is None and split is None else None
    if single is not None:
        return _Plan("single", single[0], single[1])
    block, split, warps, tiles = launch_config(
        num_rows, row_len, device, block, split, sm_count=sm_count
    )
    return _Plan("rows" if split == 1 else "split", block, warps, split, tiles)


#: the kernels each kind of plan launches, forward then backward
_PLAN_KERNELS = {
    "single": ("_fwd_single_kernel", "_bwd_single_kernel"),
    "rows": ("_fwd_rows_kernel", "_bwd_rows_kernel"),
    "split": ("_fwd_stats_kernel", "_fwd_apply_kernel", "_bwd_reduce_kernel", "_bwd_apply_kernel"),
}
_TL_NAMES = {
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float32: "fp32",
    torch.float64: "fp64",
}


class Variant(NamedTuple):
    """One compiled form of a kernel: what its constexprs and launch options are."""

    kernel: str
    dtype: str  # of every data tensor: "fp32", "bf16", "fp16", "fp64"
    silu: bool
    block: int
    num_warps: int
    split_p2: int = 0  # SPLIT_P2 of the apply kernels (0: the kernel has none)

    @property
    def name(self) -> str:
        split = f",SPLIT_P2={self.split_p2}" if self.split_p2 else ""
        silu = "" if self.kernel == "_fwd_stats_kernel" else f",silu={self.silu}"
        return f"{self.kernel}[{self.dtype}{silu},BLOCK={self.block}{split},warps={self.num_warps}]"


def launch_variants(
    shapes: Iterable[tuple[int, int]],
    sm_count: int,
    dtypes: Iterable[torch.dtype] = (torch.float32,),
    silu: Iterable[bool] = (False, True),
) -> set[Variant]:
    """The kernel variants that :meth:`SpadeNormKernels.forward` and ``backward`` launch for
    groups given as ``(num_groups_total, group_len)`` pairs (N·G and (C/G)·H·W) on a GPU with
    ``sm_count`` SMs, for every dtype (x, gamma, beta alike) and SiLU setting."""
    variants: set[Variant] = set()
    dtypes, silu = tuple(dtypes), tuple(silu)
    for num_rows, row_len in shapes:
        for dtype in dtypes:
            plan = _plan(num_rows, row_len, sm_count=sm_count, acc=acc_dtype(dtype))
            for use_silu in silu:
                for kernel in _PLAN_KERNELS[plan.kind]:
                    variants.add(
                        Variant(
                            kernel,
                            _TL_NAMES[dtype],
                            use_silu and kernel != "_fwd_stats_kernel",
                            plan.block,
                            plan.num_warps,
                            plan.split_p2 if kernel.endswith("_apply_kernel") else 0,
                        )
                    )
    return variants


def _tl_acc(acc: torch.dtype) -> tl.dtype:
    return tl.float64 if acc == torch.float64 else tl.float32


# ----------------------------------------------------------------------------------------------
# the kernels of one mode and their launchers

_DATA_PTRS = ("x_ptr", "g_ptr", "b_ptr", "y_ptr", "dy_ptr", "dg_ptr", "db_ptr", "dx_ptr")
_STAT_PTRS = ("part_ptr", "mean_ptr", "rstd_ptr")
_DTYPES = {name: dtype for dtype, name in _TL_NAMES.items()}


class SpadeNormKernels:
    """The jitted kernels in one mode (``interpret``: Triton's CPU interpreter, else compiled
    for CUDA) as attributes named like the functions, and their launchers
    :meth:`forward` / :meth:`backward`. Made by :func:`build`."""

    def __init__(self, interpret: bool) -> None:
        self.interpret = bool(interpret)
        namespace = _jitted_namespace(self.interpret)
        self.kernels: dict[str, Any] = {name: namespace[name] for name in KERNEL_NAMES}
        for name, kernel in self.kernels.items():
            setattr(self, name, kernel)

    def __repr__(self) -> str:
        return f"SpadeNormKernels(interpret={self.interpret})"

    def _check_device(self, t: torch.Tensor) -> None:
        if t.device.type != "cuda" and not self.interpret:
            raise RuntimeError(
                "Compiled Triton kernels need CUDA tensors; CPU tensors need the interpreted "
                "kernels (TRITON_INTERPRET=1)."
            )

    def forward(
        self,
        x: torch.Tensor,
        gamma: torch.Tensor,
        beta: torch.Tensor,
        num_groups: int,
        eps: float,
        silu: bool,
        *,
        block: int | None = None,
        split: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fused forward: ``(y, mean, rstd)``, y in x's dtype (NCHW contiguous), mean and rstd
        of shape (N, G) in the accumulation dtype (:func:`acc_dtype`).

        Shapes and dtypes are assumed validated by the caller (``kernels.spade_norm_op``); non-
        contiguous inputs are made contiguous. ``block`` and ``split`` override the launch
        heuristics of :func:`launch_config` (tests use them to cover ragged tiles and split
        groups).
        """
        self._check_device(x)
        x, gamma, beta = x.contiguous(), gamma.contiguous(), beta.contiguous()
        n = x.shape[0]
        rows, row_len = n * num_groups, x.numel() // max(1, n * num_groups)
        acc = acc_dtype(x.dtype)
        y = torch.empty_like(x)
        mean = torch.empty((n, num_groups), device=x.device, dtype=acc)
        rstd = torch.empty_like(mean)  # separate from mean: custom-op outputs must not alias
        plan = _plan(rows, row_len, x.device, block, split, acc=acc)
        if plan.kind == "single":
            self._fwd_single_kernel[(rows,)](
                x, gamma, beta, y, mean, rstd, row_len, eps, BLOCK=plan.block, SILU=silu,
                ACC=_tl_acc(acc), num_warps=plan.num_warps,
            )  # fmt: skip
            return y, mean, rstd
        block, split, warps, tiles = plan.block, plan.split, plan.num_warps, plan.num_tiles
        if plan.kind == "rows":
            self._fwd_rows_kernel[(rows,)](
                x, gamma, beta, y, mean, rstd, row_len, tiles, eps, BLOCK=block, SILU=silu,
                ACC=_tl_acc(acc), num_warps=warps,
            )  # fmt: skip
            return y, mean, rstd
        part = torch.empty((3, rows, split), device=x.device, dtype=acc)
        grid = (rows, split)
        self._fwd_stats_kernel[grid](
            x, part, row_len, tiles, split, rows * split, BLOCK=block, ACC=_tl_acc(acc),
            num_warps=warps,
        )  # fmt: skip
        self._fwd_apply_kernel[grid](
            x, gamma, beta, y, part, mean, rstd, row_len, tiles, split, rows * split, eps,
            BLOCK=block, SPLIT_P2=plan.split_p2, SILU=silu, ACC=_tl_acc(acc), num_warps=warps,
        )  # fmt: skip
        return y, mean, rstd

    def backward(
        self,
        dy: torch.Tensor,
        x: torch.Tensor,
        gamma: torch.Tensor,
        beta: torch.Tensor | None,
        mean: torch.Tensor,
        rstd: torch.Tensor,
        num_groups: int,
        silu: bool,
        *,
        block: int | None = None,
        split: int | None = None,
    ) -> list[torch.Tensor]:
        """``[dx, dgamma]``, plus ``[dbeta]`` when ``silu`` (without SiLU dbeta is ``dy`` itself
        and beta is not needed), for the upstream gradient ``dy`` of y, given the ``mean`` /
        ``rstd`` that :meth:`forward` returned. Each gradient is contiguous in the dtype of its
        input."""
        self._check_device(x)
        if silu and beta is None:
            raise ValueError("backward needs beta when silu is True.")
        dy, x, gamma = dy.contiguous(), x.contiguous(), gamma.contiguous()
        beta = beta.contiguous() if silu else None
        mean, rstd = mean.contiguous(), rstd.contiguous()
        n = x.shape[0]
        rows, row_len = n * num_groups, x.numel() // max(1, n * num_groups)
        acc = acc_dtype(x.dtype)
        dx = torch.empty_like(x)
        dgamma = torch.empty_like(gamma)
        dbeta = torch.empty_like(beta) if silu else None
        grads = [dx, dgamma, dbeta] if silu else [dx, dgamma]
        plan = _plan(rows, row_len, x.device, block, split, acc=acc)
        if plan.kind == "single":
            self._bwd_single_kernel[(rows,)](
                dy, x, gamma, beta, mean, rstd, dx, dgamma, dbeta, row_len, BLOCK=plan.block,
                SILU=silu, ACC=_tl_acc(acc), num_warps=plan.num_warps,
            )  # fmt: skip
            return grads
        block, split, warps, tiles = plan.block, plan.split, plan.num_warps, plan.num_tiles
        if plan.kind == "rows":
            self._bwd_rows_kernel[(rows,)](
                dy, x, gamma, beta, mean, rstd, dx, dgamma, dbeta, row_len, tiles, BLOCK=block,
                SILU=silu, ACC=_tl_acc(acc), num_warps=warps,
            )  # fmt: skip
            return grads
        part = torch.empty((2, rows, split), device=x.device, dtype=acc)
        grid = (rows, split)
        self._bwd_reduce_kernel[grid](
            dy, x, gamma, beta, mean, rstd, dgamma, dbeta, part, row_len, tiles, split,
            rows * split, BLOCK=block, SILU=silu, ACC=_tl_acc(acc), num_warps=warps,
        )  # fmt: skip
        self._bwd_apply_kernel[grid](
            dy, x, gamma, beta, mean, rstd, dx, part, row_len, tiles, split, rows * split,
            BLOCK=block, SPLIT_P2=plan.split_p2, SILU=silu, ACC=_tl_acc(acc), num_warps=warps,
        )  # fmt: skip
        return grads

    # ------------------------------------------------------------------------------------------
    # ahead-of-time compilation (no GPU needed)

    def compile(self, variant: Variant, arch: int) -> Any:
        """Compile ``variant`` for CUDA ``sm_<arch>`` without a GPU: Triton's compiled kernel
        (``.asm["ptx"]``, ``.asm["cubin"]``, ``.metadata.shared`` in bytes).

        Arguments are specialised as the runtime does for the paper's shapes (16-byte aligned
        pointers, L divisible by 16; beta/dbeta are ``None`` in the backward without SiLU), so
        the code is what a GPU would run, e.g. 128-bit vector loads (``ld.global.v4``). Uses
        the compiler API of the installed Triton (``ASTSource`` with a signature dict and
        attributes by argument index, as in Triton 3.3 and later).
        """
        if self.interpret:
            raise RuntimeError("compile() needs compiled kernels: build(interpret=False).")
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        fn = self.kernels[variant.kernel]
        dtype = _DTYPES[variant.dtype]
        data, stat = variant.dtype, _TL_NAMES[acc_dtype(dtype)]
        constants = {
            "BLOCK": variant.block,
            "SPLIT_P2": variant.split_p2,
            "SILU": variant.silu,
            "ACC": _tl_acc(acc_dtype(dtype)),
        }
        signature, constexprs, attrs = {}, {}, {}
        for i, name in enumerate(fn.arg_names):
            unused = not variant.silu and name in ("b_ptr", "db_ptr") and "_bwd" in fn.__name__
            if name in constants or unused:
                signature[name] = "constexpr"
                constexprs[name] = None if unused else constants[name]
                continue
            if name in _DATA_PTRS or name in _STAT_PTRS:
                signature[name] = f"*{data if name in _DATA_PTRS else stat}"
            else:
                signature[name] = "fp32" if name == "eps" else "i32"
            if name.endswith("_ptr") or name == "L":
                attrs[(i,)] = [["tt.divisibility", 16]]
        src = ASTSource(fn, signature, constexprs, attrs)
        target = GPUTarget("cuda", arch, 32)
        return triton.compile(src, target=target, options={"num_warps": variant.num_warps})


def build(interpret: bool) -> SpadeNormKernels:
    """The kernels jitted for Triton's interpreter (``interpret=True``: CPU tensors, or CUDA
    tensors copied through the host) or compiled for CUDA (``False``), whatever
    ``TRITON_INTERPRET`` says."""
    return SpadeNormKernels(interpret)
