"""The fused SPADE group norm: Triton kernels (run by Triton's CPU interpreter), custom op,
autograd, torch.compile, dispatch and the fallback to torch, all against the torch reference;
and (slow) every kernel variant the runtime launches compiled for sm_80-sm_90 through ptxas.

These tests never set ``TRITON_INTERPRET`` for the whole process: the ``interpret`` fixture sets
it for one test (the op reads it at call time), and the kernels are jitted for the interpreter
explicitly (``spade_norm_triton.build(interpret=True)``), so other test modules are not affected.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import echo_synth_kernels as kernels
from echo_synth_kernels import ptxas_check, spade_group_norm, spade_group_norm_reference
from echo_synth_kernels import spade_norm_op as op
from echo_synth_kernels import spade_norm_triton as tri

ROOT = Path(__file__).resolve().parents[2]

# (N, C, H, W, groups): non-power-of-two spatial sizes and channel counts, one channel per
# group, a single group, odd batch sizes.
SHAPES = [(2, 6, 5, 7, 3), (1, 12, 3, 9, 4), (3, 5, 4, 3, 5), (1, 8, 6, 6, 1)]


@pytest.fixture
def interpret(monkeypatch: pytest.MonkeyPatch):
    """Triton's interpreter on (for this test only) and the fused path forced; yields the
    interpreted kernel module."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with kernels.spade_backend("triton"):
        yield op._kernels(True)


@pytest.fixture(autouse=True)
def _no_env_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """No backend from the environment, and no fallback recorded by an earlier test."""
    monkeypatch.delenv(kernels.ENV_BACKEND, raising=False)
    monkeypatch.setattr(op, "_fallback_cause", None)


def _inputs(n, c, h, w, dtype=torch.float32, seed=0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, h, w, generator=g, dtype=torch.float64) * 2 + offset).to(dtype)
    gamma = (0.5 * torch.randn(n, c, h, w, generator=g, dtype=torch.float64)).to(dtype)
    beta = torch.randn(n, c, h, w, generator=g, dtype=torch.float64).to(dtype)
    dy = torch.randn(n, c, h, w, generator=g, dtype=torch.float64).to(dtype)
    return x, gamma, beta, dy


def _reference_grads(x, gamma, beta, dy, groups, silu):
    leaves = [t.detach().clone().requires_grad_() for t in (x, gamma, beta)]
    y = spade_group_norm_reference(*leaves, groups, silu=silu)
    y.backward(dy)
    return y.detach(), [t.grad for t in leaves]


def _close(actual, expected, atol, rtol):
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol)


# ---------------------------------------------------------------------------------------------
# kernels against the reference (interpreted)


@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_kernels_match_reference_fp32(interpret, shape, silu):
    """All three launch shapes — tiles of 16 split over 3 programs (ragged last tile), one
    looping program per group (split 1), and the default (these tiny groups: one program holding
    the group) — give y, mean, rstd and the gradients of the reference at fp32 precision."""
    n, c, h, w, groups = shape
    x, gamma, beta, dy = _inputs(n, c, h, w, offset=3.0)
    y_ref, grads_ref = _reference_grads(x, gamma, beta, dy, groups, silu)
    var_ref, mean_ref = torch.var_mean(x.reshape(n, groups, -1), dim=-1, correction=0)
    for launch in ({"block": 16, "split": 3}, {"block": 16, "split": 1}, {}):
        y, mean, rstd = interpret.forward(x, gamma, beta, groups, 1e-5, silu, **launch)
        _close(y, y_ref, 1e-5, 1e-5)
        _close(mean, mean_ref, 1e-5, 1e-5)
        _close(rstd, torch.rsqrt(var_ref + 1e-5), 1e-5, 1e-5)
        grads = interpret.backward(dy, x, gamma, beta, mean, rstd, groups, silu, **launch)
        assert len(grads) == (3 if silu else 2)
        if not silu:  # dbeta = dy, not computed by the kernels
            grads.append(dy)
        for got, want in zip(grads, grads_ref, strict=True):
            assert got.dtype == want.dtype and got.shape == want.shape
            _close(got, want, 2e-5, 1e-5)


@pytest.mark.parametrize("split", [1, 2, 5])
def test_split_does_not_change_the_result(interpret, split):
    """The two-stage reduction gives the same numbers whatever the number of programs."""
    x, gamma, beta, dy = _inputs(2, 4, 7, 9, seed=1)
    y1, m1, r1 = interpret.forward(x, gamma, beta, 2, 1e-5, True, block=8, split=1)
    y2, m2, r2 = interpret.forward(x, gamma, beta, 2, 1e-5, True, block=8, split=split)
    _close(y2, y1, 1e-6, 1e-6)
    _close(r2, r1, 1e-6, 1e-6)
    g1 = interpret.backward(dy, x, gamma, beta, m1, r1, 2, True, block=8, split=1)
    g2 = interpret.backward(dy, x, gamma, beta, m2, r2, 2, True, block=8, split=split)
    for a, b in zip(g2, g1, strict=True):
        _close(a, b, 1e-6, 1e-6)


def test_statistics_survive_a_large_mean(interpret):
    """|mean| ≫ std: fp32 sum/sum-of-squares would cancel to garbage (1e6 ± 1e-2 has no fp32
    digits left); the kernels' merged statistics still match an fp64 computation."""
    x = 1000.0 + 0.1 * torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    gamma, beta = torch.zeros_like(x), torch.zeros_like(x)
    _, mean, rstd = interpret.forward(x, gamma, beta, 2, 1e-5, False, block=32, split=2)
    var64, mean64 = torch.var_mean(x.double().reshape(2, 2, -1), dim=-1, correction=0)
    _close(mean, mean64, 0.0, 1e-6)
    _close(rstd, torch.rsqrt(var64 + 1e-5), 0.0, 1e-3)


@pytest.mark.parametrize(
    ("dtype", "tol"), [(torch.bfloat16, 3e-2), (torch.float16, 4e-3)], ids=["bf16", "fp16"]
)
def test_low_precision_matches_reference(interpret, dtype, tol):
    """bf16/fp16 in and out, fp32 inside: within a couple of ulps of the reference, which also
    computes in fp32 from the same rounded inputs."""
    x, gamma, beta, dy = _inputs(2, 6, 5, 7, dtype=dtype, seed=3)
    leaves = [t.clone().requires_grad_() for t in (x, gamma, beta)]
    y = spade_group_norm(*leaves, 3, silu=True)
    y.backward(dy)
    y_ref, grads_ref = _reference_grads(x, gamma, beta, dy, 3, True)
    assert y.dtype == dtype
    _close(y, y_ref, tol, tol)
    for leaf, want in zip(leaves, grads_ref, strict=True):
        assert leaf.grad.dtype == dtype
        _close(leaf.grad, want, 2 * tol, tol)


def test_mixed_dtypes_and_channels_last(interpret):
    """bf16 x with fp32 gamma/beta, channels-last memory: each gradient keeps its input's dtype;
    y keeps x's dtype and is contiguous NCHW."""
    x, gamma, beta, dy = _inputs(1, 6, 4, 5, seed=4)
    x = x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    leaves = [t.clone().requires_grad_() for t in (x, gamma, beta)]
    y = spade_group_norm(*leaves, 2)
    y.backward(dy.to(torch.bfloat16))
    y_ref, grads_ref = _reference_grads(x, gamma, beta, dy.to(torch.bfloat16), 2, False)
    assert y.dtype == torch.bfloat16 and y.is_contiguous()
    _close(y, y_ref, 3e-2, 3e-2)
    assert [t.grad.dtype for t in leaves] == [torch.bfloat16, torch.float32, torch.float32]
    for leaf, want in zip(leaves, grads_ref, strict=True):
        _close(leaf.grad, want, 6e-2, 3e-2)


@pytest.mark.parametrize("batch", [1, 8])
def test_small_batches_fill_the_gpu(interpret, monkeypatch, batch):
    """Latent 64² level (192 channels, 32 groups) at batch 1 and 8 on a 132-SM GPU: the groups
    are split so the launch has several programs per SM, and the tiles cover every row."""
    monkeypatch.setattr(tri, "_sm_count", lambda *_: 132)
    rows, row_len = batch * 32, 6 * 64 * 64
    block, split, warps, tiles = tri.launch_config(rows, row_len, torch.device("cuda", 0))
    assert tri.single_config(row_len) is None  # too big for one program per group
    assert rows * split >= 4 * 132
    assert split <= tiles and tiles * block >= row_len > (tiles - 1) * block
    assert block & (block - 1) == 0 and 1 <= warps <= 8


def test_kernels_are_jitted_per_mode_without_touching_the_environment(monkeypatch):
    """build(interpret) jits the same functions compiled or interpreted, whatever
    TRITON_INTERPRET says, and leaves the variable alone; each kernel calls the helpers of its
    own mode."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    compiled, interpreted = tri.build(False), tri.build(True)
    assert os.environ["TRITON_INTERPRET"] == "1"
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    assert set(compiled.kernels) == set(interpreted.kernels) == set(tri.KERNEL_NAMES)
    for name in tri.KERNEL_NAMES:
        c, i = compiled.kernels[name], interpreted.kernels[name]
        assert isinstance(c, JITFunction) and isinstance(i, InterpretedFunction)
        assert isinstance(c.fn.__globals__["_sum"], JITFunction)
        assert isinstance(i.fn.__globals__["_sum"], InterpretedFunction)
    assert "triton.knobs" not in Path(tri.__file__).read_text()  # not in Triton 3.0-3.3


def test_fp64_groups_of_8192_leave_the_one_program_kernels(interpret):
    """fp64 spills in the one-program backward at 8192 elements × 16 warps (ptxas, sm_80-90),
    so fp64 groups over 4096 take the looping kernels; the other dtypes keep 8192 × 16 warps.
    Results still match an fp64 computation."""
    assert tri.single_config(8192) == (8192, 16)
    assert tri.single_config(8192, torch.float64) is None
    assert tri.single_config(4096, torch.float64) == (4096, 8)
    x, gamma, beta, dy = _inputs(1, 2, 64, 64, dtype=torch.float64, seed=11)
    y, mean, rstd = interpret.forward(x, gamma, beta, 1, 1e-5, True)
    y_ref, mean_ref, rstd_ref = op._forward_torch(x, gamma, beta, 1, 1e-5, True)
    _close(y, y_ref, 1e-12, 1e-12)
    _close(mean, mean_ref, 1e-12, 1e-12)
    _close(rstd, rstd_ref, 1e-12, 1e-12)
    grads = interpret.backward(dy, x, gamma, beta, mean, rstd, 1, True)
    grads_ref = op._backward_torch(dy, x, gamma, beta, mean, rstd, 1, True)
    for got, want in zip(grads, grads_ref, strict=True):
        _close(got, want, 1e-12, 1e-12)


class _Recorder:
    """Stands in for a jitted kernel: records ``kernel[grid](..., **constexprs)`` launches."""

    def __init__(self, name: str, log: list) -> None:
        self.name, self.log = name, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append((self.name, kwargs))

        return launch


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize(
    ("n", "c", "hw"), [(2, 64, 32), (1, 128, 64), (64, 64, 64), (1, 64, 64)], ids=str
)
def test_launch_variants_are_what_the_launchers_launch(monkeypatch, n, c, hw, dtype):
    """launch_variants (what the ptxas check compiles) names exactly the kernels, BLOCK,
    num_warps and SPLIT_P2 that forward and backward launch (single, split, looping, and fp64's
    8192 groups), for a 16-SM card."""
    monkeypatch.setattr(tri, "_sm_count", lambda *_: 16)
    kernels_ = tri.build(interpret=True)
    log: list = []
    for name in tri.KERNEL_NAMES:
        setattr(kernels_, name, _Recorder(name, log))
    x = torch.zeros(n, c, hw, hw, dtype=dtype)
    mean = torch.zeros(n, 32, dtype=tri.acc_dtype(dtype))
    for silu in (False, True):
        kernels_.forward(x, x, x, 32, 1e-5, silu)
        kernels_.backward(x, x, x, x, mean, mean, 32, silu)
    launched = {
        tri.Variant(
            name,
            tri._TL_NAMES[dtype],
            kw.get("SILU", False),
            kw["BLOCK"],
            kw["num_warps"],
            kw.get("SPLIT_P2", 0),
        )  # fmt: skip
        for name, kw in log
    }
    groups = [(n * 32, c // 32 * hw * hw)]
    assert launched == tri.launch_variants(groups, 16, (dtype,))


# ---------------------------------------------------------------------------------------------
# every variant the runtime launches, compiled for every card (no GPU: Triton + ptxas)


def _doc_variants() -> dict[int, set[tuple]]:
    """(kernel, silu, BLOCK, warps, SPLIT_P2) rows of each arch's table in the doc."""
    rows: dict[int, set[tuple]] = {}
    arch = None
    for line in (ROOT / "docs" / "kernels-ptxas.md").read_text().splitlines():
        if m := re.match(r"### sm_(\d+)$", line):
            arch = int(m.group(1))
        elif arch and (m := re.match(r"\| `(\w+)` \| (\S+) \| (\d+) \| (\d+) \| (\S+) \|", line)):
            kernel, silu, block, warps, split_p2 = m.groups()
            split_p2 = 0 if split_p2 == "–" else int(split_p2)
            row = (kernel, silu == "yes", int(block), int(warps), split_p2)
            rows.setdefault(arch, set()).add(row)
    return rows


def test_ptxas_doc_lists_the_variants_the_heuristics_pick():
    """docs/kernels-ptxas.md (benchmarks/ptxas_table.py) is current: its per-arch tables hold
    exactly the variants the launch heuristics give for the paper's shapes."""
    expected = {
        arch: {
            (v.kernel, v.silu, v.block, v.num_warps, v.split_p2)
            for v in ptxas_check.variants_for(arch)
        }
        for arch in ptxas_check.ARCHS
    }
    assert _doc_variants() == expected, "regenerate: python benchmarks/ptxas_table.py"


def test_ptxas_report_parsing():
    log = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_bwd_single_kernel' for 'sm_90a'
ptxas info    : Function properties for _bwd_single_kernel
    112 bytes stack frame, 92 bytes spill stores, 84 bytes spill loads
ptxas info    : Used 128 registers, used 1 barriers, 16 bytes smem, 448 bytes cmem[0]
"""
    assert ptxas_check.parse_ptxas_log(log) == {
        "registers": 128,
        "spill_stores": 92,
        "spill_loads": 84,
        "stack_frame": 112,
        "static_smem": 16,
    }
    variant = tri.Variant("_bwd_single_kernel", "fp64", True, 8192, 16)
    report = ptxas_check.PtxasReport(90, variant, 128, 92, 84, 112, 16, 300 * 1024, True, True)
    problems = report.problems()
    assert len(problems) == 2 and "spill" in problems[0] and "shared memory" in problems[1]


@pytest.mark.slow
def test_every_launch_variant_fits_every_card():
    """Without a GPU: every kernel variant the runtime launches for the paper's shapes (batch
    1-64, 64²-256², 64-512 channels, 32 groups; heuristics at the SM counts of each card)
    compiles for sm_80, sm_86, sm_89 and sm_90 in fp32, bf16, fp16 and fp64, spills nothing
    (ptxas -v), fits the card's shared memory per block, and reads and writes the streamed
    tensors with 128-bit accesses. The table of these numbers is docs/kernels-ptxas.md."""
    start = time.perf_counter()
    reports = ptxas_check.report()
    elapsed = time.perf_counter() - start
    problems = [p for r in reports for p in r.problems()]
    assert not problems, "\n".join(problems)
    for arch in ptxas_check.ARCHS:
        assert {r.variant.kernel for r in reports if r.arch == arch} == set(tri.KERNEL_NAMES)
        assert {r.variant.dtype for r in reports if r.arch == arch} == {
            "fp32", "bf16", "fp16", "fp64"
        }  # fmt: skip
    for r in reports:
        assert r.vector_load, (r.arch, r.variant.name)
        if r.variant.kernel != "_fwd_stats_kernel":  # writes three scalars per program
            assert r.vector_store, (r.arch, r.variant.name)
    print(f"{len(reports)} variants compiled and checked in {elapsed:.0f} s")


# ---------------------------------------------------------------------------------------------
# gradients checked numerically, the op's torch formulation, op registration, torch.compile


@pytest.mark.parametrize("silu", [False, True])
def test_gradcheck_fp64_kernels(interpret, silu):
    """The kernels' analytic backward against finite differences of their own forward (fp64
    inputs accumulate in fp64)."""
    x, gamma, beta, _ = _inputs(1, 4, 3, 3, dtype=torch.float64, seed=5)
    leaves = [t.requires_grad_() for t in (x, gamma, beta)]
    assert torch.autograd.gradcheck(
        lambda *t: spade_group_norm(*t, 2, silu=silu), leaves, fast_mode=True
    )


@pytest.mark.parametrize("silu", [False, True])
def test_op_torch_formulation_matches_reference(monkeypatch, silu):
    """Without the interpreter a CPU call of the custom op runs its torch formulation: same
    forward as the reference, and an explicit backward that equals autograd of the reference
    and passes a numerical gradient check."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, gamma, beta, dy = _inputs(2, 6, 3, 5, dtype=torch.float64, seed=6)
    leaves = [t.clone().requires_grad_() for t in (x, gamma, beta)]
    y = op.spade_group_norm_op(*leaves, 3, 1e-5, silu)[0]
    y.backward(dy)
    y_ref, grads_ref = _reference_grads(x, gamma, beta, dy, 3, silu)
    _close(y, y_ref, 1e-6, 1e-6)  # the reference's statistics are fp32 even for fp64 input
    for leaf, want in zip(leaves, grads_ref, strict=True):
        _close(leaf.grad, want, 1e-5, 1e-5)
    small = [t[:1, :4, :2, :3].detach().clone().requires_grad_() for t in (x, gamma, beta)]
    assert torch.autograd.gradcheck(
        lambda *t: op.spade_group_norm_op(*t, 2, 1e-5, silu)[0], small, fast_mode=True
    )


def test_opcheck_custom_ops(interpret):
    """torch.library.opcheck: schema, fake tensors, autograd registration, AOT dispatch."""
    x, gamma, beta, dy = _inputs(1, 4, 3, 5, seed=7)
    for silu in (False, True):
        args = (x.requires_grad_(), gamma.requires_grad_(), beta.requires_grad_(), 2, 1e-5, silu)
        torch.library.opcheck(op.spade_group_norm_op, args)
        _, mean, rstd = op.spade_group_norm_op(x.detach(), gamma, beta, 2, 1e-5, silu)
        b = beta.detach() if silu else None
        bwd_args = (dy, x.detach(), gamma.detach(), b, mean, rstd, 2, silu)
        torch.library.opcheck(op.spade_group_norm_backward_op, bwd_args)


def test_compile_fullgraph_through_the_op(interpret):
    """torch.compile(fullgraph=True) traces through the public function, the custom op's fake
    implementation and its autograd formula, and gives the eager reference's loss and grads."""
    x, gamma, beta, _ = _inputs(2, 6, 5, 3, seed=8)

    def loss(x, gamma, beta):
        y = spade_group_norm(x, gamma, beta, 3, silu=True)
        return (y * torch.linspace(-1, 1, y.shape[-1])).square().sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    leaves = [t.clone().requires_grad_() for t in (x, gamma, beta)]
    value = compiled(*leaves)
    value.backward()
    ref_leaves = [t.clone().requires_grad_() for t in (x, gamma, beta)]
    y_ref = spade_group_norm_reference(*ref_leaves, 3, silu=True)
    ref = (y_ref * torch.linspace(-1, 1, y_ref.shape[-1])).square().sum()
    ref.backward()
    _close(value, ref, 1e-4, 1e-5)
    for a, b in zip(leaves, ref_leaves, strict=True):
        _close(a.grad, b.grad, 1e-4, 1e-5)


# ---------------------------------------------------------------------------------------------
# dispatch and validation


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record calls of the fused op made by the public function."""
    calls: list[str] = []
    fused = op.spade_group_norm_op

    def recording(*args):
        calls.append("fused")
        return fused(*args)

    monkeypatch.setattr(op, "spade_group_norm_op", recording)
    return calls


def test_auto_uses_the_reference_on_cpu(monkeypatch, spy):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter is no reason to use it
    x, gamma, beta, _ = _inputs(1, 4, 3, 3)
    assert kernels.get_spade_backend() == "auto"
    y = spade_group_norm(x, gamma, beta, 2)
    assert spy == []
    torch.testing.assert_close(y, spade_group_norm_reference(x, gamma, beta, 2))


def test_backend_switches(monkeypatch, spy):
    """The environment variable is read at call time; set_spade_backend and the context manager
    override it and restore the previous setting."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x, gamma, beta, _ = _inputs(1, 4, 3, 3)
    monkeypatch.setenv(kernels.ENV_BACKEND, "triton")
    spade_group_norm(x, gamma, beta, 2)
    assert spy == ["fused"]
    monkeypatch.setenv(kernels.ENV_BACKEND, "torch")
    spade_group_norm(x, gamma, beta, 2)
    assert spy == ["fused"]
    with kernels.spade_backend("triton"):
        assert kernels.get_spade_backend() == "triton"
        spade_group_norm(x, gamma, beta, 2)
        with kernels.spade_backend("torch"):
            spade_group_norm(x, gamma, beta, 2)
    assert spy == ["fused", "fused"]
    assert kernels.get_spade_backend() == "torch"  # back to the environment's choice
    kernels.set_spade_backend("triton")
    try:
        spade_group_norm(x, gamma, beta, 2)
    finally:
        kernels.set_spade_backend(None)
    assert spy == ["fused"] * 3


def test_bad_backend_names(monkeypatch):
    x, gamma, beta, _ = _inputs(1, 2, 2, 2)
    with pytest.raises(ValueError, match="backend"):
        kernels.set_spade_backend("cuda")
    monkeypatch.setenv(kernels.ENV_BACKEND, "fast")
    with pytest.raises(ValueError, match=kernels.ENV_BACKEND):
        spade_group_norm(x, gamma, beta, 1)


def test_forcing_triton_where_it_cannot_run(monkeypatch):
    x, gamma, beta, _ = _inputs(1, 2, 2, 2)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with kernels.spade_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        spade_group_norm(x, gamma, beta, 1)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(op, "TRITON_AVAILABLE", False)
    with kernels.spade_backend("triton"), pytest.raises(RuntimeError, match="not installed"):
        spade_group_norm(x, gamma, beta, 1)


def test_argument_validation():
    x, gamma, beta, _ = _inputs(2, 6, 3, 3)
    bad_calls = {
        "4-D|shape": (x[0], gamma[0], beta[0], 3),
        "gamma": (x, gamma[:, :3], beta, 3),
        "beta": (x, gamma, beta.flatten(2), 3),
        "float": (x, gamma.to(torch.int32), beta, 3),
        "divide|divisible": (x, gamma, beta, 4),
        "num_groups": (x, gamma, beta, 0),
        "spatial": (x[..., :0], gamma[..., :0], beta[..., :0], 3),
    }
    for message, args in bad_calls.items():
        with pytest.raises(ValueError, match=message):
            spade_group_norm(*args)
    with pytest.raises(ValueError, match="eps"):
        spade_group_norm(x, gamma, beta, 3, eps=-1.0)


def test_reference_is_groupnorm_then_modulation():
    """The ground truth itself, by hand: per-(sample, group) standardisation (biased variance),
    then x̂·(1+γ)+β, then SiLU."""
    x, gamma, beta, _ = _inputs(2, 4, 3, 5, seed=9)
    xg = x.double().reshape(2, 2, -1)
    var = xg.var(-1, unbiased=False, keepdim=True)
    x_hat = (xg - xg.mean(-1, keepdim=True)) / (var + 1e-5).sqrt()
    z = x_hat.reshape(x.shape) * (1 + gamma.double()) + beta.double()
    _close(spade_group_norm_reference(x, gamma, beta, 2), z, 1e-5, 1e-5)
    silu = spade_group_norm_reference(x, gamma, beta, 2, silu=True)
    _close(silu, z * torch.sigmoid(z), 1e-5, 1e-5)


# ---------------------------------------------------------------------------------------------
# fallback: under "auto" a failing fused path gives the torch result, warns once, then stays off


class _Failing:
    """Stands in for a jitted kernel whose launch raises ``error``."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            raise self.error

        return launch


def _inject(kind: str, monkeypatch: pytest.MonkeyPatch) -> type[Exception]:
    """Make the fused path fail as ``kind`` says; the exception type it then raises."""
    from triton.runtime.errors import InterpreterError, OutOfResources

    if kind == "import":  # triton or the kernel module cannot be imported
        monkeypatch.setattr(op, "_kernel_sets", {})
        monkeypatch.setitem(sys.modules, op._KERNEL_MODULE, None)
        return ImportError
    if kind == "old-triton":  # building the kernels hits an API this Triton lacks
        monkeypatch.setattr(op, "_kernel_sets", {})

        def build(interpret):
            raise AttributeError("module 'triton' has no attribute 'knobs'")

        monkeypatch.setattr(tri, "build", build)
        return AttributeError
    if kind == "compile":  # a kernel does not build (here: a tile that is no power of two)
        monkeypatch.setattr(tri, "single_config", lambda *args: (48, 1))
        return InterpreterError  # CompilationError when compiled for a GPU
    if kind == "shape":  # a group the kernels refuse
        monkeypatch.setattr(tri, "_MAX_INDEX", 8)
        return ValueError
    if kind == "launch":  # the launch fails (a card with too little shared memory)
        error = OutOfResources(232448, 101376, "shared memory")
        monkeypatch.setattr(op._kernels(True), "_fwd_single_kernel", _Failing(error))
        return OutOfResources
    raise AssertionError(kind)


@pytest.fixture
def auto_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Backend "auto" takes the fused path for CPU tensors (interpreted), as it does on CUDA."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(op, "_AUTO_DEVICES", ("cuda", "cpu"))


def _fallback_records(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "echo_synth_kernels"]


FAILURES = ["import", "old-triton", "compile", "shape", "launch"]


@pytest.mark.parametrize("kind", FAILURES)
def test_auto_falls_back_to_torch_once(auto_on_cpu, monkeypatch, caplog, spy, kind):
    """A failure to import, build, compile or launch the fused kernels under "auto": that call
    returns exactly what the op's torch formulation gives (y and, through autograd, the
    gradients), one WARNING line names the cause, and later calls take the torch reference
    without trying the kernels again or warning again."""
    error_type = _inject(kind, monkeypatch)
    x, gamma, beta, dy = _inputs(2, 6, 5, 7, seed=12)
    leaves = [t.clone().requires_grad_() for t in (x, gamma, beta)]
    with caplog.at_level(logging.WARNING, logger="echo_synth_kernels"):
        y = spade_group_norm(*leaves, 3, silu=True)
        y.backward(dy)
        y_ref, mean, rstd = op._forward_torch(x, gamma, beta, 3, 1e-5, True)
        assert torch.equal(y, y_ref)
        grads_ref = op._backward_torch(dy, x, gamma, beta, mean, rstd, 3, True)
        for leaf, want in zip(leaves, grads_ref, strict=True):
            assert torch.equal(leaf.grad, want)
        assert spy == ["fused"]
        assert op._fallback_cause.split(":")[0] in {
            t.__name__ for t in error_type.__subclasses__()
        } | {error_type.__name__}
        # the rest of the process: the reference, no second warning
        y2 = spade_group_norm(x, gamma, beta, 3, silu=True)
        spade_group_norm(x[:1], gamma[:1], beta[:1], 3)
        assert spy == ["fused"]
        assert torch.equal(y2, spade_group_norm_reference(x, gamma, beta, 3, silu=True))
    records = _fallback_records(caplog)
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    message = records[0].getMessage()
    assert "\n" not in message and "forward" in message and "torch" in message
    assert op._fallback_cause in message


@pytest.mark.parametrize("kind", FAILURES)
def test_forced_triton_raises_instead(monkeypatch, caplog, kind):
    """Backend "triton" forced: the same failures raise, nothing falls back or warns."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    error_type = _inject(kind, monkeypatch)
    x, gamma, beta, _ = _inputs(1, 4, 3, 3, seed=13)
    with kernels.spade_backend("triton"), pytest.raises(error_type):
        spade_group_norm(x, gamma, beta, 2)
    assert op._fallback_cause is None and not _fallback_records(caplog)


def test_backward_launch_failure_falls_back(auto_on_cpu, monkeypatch, caplog):
    """The forward ran fused, the backward kernel fails: the gradients are the op's torch
    formulation from the saved fused statistics, exactly; one warning names the backward."""
    from triton.runtime.errors import OutOfResources

    interpreted = op._kernels(True)
    error = OutOfResources(232448, 101376, "shared memory")
    monkeypatch.setattr(interpreted, "_bwd_single_kernel", _Failing(error))
    x, gamma, beta, dy = _inputs(2, 6, 5, 7, seed=14)
    leaves = [t.clone().requires_grad_() for t in (x, gamma, beta)]
    with caplog.at_level(logging.WARNING, logger="echo_synth_kernels"):
        y = spade_group_norm(*leaves, 3, silu=True)
        assert op._fallback_cause is None  # the forward kernels ran
        y.backward(dy)
    y_k, mean, rstd = interpreted.forward(x, gamma, beta, 3, 1e-5, True)
    assert torch.equal(y, y_k)
    grads_ref = op._backward_torch(dy, x, gamma, beta, mean, rstd, 3, True)
    for leaf, want in zip(leaves, grads_ref, strict=True):
        assert torch.equal(leaf.grad, want)
    (record,) = _fallback_records(caplog)
    assert "backward" in record.getMessage() and "OutOfResources" in record.getMessage()


def test_out_of_memory_is_no_reason_to_fall_back(auto_on_cpu, monkeypatch, caplog):
    """Out of GPU memory in the fused path propagates and leaves the kernels on."""
    oom = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(op._kernels(True), "_fwd_single_kernel", _Failing(oom))
    x, gamma, beta, _ = _inputs(1, 4, 3, 3, seed=15)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        spade_group_norm(x, gamma, beta, 2)
    assert op._fallback_cause is None and not _fallback_records(caplog)


def test_fallback_prints_one_line_per_process(tmp_path):
    """In a fresh process (no logging configured, as the CLI), a launch failure on every call
    prints exactly one line to stderr, naming the cause."""
    script = tmp_path / "fail.py"
    script.write_text(
        "import torch\n"
        "from triton.runtime.errors import OutOfResources\n"
        "from echo_synth_kernels import spade_group_norm, spade_norm_op as op\n"
        "op._AUTO_DEVICES = ('cuda', 'cpu')\n"
        "class Failing:\n"
        "    def __getitem__(self, grid):\n"
        "        def launch(*args, **kwargs):\n"
        "            raise OutOfResources(232448, 101376, 'shared memory')\n"
        "        return launch\n"
        "op._kernels(True)._fwd_single_kernel = Failing()\n"
        "x = torch.randn(2, 6, 4, 4)\n"
        "for _ in range(3):\n"
        "    spade_group_norm(x, x, x, 3, silu=True)\n"
        "print('done')\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    env.pop(kernels.ENV_BACKEND, None)
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120,
        check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "done"
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "OutOfResources" in lines[0] and "torch" in lines[0], lines


# ---------------------------------------------------------------------------------------------
# benchmark smoke test


@pytest.mark.slow
def test_benchmark_quick_runs_on_cpu(tmp_path):
    """`--quick` on CPU: reference paths only (said so), a table and a JSON file of timings."""
    out = tmp_path / "bench.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_spade_norm.py"), "--device", "cpu",
         "--quick", "--json", str(out)],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "reference paths only" in proc.stdout
    rows = json.loads(out.read_text())["rows"]
    assert rows and all(r["eager_ms"] > 0 and r["fused_ms"] is None for r in rows)
    assert {r["pass"] for r in rows} == {"fwd", "fwd+bwd"}
