"""``echo-synth bench``, planned: every check and every default of a bench, no measuring.

:func:`plan_bench` takes the arguments of :func:`edmcli.bench.bench.bench` and returns a
:class:`BenchPlan`: the models (or trained runs), the NFEs, the device and precision, the scales
with their batch, repeats, compilation and time budget (:func:`~edmcli.bench.scales.plan_scales`),
the notes that explain those choices, and the evaluation reports of the frontier plot. Every
refusal of the command is raised here, in the order the command always made them; no network is
built and nothing is timed or written.

Planning reads the ``--reports`` files and the ``--run`` folders' ``config.yaml``. It imports
torch (the device check, the model registry and the run finder do).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from edmcli.bench.plot import read_reports
from edmcli.bench.scales import Scale, plan_scales
from edmcli.errors import EchoSynthError
from edmcli.models.registry import model_names, paper_reference
from edmcli.runs.diffusion_run import check_model_name, resolve_run
from edmcli.runs.distributed import resolve_device
from edmcli.runs.output_folder import check_output_folder
from edmcli.settings import generator_recipe

__all__ = [
    "DEFAULT_NFES",
    "DTYPE_CHOICES",
    "PRESET_CHOICES",
    "BenchPlan",
    "parse_models",
    "parse_nfes",
    "plan_bench",
]

DEFAULT_NFES = (1, 2, 5, 10, 20, 50, 100, 200)
PRESET_CHOICES = ("auto", "tiny", "paper")
DTYPE_CHOICES = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class BenchPlan:
    """Everything a bench will measure, checked (:func:`plan_bench`)."""

    models: tuple[str, ...]  # registry names measured at the presets (none with ``runs``)
    preset: str
    runs: tuple[Path, ...]  # trained diffusion runs measured instead of the presets
    nfes: tuple[int, ...]
    batch: int | None  # as asked (None: per scale and target)
    repeats: int | None
    compile: bool | None
    peer: bool
    dtype: str
    device: torch.device  # resolved
    autocast: torch.dtype | None  # bf16 autocast, or None: fp32
    out: Path
    scales: tuple[Scale, ...]
    notes: tuple[str, ...]
    reports: tuple[dict[str, Any], ...]  # evaluation reports of the frontier plot
    log: Callable[[str], None] | None = field(default=None, compare=False, repr=False)
    matched_batch: int | None = None  # as asked (None: the smallest batch that fits, per scale)
    generator: str | None = None  # a recipe whose Γ-VAE the latent presets are measured with too

    def describe(self) -> list[str]:
        """Short lines for people (``study --dry-run``)."""
        what = (
            f"runs {', '.join(str(p) for p in self.runs)}"
            if self.runs
            else f"models {', '.join(self.models)}"
        )
        lines = [
            f"bench {what} on {self.device}, {'bf16' if self.autocast else 'fp32'}",
            f"NFEs {', '.join(str(n) for n in self.nfes)}",
        ]
        for scale in self.scales:
            lines.append(
                f"{scale.title}: {scale.repeats} repeats, "
                f"{'compiled and eager' if scale.compile else 'eager'}"
                + (", MONAI peer" if scale.peer else "")
            )
        lines.append(
            "ratios between models at the batch that fits each and at "
            + (f"matched batch {self.matched_batch}" if self.matched_batch
               else "a matched batch (the smallest that fits)")
        )  # fmt: skip
        lines.extend(f"note: {note}" for note in self.notes)
        lines.append(
            f"→ {self.out} (bench.json, throughput.png"
            + (f", frontier.png of {len(self.reports)} reports" if self.reports else "")
            + ")"
        )
        return lines


def _split(values: Sequence[str] | None) -> list[str]:
    return [part.strip() for value in values or () for part in str(value).split(",")
            if part.strip()]  # fmt: skip


def parse_models(values: Sequence[str] | None) -> list[str]:
    """``--models`` (repeatable, comma lists) → registry names, in order, each once."""
    names = _split(values) or list(model_names())
    for name in names:
        check_model_name(name)
    return list(dict.fromkeys(names))


def parse_nfes(values: Sequence[str | int] | None) -> list[int]:
    """``--nfe`` (repeatable, comma lists) → sorted distinct integers ≥ 1."""
    if not values:
        return list(DEFAULT_NFES)
    out = []
    for part in _split([str(v) for v in values]):
        try:
            nfe = int(part)
        except ValueError:
            raise EchoSynthError(f"--nfe {part!r} is not an integer") from None
        if nfe < 1:
            raise EchoSynthError(f"--nfe {nfe} must be at least 1 (network evaluations)")
        out.append(nfe)
    return sorted(set(out))


def plan_bench(
    models: Sequence[str] | None = None,
    preset: str = "auto",
    run: Sequence[Path] | None = None,
    nfe: Sequence[str | int] | None = None,
    batch: int | None = None,
    repeats: int | None = None,
    compile: bool | None = None,
    peer: bool = True,
    dtype: str = "auto",
    device: str = "auto",
    out: Path = Path("bench"),
    reports: Sequence[Path] | None = None,
    log: Callable[[str], None] | None = None,
    matched_batch: int | None = None,
    generator: str | None = None,
) -> BenchPlan:
    """The checked plan of :func:`edmcli.bench.bench.bench` with these arguments (see there);
    raises its refusals (:class:`~edmcli.errors.EchoSynthError`, naming the option), writes
    nothing."""
    if preset not in PRESET_CHOICES:
        raise EchoSynthError(f"--preset {preset!r}: choose from {', '.join(PRESET_CHOICES)}")
    if dtype not in DTYPE_CHOICES:
        raise EchoSynthError(f"--dtype {dtype!r}: choose from {', '.join(DTYPE_CHOICES)}")
    if batch is not None and batch < 1:
        raise EchoSynthError(f"--batch {batch} must be at least 1")
    if matched_batch is not None and matched_batch < 1:
        raise EchoSynthError(f"--matched-batch {matched_batch} must be at least 1")
    if repeats is not None and repeats < 1:
        raise EchoSynthError(f"--repeats {repeats} must be at least 1")
    runs = list(run or [])
    if generator is not None:
        generator_recipe(generator)  # one sentence for an unknown recipe
        if runs:
            raise EchoSynthError("--generator and --run: a run has its own Γ-VAE; give one")
    if runs and models:
        raise EchoSynthError("--models and --run: give one or the other (a run names its model)")
    names = [] if runs else parse_models(models)
    nfes = parse_nfes(nfe)
    report_data = read_reports(list(reports or []))
    out = Path(out)
    check_output_folder(out, "bench")
    dev = resolve_device(device)
    if runs:
        for path in runs:
            resolve_run(None, path, Path("runs"))
    autocast = (
        torch.bfloat16 if dtype == "bf16" or (dtype == "auto" and dev.type == "cuda") else None
    )

    scales, notes = plan_scales(dev.type, preset, bool(runs), batch, repeats, compile, peer)
    notes.insert(0, "weights are random for the presets: speed does not depend on them")
    reference = paper_reference()
    ref_nfe = reference.paper_reference_nfe
    notes.append(f"{reference.name} at {ref_nfe} NFE is predicted by its cost model (never run "
                 f"for {ref_nfe} NFE here; run end to end at a reduced NFE to check the "
                 "prediction)")  # fmt: skip
    return BenchPlan(
        models=tuple(names), preset=preset, runs=tuple(runs), nfes=tuple(nfes), batch=batch,
        repeats=repeats, compile=compile, peer=peer, dtype=dtype, device=dev,
        autocast=autocast, out=out, scales=tuple(scales), notes=tuple(notes),
        reports=tuple(report_data), log=log, matched_batch=matched_batch, generator=generator,
    )  # fmt: skip
