"""The scales of a bench: which configurations of every model are measured, with which batch,
repeats, compilation and time budget, for a device and the ``--preset``/``--run`` options
(:func:`plan_scales`)."""

from __future__ import annotations

from dataclasses import dataclass

from edmcli.bench.measurer import Budget

__all__ = ["CPU_AUTO_PAPER", "CPU_BATCH", "Scale", "plan_scales"]

CPU_BATCH = {"paper": 1, "tiny": 4}

# Time budgets (see measurer.Budget). The CPU default must finish in minutes: at the paper's
# configurations one pixel-space NFE takes ≈ 20–30 s on two cores, so those are timed once,
# without a separate warm-up, and their γ/β-recomputed path is not timed.
# SDM's end-to-end run at a reduced NFE (reference_s) is left to the tiny sweep in the CPU auto
# mode (two paper-scale SDM steps alone take about a minute there).
CPU_AUTO_PAPER = Budget(measure_s=6.0, optional_cap_s=10.0, check_s=5.0, reference_s=0.0)
CPU_TINY = Budget(measure_s=10.0, optional_cap_s=None, check_s=15.0, reference_s=5.0)
CPU_PAPER = Budget(measure_s=60.0, optional_cap_s=None, check_s=120.0, reference_s=120.0)
CUDA_BUDGET = Budget(measure_s=10.0, optional_cap_s=None, check_s=15.0, reference_s=60.0)


@dataclass(frozen=True)
class Scale:
    """One configuration of every model: what is measured and how.

    Attributes:
        name: ``paper``, ``tiny`` or ``runs``.
        title: one line for tables and plots.
        batch: images per batch; None: per target (auto-sized on CUDA, :data:`CPU_BATCH`).
        compile: whether the compiled path is timed.
        repeats: timed repeats per measurement (cut by the budget).
        budget: the time budget of each target.
        peer: whether MONAI's UNet is compared here.
    """

    name: str
    title: str
    batch: int | None
    compile: bool
    repeats: int
    budget: Budget
    peer: bool


def plan_scales(
    device_type: str,
    preset: str,
    runs: bool,
    batch: int | None,
    repeats: int | None,
    compile: bool | None,
    peer: bool,
) -> tuple[list[Scale], list[str]]:
    """The scales to measure for these options, and the notes that explain the choices."""
    cuda = device_type == "cuda"
    notes: list[str] = []
    if compile is None:
        compile = cuda
        if not cuda:
            notes.append(
                "compilation off on the CPU by default (torch.compile takes a minute or more per "
                "network here); --compile times it (in the auto mode: on the tiny sweep only)"
            )
    if runs:
        budget = CUDA_BUDGET if cuda else CPU_PAPER
        return [Scale("runs", "trained runs", batch, compile, repeats or (5 if cuda else 3),
                      budget, peer)], notes  # fmt: skip
    if cuda:
        name = "paper" if preset == "auto" else preset
        title = f"{name} configs, batch " + (str(batch) if batch else "auto-sized")
        return [Scale(name, title, batch, compile, repeats or 5, CUDA_BUDGET, peer)], notes
    if preset == "auto":
        notes.append(
            "CPU default: the ratio table at the paper's configurations, batch 1 (one NFE of each "
            "path; big networks timed once without a separate warm-up; paths predicted to take "
            f"over {CPU_AUTO_PAPER.optional_cap_s:.0f} s per call not timed), and the NFE sweep "
            "at the tiny configurations"
        )
        paper = Scale(
            "paper",
            f"paper configs, batch {batch or CPU_BATCH['paper']} (CPU)",
            batch or CPU_BATCH["paper"],
            False,
            repeats or 2,
            CPU_AUTO_PAPER,
            peer,
        )
        tiny = Scale(
            "tiny",
            f"tiny configs, batch {batch or CPU_BATCH['tiny']} (CPU)",
            batch or CPU_BATCH["tiny"],
            compile,
            repeats or 3,
            CPU_TINY,
            peer,
        )
        return [paper, tiny], notes  # fmt: skip
    size = batch or CPU_BATCH[preset]
    budget = CPU_PAPER if preset == "paper" else CPU_TINY
    return [Scale(preset, f"{preset} configs, batch {size} (CPU)", size, compile,
                  repeats or (2 if preset == "paper" else 3), budget, peer)], notes  # fmt: skip
