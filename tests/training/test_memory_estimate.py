"""The GPU memory estimate before a run (:mod:`edmcli.runs.memory`, issue 26): the decision as a
pure function of injected free memory, its wiring into the plans of ``train-diffusion``,
``train-vae`` and ``sample`` (CUDA simulated by a free-memory value: nothing is estimated off
CUDA), and the estimator against the measured CPU peak of the same step.

Measuring a CPU peak: ``resource.getrusage`` (max RSS) sees the whole process (Python, libraries,
freed pages kept by malloc) and only ever grows, and ``tracemalloc`` does not see torch's
allocator. ``torch.profiler`` with ``profile_memory=True`` records every allocation and free of
torch's CPU allocator (``c10``) in order, with its size: the running sum of those events is the
bytes torch holds, and its maximum is the peak — independent of the estimator, which counts
tensors on fake CUDA tensors through a dispatch mode. Tensors that exist before the measured step
(weights, EMA copy, AdamW moments) are added from their sizes. Both sides run in fp32 with the
plain torch SPADE normalisation (what a CPU runs) and the estimator without the CUDA rounding and
workspace; the estimates then agree with the measurements within 3 % (tolerance here 15 %).
"""

from __future__ import annotations

import re
from dataclasses import asdict

import pytest
import torch
from plan_stores import fake_diffusion_run, tiny_store
from typer.testing import CliRunner

from echo_synth_kernels import spade_backend
from edmcli.cli import app
from edmcli.data.labels import sector_mask
from edmcli.errors import EchoSynthError
from edmcli.models.registry import build_loss, loss_settings, precond_settings, unet_config
from edmcli.runs import memory
from edmcli.runs.diffusion_run import DiffusionSettings, build_network
from edmcli.runs.memory import (
    LiveBytes,
    MemoryEstimate,
    check_memory,
    diffusion_training_memory,
    fake_backward,
    memory_check,
    sampling_memory,
    vae_training_memory,
)
from edmcli.runs.vae_run import VAESettings
from edmcli.training.diffusion_plan import plan_train_diffusion
from edmcli.training.ema import EMA
from edmcli.training.vae_plan import plan_train_vae

GIB = 2**30
TOLERANCE = 0.15  # measured: within 3 % (tiny EDM 32² and 64², Γ-VAE 64², sampling)


# ------------------------------------------------------------------------- the pure decision
EXAMPLE = MemoryEstimate(fixed=6 * GIB, per_sample=2 * GIB, floor=0, workspace=GIB // 2)


def test_a_batch_that_fits_says_how_far_it_can_go():
    check = check_memory(EXAMPLE, 24 * GIB, 4, option="--batch-gpu", device="cuda:0")
    assert check.ok and check.needed == int(14.5 * GIB)
    # 24 GiB less 10 % = 21.6 GiB; (21.6 − 6.5) / 2 = 7.55 → 7
    assert check.fits == 7
    assert check.message.startswith("GPU memory: ≈ 14.5 GiB peak at --batch-gpu 4")
    assert "21.6 GiB usable with a 10% margin: --batch-gpu up to 7 fits" in check.message


def test_a_batch_that_cannot_fit_is_refused_with_the_largest_allowed_value():
    check = check_memory(EXAMPLE, 24 * GIB, 24, option="--batch-gpu", choices=[1, 2, 3, 4, 6,
                         8, 12, 24], rule=" (a divisor of the per-process batch 24)")  # fmt: skip
    assert not check.ok and check.fits == 6  # 7 fits, but --batch-gpu must divide 24
    assert check.message == (
        "--batch-gpu 24 needs ≈ 54.5 GiB of GPU memory (6.5 GiB fixed + 2.0 GiB per sample) but "
        "cuda has 24.0 GiB free (21.6 GiB usable with a 10% margin); lower --batch-gpu to 6 (a "
        "divisor of the per-process batch 24)"
    )


def test_the_margin_decides_at_the_edge():
    free = int(EXAMPLE.at(3) / 0.9) + 1
    assert check_memory(EXAMPLE, free, 3, option="--batch").ok
    assert not check_memory(EXAMPLE, free - 2, 3, option="--batch").ok
    assert check_memory(EXAMPLE, free - 2, 3, option="--batch", margin=0.0).ok


def test_when_not_even_one_fits_the_floor_is_named():
    estimate = MemoryEstimate(GIB, GIB // 8, floor=30 * GIB, workspace=0,
                              floor_note="the sample previews")  # fmt: skip
    check = check_memory(estimate, 24 * GIB, 2, option="--batch-gpu", choices=[1, 2])
    assert not check.ok and check.fits == 0
    assert check.message == (
        "--batch-gpu 2 needs ≈ 30.0 GiB of GPU memory (1.0 GiB fixed + 128 MiB per sample, at "
        "least 30.0 GiB for the sample previews) but cuda has 24.0 GiB free (21.6 GiB usable with "
        "a 10% margin), and even --batch-gpu 1 needs ≈ 30.0 GiB: free memory on cuda or use a "
        "GPU with more"
    )
    # the floor named where the batch asked for is beyond it but 1 is not
    big = MemoryEstimate(GIB, 30 * GIB, floor=32 * GIB, floor_note="the previews")
    assert (
        "even --batch-gpu 1 needs ≈ 32.0 GiB (the previews)"
        in check_memory(big, 24 * GIB, 2, option="--batch-gpu").message
    )


def test_small_sizes_read_in_mib():
    check = check_memory(MemoryEstimate(3 * 2**20, 2**20), 2**30, 2, option="--batch")
    assert "≈ 5 MiB peak at --batch 2 (3 MiB fixed + 1 MiB per sample)" in check.message


def test_divisors():
    assert memory.divisors(120) == [d for d in range(1, 121) if 120 % d == 0]
    assert memory.divisors(49) == [1, 7, 49] and memory.divisors(1) == [1]
    assert memory.divisors(2**62) == [2**k for k in range(17)]  # bounded, not √n steps


def test_off_cuda_nothing_is_estimated():
    def never():
        raise AssertionError("estimated off CUDA")

    assert memory_check("cpu", never, 4, option="--batch") is None


def test_an_estimate_that_fails_refuses_nothing(monkeypatch):
    monkeypatch.setattr(memory, "free_memory", lambda device: 8 * GIB)

    def broken():
        raise NotImplementedError("no fake kernel for aten::foo")

    check = memory_check("cuda:0", broken, 4, option="--batch")
    assert check.ok and "not estimated (NotImplementedError: no fake kernel" in check.message


# ------------------------------------------------------------------ the plans (CUDA simulated)
TINY = {"preset": "tiny", "device": "cpu", "batch": 4, "model_channels": 16, "steps": 2}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tiny_store(tmp_path_factory.mktemp("memory") / "s16.zarr")


def _free(monkeypatch, value: int) -> None:
    """Pretend the (CPU) device is a GPU with ``value`` bytes free."""
    monkeypatch.setattr(memory, "free_memory", lambda device: value)


def test_plans_on_a_cpu_estimate_nothing(store, tmp_path):
    plan = plan_train_diffusion("edm", store, run=tmp_path / "run", **TINY)
    assert plan.memory is None
    assert not any("GPU memory" in line for line in plan.describe())


def test_train_diffusion_says_what_fits_and_refuses_what_does_not(store, tmp_path, monkeypatch):
    _free(monkeypatch, 64 * GIB)
    options = {**TINY, "batch": 32}
    plan = plan_train_diffusion("edm", store, run=tmp_path / "run", **options)
    assert plan.memory.ok and plan.memory.batch == 32
    assert plan.describe()[-1] == plan.memory.message
    assert "--batch-gpu up to 32 fits" in plan.memory.message  # the divisors of the batch 32
    estimate = diffusion_training_memory(plan.settings)
    assert estimate.at(32) > estimate.floor + estimate.workspace  # the activations decide
    _free(monkeypatch, int((estimate.at(16) + 4 * estimate.per_sample) / 0.9))  # 20 would fit
    with pytest.raises(EchoSynthError) as info:
        plan_train_diffusion("edm", store, run=tmp_path / "run", **options)
    assert str(info.value).startswith("--batch-gpu 32 needs ≈ ")
    assert str(info.value).endswith(
        "lower --batch-gpu to 16 (a divisor of the per-process batch 32; gradient accumulation "
        "keeps it)"
    )
    plan = plan_train_diffusion("edm", store, run=tmp_path / "run", batch_gpu=16, **options)
    assert plan.memory.ok and "--batch-gpu up to 16 fits" in plan.memory.message


def test_the_stage_prints_the_estimate_before_it_trains(store, tmp_path, monkeypatch, capsys):
    from edmcli.training.diffusion import train_diffusion

    _free(monkeypatch, 64 * GIB)
    train_diffusion("edm", store, run=tmp_path / "run", **{**TINY, "batch": 2})
    out = capsys.readouterr().out
    assert out.index("GPU memory: ≈ ") < out.index("training edm")


def test_train_vae_refuses_what_does_not_fit(store, tmp_path, monkeypatch):
    _free(monkeypatch, 2**20)
    with pytest.raises(EchoSynthError, match=r"^--batch-gpu 4 needs ≈ .* and even --batch-gpu 1"):
        plan_train_vae(store, 64, run=tmp_path / "vae", preset="tiny", device="cpu", batch=4,
                       base_channels=8, steps=2)  # fmt: skip


def test_sample_prints_its_estimate_and_refuses_a_batch_that_cannot_fit(
    store, tmp_path, monkeypatch, capsys
):
    from edmcli.sampling.sample_plan import plan_sample

    unet = asdict(unet_config("edm", "tiny", 16, model_channels=16))
    run = fake_diffusion_run(tmp_path / "runs", "edm", data=store, model="edm", image_size=16,
                             net_size=16, unet=unet, precond=precond_settings("edm"))  # fmt: skip
    options = {"run": run, "device": "cpu", "batch": 8, "chunk": 8, "out": tmp_path / "o.zarr"}
    _free(monkeypatch, 64 * GIB)
    plan_sample(**options)
    assert "GPU memory: ≈ " in capsys.readouterr().out
    _free(monkeypatch, 2**20)
    with pytest.raises(EchoSynthError, match=r"^--batch 8 needs ≈ .* and even --batch 1 needs"):
        plan_sample(**options)


def test_the_command_refuses_in_one_line_with_exit_2(store, tmp_path, monkeypatch):
    _free(monkeypatch, 2**20)
    args = ["train-diffusion", "--model", "edm", "--data", str(store), "--run",
            str(tmp_path / "run"), "--preset", "tiny", "--device", "cpu", "--batch", "4",
            "--model-channels", "16", "--steps", "2"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and re.match(r"error: --batch-gpu 4 needs ≈ .* GPU memory", lines[0])
    assert not (tmp_path / "run").exists()


# -------------------------------------------------------------------------- the counting
def _settings(model: str, size: int) -> DiffusionSettings:
    precond = precond_settings(model)
    config = unet_config(model, "tiny", size, precond=precond)
    return DiffusionSettings(model=model, data="", preset="tiny", image_size=size,
                             net_size=size, unet=asdict(config), precond=precond)  # fmt: skip


def test_the_replica_engine_frees_what_torchs_engine_frees():
    """:func:`fake_backward` against ``loss.backward()`` on meta tensors: the same running peak
    (up to a few scalars) and end (saved tensors released as the engine releases them),
    gradients on every weight."""
    settings = _settings("edm", 16)
    results = []
    for replica in (False, True):
        with LiveBytes(block=1) as live:
            with torch.device("meta"):
                net = build_network(settings)
            loss_fn = build_loss("edm", **loss_settings("edm", settings.precond))
            labels = torch.zeros(2, 16, 16, dtype=torch.long, device="meta")
            image = torch.empty(2, 1, 16, 16, device="meta")
            loss, _ = loss_fn(net, image, labels, sector_mask(labels))
            if replica:
                holder = [loss]
                del loss
                fake_backward(holder)
            else:
                loss.backward()
                del loss
            assert all(p.grad is not None for p in net.parameters())
            results.append((live.peak, live.current))
    (peak, end), (replica_peak, replica_end) = results
    assert replica_end == end and replica_peak == pytest.approx(peak, abs=1024)  # a few scalars


def test_the_replica_engine_runs_the_fused_spade_op_on_fake_cuda_tensors():
    """On the fake GPU the SPADE norm is the fused custom op (a Python autograd node): every
    weight still gets a gradient of its own shape and dtype, and the loss is bf16-autocast."""
    from edmcli.runs.memory import _autocast, _fake_cuda, _on_device

    settings = _settings("edm", 16)
    with torch.device("meta"):
        net = build_network(settings)
    loss_fn = build_loss("edm", **loss_settings("edm", settings.precond))
    with _fake_cuda(block=512), spade_backend("auto"):
        net = _on_device(net)
        labels = torch.zeros(2, 16, 16, dtype=torch.long, device="cuda")
        with _autocast(torch.bfloat16):
            loss, _ = loss_fn(net, torch.empty(2, 1, 16, 16, device="cuda"), labels,
                              sector_mask(labels))  # fmt: skip
        holder = [loss]
        del loss
        fake_backward(holder)
        for p in net.parameters():
            assert p.grad is not None and p.grad.shape == p.shape and p.grad.dtype == p.dtype


def _allocations(prof) -> list[tuple[int, int]]:
    found = []

    def walk(node):
        if type(node.extra_fields).__name__ == "_ExtraFields_Allocation":
            found.append((node.start_time_ns, node.extra_fields.alloc_size))
        for child in node.children:
            walk(child)

    for node in prof.profiler.kineto_results.experimental_event_tree():
        walk(node)
    return sorted(found)


def measured_peak(step) -> int:
    """Peak bytes torch's CPU allocator holds while ``step()`` runs, over what it held before:
    the running sum of the profiler's allocation (+) and free (−) events, in order."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    current = peak = 0
    for _, size in _allocations(prof):
        current += size
        peak = max(peak, current)
    return peak


def _bytes(tensors) -> int:
    return sum(t.untyped_storage().nbytes() for t in tensors)


def _engine_state(model) -> list[torch.Tensor]:
    """What the engine holds between steps: the weights, the EMA copy and AdamW's moments (one
    step taken so they exist), gradients freed."""
    ema = EMA(model, 0.9)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    held = [*model.parameters(), *model.buffers(), *ema.model.parameters(), *ema.model.buffers()]
    return held + [t for state in optimizer.state.values() for t in state.values() if t.ndim]


@pytest.mark.parametrize("size", [32, 64])
def test_training_estimate_matches_the_measured_cpu_peak(size):
    """A steady-state step of the engine (weights, EMA copy, AdamW moments in place; the loss,
    backward, gradients) at batch 4 on the CPU against the estimate at batch 4."""
    settings, batch = _settings("edm", size), 4
    with spade_backend("torch"):
        estimate = diffusion_training_memory(settings, precision="fp32", block=1, workspace=0)
    torch.manual_seed(0)
    model = build_network(settings).train()
    held = _engine_state(model)
    loss_fn = build_loss("edm", **loss_settings("edm", settings.precond))

    def step():
        image = torch.rand(batch, 1, size, size)
        labels = torch.randint(0, 5, (batch, size, size))
        loss, _ = loss_fn(model, image * 2 - 1, labels, sector_mask(labels))
        loss.backward()

    measured = _bytes(held) + measured_peak(step)
    estimated = estimate.fixed + estimate.per_sample * batch
    assert estimated == pytest.approx(measured, rel=TOLERANCE)


@pytest.mark.parametrize("size", [32, 64])
def test_sampling_estimate_matches_the_measured_cpu_peak(size):
    """``generate`` (Heun, 2 steps, the SPADE γ/β cache) on the CPU at batch 4."""
    from edmcli.sampling.pipeline import generate

    settings, batch = _settings("edm", size), 4
    with spade_backend("torch"):
        estimate = sampling_memory(settings, precision="fp32", block=1, workspace=0)
    net = build_network(settings).eval().requires_grad_(False)
    labels = torch.randint(0, 5, (batch, size, size))

    def step():
        generate(net, "edm", labels, range(batch), size, solver="heun", steps=2)

    measured = _bytes([*net.parameters(), *net.buffers(), labels]) + measured_peak(step)
    assert estimate.at(batch) == pytest.approx(measured, rel=TOLERANCE)


def test_vae_training_estimate_matches_the_measured_cpu_peak():
    from edmcli.models.gamma_vae import GammaVAE
    from edmcli.models.vae_loss import GammaVAELoss

    settings = VAESettings(data="", latent=64, image_size=64, base_channels=16,
                           num_res_blocks=1, norm_groups=8, perceptual="none")  # fmt: skip
    batch = 4
    estimate = vae_training_memory(settings, precision="fp32", block=1, workspace=0)
    model = GammaVAE(settings.model_config()).train()
    held = _engine_state(model)
    loss_fn = GammaVAELoss(warmup_epochs=0)

    def step():
        image = torch.rand(batch, 1, 64, 64)
        sector = torch.ones_like(image)
        loss_fn(image, sector, model(image, sector, sample=True), epoch=0)["total"].backward()

    measured = _bytes(held) + measured_peak(step)
    estimated = estimate.fixed + estimate.per_sample * batch
    assert estimated == pytest.approx(measured, rel=TOLERANCE)


def test_cuda_paths_cost_less_than_fp32():
    """On the (fake) GPU: bf16 autocast and the fused SPADE op keep fewer bytes per image than
    fp32; the fixed part holds at least weights, EMA copy, AdamW moments and gradients."""
    settings = _settings("edm", 32)
    bf16 = diffusion_training_memory(settings, block=1, workspace=0)
    fp32 = diffusion_training_memory(settings, precision="fp32", block=1, workspace=0)
    assert 0.5 * fp32.per_sample < bf16.per_sample < 0.95 * fp32.per_sample
    weights = _bytes(build_network(settings).parameters())
    assert 4 * weights <= bf16.fixed < 6 * weights
    assert bf16.floor >= 6 * weights  # AdamW's step: weights, EMA, 2 moments, grads, sqrt(v)
