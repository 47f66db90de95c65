"""The fused SPADE group norm: Triton kernels (run by Triton's CPU interpreter), custom op,
autograd, torch.compile and dispatch, all against the torch reference.

``TRITON_INTERPRET`` is read by ``triton.jit`` when a kernel is defined. These tests never set it
for the whole process: the ``interpret`` fixture sets it for one test, and
``kernels.spade_norm_op`` loads an interpreted copy of the kernel module on first use while it is
set (whatever else the process imported before), so other test modules are not affected.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton

import echo_synth_kernels as kernels
from echo_synth_kernels import spade_group_norm, spade_group_norm_reference
from echo_synth_kernels import spade_norm_op as op

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
    monkeypatch.delenv(kernels.ENV_BACKEND, raising=False)


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
    monkeypatch.setattr(interpret, "_sm_count", lambda *_: 132)
    rows, row_len = batch * 32, 6 * 64 * 64
    block, split, warps, tiles = interpret.launch_config(rows, row_len, torch.device("cuda", 0))
    assert interpret.single_config(row_len) is None  # too big for one program per group
    assert rows * split >= 4 * 132
    assert split <= tiles and tiles * block >= row_len > (tiles - 1) * block
    assert block & (block - 1) == 0 and 1 <= warps <= 8


@pytest.mark.slow
def test_compiled_kernels_build_for_sm90():
    """Without a GPU: every kernel of the module compiles for sm_90 through ptxas, in bf16 and
    fp32, and the streamed tensors are read and written with 128-bit accesses."""
    compiled = op._kernels(False)
    ptx = compiled.compile_all(arch=90)
    defined = {
        name
        for name, value in vars(compiled).items()
        if name.endswith("_kernel") and isinstance(value, triton.runtime.JITFunction)
    }
    assert {(name.split("[")[0], "bf16" in name) for name in ptx} == {
        (name, bf16) for name in defined for bf16 in (False, True)
    }
    for name, code in ptx.items():
        assert "ld.global.v4" in code, name
        if not name.startswith("_fwd_stats"):
            assert "st.global.v4" in code, name


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
