"""``echo-synth``: the command line. Each command parses its options, calls one stage, prints."""

from __future__ import annotations

import enum
import functools
import inspect
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from edmcli.config import ConfigOption
from edmcli.console import console, err_console, quiet_third_party_logs
from edmcli.errors import EchoSynthError

quiet_third_party_logs()

app = typer.Typer(
    name="echo-synth",
    help="Semantic diffusion models that synthesise echocardiograms from label maps, and the "
    "downstream evaluation of the synthetic data.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


# Options shared by the training commands (the engine's settings); None: the preset decides.
BatchOpt = Annotated[int | None, typer.Option(help="Global batch size.")]
BatchGpuOpt = Annotated[
    int | None, typer.Option(help="Per-process micro-batch (gradient accumulation).")
]
LrOpt = Annotated[float | None, typer.Option(help="AdamW learning rate.")]
EmaOpt = Annotated[float | None, typer.Option(help="EMA decay per step.")]
CheckpointEveryOpt = Annotated[int | None, typer.Option(help="Steps between checkpoints.")]
LogEveryOpt = Annotated[int | None, typer.Option(help="Steps between log lines.")]
GridEveryOpt = Annotated[int | None, typer.Option(help="Steps between image grids.")]
WorkersOpt = Annotated[int | None, typer.Option(help="DataLoader workers.")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
SeedOpt = Annotated[int, typer.Option(help="Seed.")]


ThreadsOpt = Annotated[
    int | None,
    typer.Option(
        envvar="ECHO_SYNTH_THREADS",
        help="CPU threads for torch (default: every core this process may use; one line warns "
        "when other processes already load them).",
    ),
]


def user_errors(fn):
    """Turn EchoSynthError (and a file-system refusal: permission, a file where a folder is
    needed, a full disk) into one line on stderr and exit code 2; Ctrl-C into exit 130.

    Every command so wrapped also takes ``--threads N`` (:func:`edmcli.threads.configure_threads`
    runs before the command's work)."""

    @functools.wraps(fn)
    def wrapper(*args, threads: int | None = None, **kwargs):
        try:
            _set_threads(threads)
            return fn(*args, **kwargs)
        except EchoSynthError as exc:
            _error_line(str(exc))
            raise typer.Exit(exc.exit_code) from None
        except OSError as exc:
            _error_line(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc))
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("interrupted", highlight=False)
            raise typer.Exit(130) from None

    signature = inspect.signature(fn, eval_str=True)
    extra = inspect.Parameter(
        "threads", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=ThreadsOpt
    )
    wrapper.__signature__ = signature.replace(parameters=[*signature.parameters.values(), extra])
    wrapper.__annotations__ = {**fn.__annotations__, "threads": ThreadsOpt}
    return wrapper


def _set_threads(threads: int | None) -> None:
    from edmcli.threads import configure_threads

    plan = configure_threads(threads)
    if plan.warning:
        err_console.print(f"warning: {plan.warning}", highlight=False, markup=False)


def _error_line(message: str) -> None:
    """``error: MESSAGE`` on stderr, the message printed as it is (no rich markup)."""
    from rich.markup import escape

    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


def _options(values: dict[str, Any], *drop: str) -> dict[str, Any]:
    """A command's parsed options as the stage function's keyword arguments: the one path from
    flags (and ``--config`` YAML, which arrives as the options' defaults) to settings. Enums
    become their values; ``config`` and ``drop`` are left out."""
    skip = {"config", *drop}
    return {
        k: v.value if isinstance(v, enum.Enum) else v for k, v in values.items() if k not in skip
    }


class SourceKind(str, enum.Enum):
    phantom = "phantom"
    camus = "camus"
    folder = "folder"


@app.command()
@user_errors
def prepare(
    out: Annotated[Path, typer.Option("--out", help="Dataset store to write (a .zarr folder).")],
    source: Annotated[SourceKind, typer.Option(help="Where the images come from.")] = (
        SourceKind.phantom
    ),
    size: Annotated[int, typer.Option(help="Output image size (square).")] = 256,
    n_patients: Annotated[int, typer.Option(help="Phantom: number of patients.")] = 50,
    seed: Annotated[int, typer.Option(help="Seed of the phantom and of the split.")] = 0,
    split_ratio: Annotated[
        str, typer.Option(help="train:val:test patient ratio when the source has no split.")
    ] = "8:1:1",
    camus_dir: Annotated[
        Path | None, typer.Option(help="CAMUS: the folder holding database_nifti/ or training/.")
    ] = None,
    folder: Annotated[Path | None, typer.Option(help="Folder source: its root.")] = None,
    image_glob: Annotated[str, typer.Option(help="Folder: images, relative glob.")] = (
        "images/*.png"
    ),
    label_template: Annotated[
        str, typer.Option(help="Folder: label path for an image, {stem} = its name.")
    ] = "labels/{stem}.png",
    meta_pattern: Annotated[
        str | None,
        typer.Option(help="Folder: regex with groups patient/view/phase matched on the stem."),
    ] = None,
    keep_aspect: Annotated[
        bool, typer.Option(help="Pad to a square before resizing (keeps geometry).")
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing store.")] = False,
    config: ConfigOption = None,
) -> None:
    """Build a dataset store from phantom data, a CAMUS copy or a folder of image/label pairs."""
    options = _options(locals())
    from edmcli.data.prepare import prepare as stage
    from edmcli.runs.lock import store_lock

    with store_lock(out):
        result = stage(**options)
    for line in result.skipped:
        console.print(f"skipped {line}", highlight=False)
    counts = ", ".join(f"{k} {v}" for k, v in result.split_counts.items())
    console.print(
        f"wrote {result.path}: {result.samples} images of {result.patients} patients "
        f"({result.layout}, {size}×{size}; {counts})",
        highlight=False,
    )


@app.command()
@user_errors
def info(
    store: Annotated[Path, typer.Argument(help="A dataset store.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify",
            help="Read every chunk file and compare the checksums recorded when the store was "
            "written.",
        ),
    ] = False,
) -> None:
    """Summarise a dataset store: counts per split/view/phase, labels, size, provenance."""
    from edmcli.data.store import DatasetStore

    reader = DatasetStore(store)
    summary = reader.summary()
    if verify:
        summary["verify"] = reader.verify_report()
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    from rich.table import Table

    console.print(
        f"[bold]{summary['path']}[/]: {summary['samples']} images, "
        f"{summary['image_size'][0]}×{summary['image_size'][1]}, "
        f"{summary['bytes_on_disk'] / 2**20:.1f} MiB on disk"
    )
    table = Table("split", "patients", "images", *_view_phase_columns(summary))
    for split, row in summary["splits"].items():
        table.add_row(
            split,
            str(row["patients"]),
            str(row["samples"]),
            *(str(row.get(c, 0)) for c in _view_phase_columns(summary)),
        )
    console.print(table)
    fractions = ", ".join(f"{k} {v:.1%}" for k, v in summary["label_fraction"].items())
    console.print(f"labels: {fractions}", highlight=False)
    console.print(f"fields: {', '.join(summary['fields'])}", highlight=False)
    provenance = json.dumps(summary["provenance"], sort_keys=True)
    console.print(
        f"provenance: {provenance} (echo-synth {summary['code_version']}, {summary['created']})",
        highlight=False,
        soft_wrap=True,
    )
    if verify:
        console.print(f"verify: {summary['verify']}", highlight=False)


class Precision(str, enum.Enum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


PrecisionOpt = Annotated[Precision, typer.Option(help="auto: bf16 on CUDA, fp32 on CPU.")]
RunOption = typer.Option(
    "--run",
    "--run-dir",
    help="Run folder (default runs/<model>).",
)


@app.command("train-vae")
@user_errors
def train_vae(
    data: Annotated[Path, typer.Option(help="Dataset store (its train split trains).")],
    latent: Annotated[int, typer.Option(help="64 (EDM-L64, 4× down) or 128 (EDM-L128, 2× down).")],
    run: Annotated[Path | None, RunOption] = None,
    preset: Annotated[str, typer.Option(help="paper or tiny (CPU minutes on 64² phantom).")] = (
        "paper"
    ),
    epochs: Annotated[int | None, typer.Option(help="Training epochs.")] = None,
    steps: Annotated[int | None, typer.Option(help="Optimiser steps (overrides --epochs).")] = None,
    batch: BatchOpt = None,
    batch_gpu: BatchGpuOpt = None,
    lr: LrOpt = None,
    perceptual: Annotated[
        str | None, typer.Option(help="lpips (AlexNet), lpips-vgg, or none.")
    ] = None,
    kl_direction: Annotated[
        str | None, typer.Option(help="posterior-first (ELBO) or prior-first (eq. 5 as printed).")
    ] = None,
    prior_shape: Annotated[float | None, typer.Option(help="Gamma prior shape α.")] = None,
    prior_rate: Annotated[float | None, typer.Option(help="Gamma prior rate β.")] = None,
    base_channels: Annotated[int | None, typer.Option(help="Channels of level 1.")] = None,
    w_recon: Annotated[float | None, typer.Option(help="λ1, image L2.")] = None,
    w_perceptual: Annotated[float | None, typer.Option(help="λ2, LPIPS.")] = None,
    w_kl: Annotated[float | None, typer.Option(help="λ3, KL.")] = None,
    w_latent: Annotated[float | None, typer.Option(help="λ4, latent L2.")] = None,
    augment: Annotated[bool | None, typer.Option(help="Geometric + intensity augmentation.")] = (
        None
    ),
    ema_decay: EmaOpt = None,
    checkpoint_every: CheckpointEveryOpt = None,
    log_every: LogEveryOpt = None,
    grid_every: GridEveryOpt = None,
    num_workers: WorkersOpt = None,
    precision: PrecisionOpt = Precision.auto,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    config: ConfigOption = None,
) -> None:
    """Train the Γ-VAE of the latent models; rerun the same command to resume."""
    options = _options(locals())
    from edmcli.training.vae import train_vae as stage

    stage(**options)


@app.command("train-diffusion")
@user_errors
def train_diffusion(
    model: Annotated[str, typer.Option(help="sdm, edm, ve, vp, edm-l128 or edm-l64.")],
    data: Annotated[Path, typer.Option(help="Dataset store (its train split trains).")],
    vae: Annotated[Path | None, typer.Option(help="Γ-VAE run (latent models).")] = None,
    run: Annotated[Path | None, RunOption] = None,
    preset: Annotated[str, typer.Option(help="paper or tiny (CPU minutes).")] = "paper",
    steps: Annotated[int | None, typer.Option(help="Optimiser steps (overrides --kimg).")] = None,
    kimg: Annotated[float | None, typer.Option(help="Training length in 1000s of images.")] = (
        None
    ),
    batch: BatchOpt = None,
    batch_gpu: BatchGpuOpt = None,
    lr: LrOpt = None,
    dropout: Annotated[float | None, typer.Option(help="UNet dropout.")] = None,
    spade_placement: Annotated[
        str | None, typer.Option(help="decoder (as the authors) or all.")
    ] = None,
    model_channels: Annotated[int | None, typer.Option(help="UNet base channels.")] = None,
    noise_schedule: Annotated[
        str | None, typer.Option(help="sdm: cosine (published, default) or linear β.")
    ] = None,
    learn_sigma: Annotated[
        bool | None,
        typer.Option(help="sdm: learned variance + hybrid loss (published, default) or fixed."),
    ] = None,
    clip_denoised: Annotated[
        bool | None, typer.Option(help="sdm: clip x₀ to [−1, 1] while sampling (default on).")
    ] = None,
    sigma_data: Annotated[
        float | None,
        typer.Option(
            help="EDM σ_data (default 0.5; latent models: the std of the Γ-VAE's training "
            "latents, measured by train-vae)."
        ),
    ] = None,
    augment: Annotated[bool | None, typer.Option(help="Geometric augmentation.")] = None,
    class_cond: Annotated[
        str | None,
        typer.Option(
            help="Condition on the image's view (view), view and phase (view-phase), or not "
            "(none: the paper's map-only model, default); trained with classifier-free guidance "
            "dropout 0.1."
        ),
    ] = None,
    ema_decay: EmaOpt = None,
    checkpoint_every: CheckpointEveryOpt = None,
    log_every: LogEveryOpt = None,
    grid_every: GridEveryOpt = None,
    validate_every: Annotated[
        int | None, typer.Option(help="Steps between denoising checks.")
    ] = None,
    num_workers: WorkersOpt = None,
    precision: PrecisionOpt = Precision.auto,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    config: ConfigOption = None,
) -> None:
    """Train a SPADE diffusion model; rerun the same command to resume."""
    options = _options(locals())
    from edmcli.sampling.preview import preview_samples
    from edmcli.training.diffusion import train_diffusion as stage

    stage(**options, preview=preview_samples)


@app.command()
@user_errors
def sample(
    model: Annotated[
        str | None,
        typer.Option(help="sdm, edm, ve, vp, edm-l128 or edm-l64 (default: the --run's model)."),
    ] = None,
    run: Annotated[Path | None, RunOption] = None,
    runs_root: Annotated[Path, typer.Option(help="Where --model looks for runs/<model>.")] = Path(
        "runs"
    ),
    labels: Annotated[
        Path | None, typer.Option(help="Store of label maps (default: the run's training store).")
    ] = None,
    splits: Annotated[str, typer.Option(help="Comma-separated splits of the label store.")] = (
        "train,val"
    ),
    k: Annotated[int, typer.Option("--k", help="Random transformations per label map.")] = 5,
    n: Annotated[int | None, typer.Option(help="At most this many samples.")] = None,
    nfe: Annotated[
        int | None,
        typer.Option(help="Network evaluations per sample (default 1000 for sdm, else 35)."),
    ] = None,
    solver: Annotated[
        str | None,
        typer.Option(help="heun, euler, dpmpp_2m, ddim or ddpm_ancestral (default per model)."),
    ] = None,
    churn: Annotated[float, typer.Option(help="Heun S_churn (0: deterministic).")] = 0.0,
    seed: Annotated[int, typer.Option(help="Global seed; sample i uses (seed, i).")] = 0,
    batch: Annotated[int, typer.Option(help="Samples per network call.")] = 16,
    chunk: Annotated[int, typer.Option(help="Samples per store shard (unit of resume).")] = 64,
    compile: Annotated[bool, typer.Option(help="torch.compile the denoiser.")] = True,
    spade_cache: Annotated[bool, typer.Option(help="Compute SPADE γ/β once per batch.")] = True,
    schedule: Annotated[
        str | None,
        typer.Option(help="σ schedule: edm (ρ = 7), ve, vp or ddpm (default: the model's)."),
    ] = None,
    pin_outside: Annotated[
        bool,
        typer.Option(help="Reset the denoised estimate outside the sector to −1 at every step."),
    ] = False,
    guidance: Annotated[
        float | None,
        typer.Option(
            help="Classifier-free guidance scale w of a model trained with --class-cond (default "
            "1: conditional only). w ≠ 0, 1 evaluates the network twice per step, and --nfe "
            "counts both."
        ),
    ] = None,
    holdout: Annotated[
        float,
        typer.Option(
            help="Fraction of source patients whose samples form split 'val' (a synthetic "
            "validation set for evaluate --checkpoint synthetic); 0: every sample trains."
        ),
    ] = 0.0,
    out: Annotated[
        Path | None, typer.Option(help="Output store (default synthetic/<model>-nfe<NFE>.zarr).")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an output store of another config.")] = (
        False
    ),
    precision: PrecisionOpt = Precision.auto,
    device: DeviceOpt = "auto",
    config: ConfigOption = None,
) -> None:
    """Generate a synthetic dataset store from label maps with a trained model."""
    options = _options(locals())
    from edmcli.sampling.sample import sample as stage

    stage(**options)


class LrScheduleChoice(str, enum.Enum):
    constant = "constant"
    cosine = "cosine"
    plateau = "plateau"


class TaskChoice(str, enum.Enum):
    seg = "seg"
    cls = "cls"
    both = "both"


class PresetChoice(str, enum.Enum):
    paper = "paper"
    tiny = "tiny"


class CheckpointChoice(str, enum.Enum):
    real = "real"
    synthetic = "synthetic"
    last = "last"


@app.command()
@user_errors
def evaluate(
    train: Annotated[
        list[str],
        typer.Option(
            "--train",
            help="Dataset store whose train split trains one run; repeat for several runs "
            "(one per synthetic dataset, and the real store for the reference line); "
            "'a.zarr,b.zarr' trains one run on the union.",
        ),
    ],
    test: Annotated[
        Path, typer.Option("--test", help="Real dataset store; its test split is scored.")
    ],
    out: Annotated[
        Path, typer.Option("--out", help="Folder for the runs, report.json/.md and plots.")
    ] = Path("evaluation"),
    preset: Annotated[
        PresetChoice,
        typer.Option(
            help="paper (256², to convergence, at most 250 epochs) or tiny (CPU minutes, 64²)."
        ),
    ] = PresetChoice.paper,
    task: Annotated[
        TaskChoice, typer.Option(help="seg (DynUNet), cls (EfficientNetV2-S A2C/A4C) or both.")
    ] = TaskChoice.both,
    size: Annotated[int | None, typer.Option(help="Network input side (resamples).")] = None,
    steps: Annotated[int | None, typer.Option(help="Optimiser steps per run.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs per run (if no --steps).")] = None,
    batch: BatchOpt = None,
    lr: Annotated[float | None, typer.Option(help="Adam(W) learning rate.")] = None,
    ema_decay: Annotated[float | None, typer.Option(help="EMA decay (0: none).")] = None,
    validate_every: Annotated[
        int | None, typer.Option(help="Steps between validations (best checkpoint).")
    ] = None,
    patience: Annotated[
        int | None,
        typer.Option(help="Stop a run after this many validations in a row without improvement."),
    ] = None,
    min_delta: Annotated[
        float | None, typer.Option(help="Smallest validation gain that counts as improvement.")
    ] = None,
    min_steps: Annotated[
        int | None, typer.Option(help="Steps before validations count towards --patience.")
    ] = None,
    lr_schedule: Annotated[
        LrScheduleChoice | None,
        typer.Option(help="After the warm-up: constant, cosine, or plateau (cut on a plateau)."),
    ] = None,
    deep_supervision: Annotated[
        bool | None, typer.Option(help="DynUNet deep-supervision heads.")
    ] = None,
    augment: Annotated[
        bool | None, typer.Option(help="Geometric + intensity augmentation.")
    ] = None,
    num_workers: WorkersOpt = None,
    checkpoint: Annotated[
        CheckpointChoice,
        typer.Option(
            help="Which checkpoint of each run is tested: real (best on real validation images: "
            "--val, else a real --train store's val split, else the test store's), synthetic "
            "(best on the run's own val split: sample --holdout), or last."
        ),
    ] = CheckpointChoice.real,
    val: Annotated[
        Path | None,
        typer.Option(help="Real store whose val split picks the checkpoints (--checkpoint real)."),
    ] = None,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap iterations.")] = 1000,
    bootstrap_fraction: Annotated[
        float, typer.Option(help="Fraction of the test set per bootstrap subset.")
    ] = 0.8,
    precision: PrecisionOpt = Precision.auto,
    device: DeviceOpt = "auto",
    seed: Annotated[int, typer.Option(help="Seed of training and of the bootstrap.")] = 0,
    fidelity: Annotated[
        bool,
        typer.Option(
            help="Also judge each synthetic store in seconds with the real-trained networks "
            "(label fidelity, accuracy on synthetic, FD/KID/PRDC, diversity) and, with 3 or "
            "more, rank each metric against the downstream Dice and accuracy.",
        ),
    ] = False,
    config: ConfigOption = None,
) -> None:
    """Train a segmenter and a view classifier on each --train store and score them on the
    held-out real --test split; write report.json, report.md and plots. Rerun to resume."""
    options = _options(locals(), "train", "test", "out", "preset", "task", "bootstrap",
                       "bootstrap_fraction", "precision", "device", "seed", "checkpoint",
                       "val", "fidelity")  # fmt: skip
    from edmcli.evaluation.evaluate import evaluate as stage

    stage(
        train, test, out, preset.value, ["seg", "cls"] if task is TaskChoice.both else [task.value],
        options, device=device, seed=seed, precision=precision.value,
        bootstrap_iterations=bootstrap, bootstrap_fraction=bootstrap_fraction,
        checkpoint=checkpoint.value, val=val, fidelity=fidelity,
    )  # fmt: skip


class BenchPreset(str, enum.Enum):
    auto = "auto"
    tiny = "tiny"
    paper = "paper"


class BenchDtype(str, enum.Enum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"


@app.command()
@user_errors
def bench(
    models: Annotated[
        list[str] | None,
        typer.Option("--models", help="Models to measure: repeat or a comma list (default: all)."),
    ] = None,
    preset: Annotated[
        BenchPreset,
        typer.Option(
            help="auto: paper on CUDA; on a CPU the ratio table at the paper configs (batch 1, "
            "one NFE of each path) and the NFE sweep at the tiny ones. tiny or paper: that one."
        ),
    ] = BenchPreset.auto,
    run: Annotated[
        list[Path] | None,
        typer.Option("--run", help="A trained diffusion run to measure instead (repeat)."),
    ] = None,
    nfe: Annotated[
        list[str] | None,
        typer.Option(
            help="NFEs of the throughput curves: repeat or a comma list (default "
            "1,2,5,10,20,50,100,200; sdm also 1000)."
        ),
    ] = None,
    batch: Annotated[
        int | None,
        typer.Option(
            help="Images per batch (default: auto-sized on CUDA; 1 at paper, 4 at tiny on a CPU)."
        ),
    ] = None,
    repeats: Annotated[
        int | None, typer.Option(help="Timed repeats per measurement (cut to a time budget).")
    ] = None,
    compile: Annotated[
        bool | None,
        typer.Option(
            "--compile/--no-compile",
            help="Also time the torch.compile'd denoiser (default: on CUDA; off on a CPU).",
        ),
    ] = None,
    peer: Annotated[
        bool,
        typer.Option(help="Compare with MONAI's SPADEDiffusionModelUNet at matched FLOPs/NFE."),
    ] = True,
    dtype: Annotated[BenchDtype, typer.Option(help="auto: bf16 on CUDA, fp32 on a CPU.")] = (
        BenchDtype.auto
    ),
    device: DeviceOpt = "auto",
    out: Annotated[Path, typer.Option(help="Folder for bench.json and the plots.")] = Path("bench"),
    reports: Annotated[
        list[Path] | None,
        typer.Option(
            "--reports",
            help="An `evaluate` output folder (or report.json) for the utility-vs-cost plot "
            "(repeat).",
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the JSON result on stdout, tables on stderr.")
    ] = False,
    config: ConfigOption = None,
) -> None:
    """Generation cost of the models (the paper's section IV.C, Fig. 4): FLOPs, per-NFE and
    fixed costs, images/s against NFE, ratios next to their FLOP ceilings, and our UNet against
    MONAI's; writes bench.json and throughput.png under --out."""
    options = _options(locals(), "as_json")
    from edmcli.bench.bench import bench as stage
    from edmcli.bench.render import render

    result = stage(**options, log=lambda line: err_console.print(line, highlight=False))
    render(result, err_console if as_json else console)
    if as_json:
        print(json.dumps(result, indent=2))


@app.command()
@user_errors
def demo(
    out: Annotated[Path, typer.Option(help="Folder for everything the demo writes.")] = Path(
        "demo"
    ),
    n_patients: Annotated[
        int, typer.Option(help="Phantom patients (split 5:1:4 into train, validation, test).")
    ] = 50,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    class_cond: Annotated[
        str,
        typer.Option(
            help="The generator's conditioning besides the label map: view (default; lifts the "
            "synthetic-trained view accuracy), view-phase, or none (the paper's map-only model)."
        ),
    ] = "view",
) -> None:
    """The main path on built-in phantom data with tiny settings (CPU minutes): prepare 64²
    phantom echoes, train a Γ-VAE L64 and a view-conditioned EDM-L64, sample a synthetic store,
    and evaluate it against real-trained segmentation and view classification. Rerunning resumes
    every step."""
    options = _options(locals())
    from edmcli.demo import run_demo

    run_demo(**options)


@app.command()
@user_errors
def study(
    config: Annotated[
        Path, typer.Argument(help="Study YAML (examples/study-phantom.yaml, study-paper.yaml).")
    ],
    only: Annotated[
        list[str] | None,
        typer.Option(
            "--only",
            help="Run only these stages (repeat): prepare, train-vae, "
            "train-diffusion, sample, evaluate, bench.",
        ),
    ] = None,
) -> None:
    """The paper's study from one YAML file: prepare, the Γ-VAEs, every diffusion model,
    sampling at each NFE, quality metrics and evaluation of every store (Fig. 3), bench
    (Fig. 4). Each finished stage is recorded in OUT/study.json and skipped on a rerun."""
    from edmcli.study import run_study

    run_study(config, only=only)


def _view_phase_columns(summary: dict) -> list[str]:
    return sorted({k for row in summary["splits"].values() for k in row if "/" in k})


EXIT_CODES = {
    0: "ok",
    1: "a failure of the tool (a bug: please report it)",
    2: "bad input or a refused command (one line on stderr says which)",
    130: "interrupted (Ctrl-C / SIGTERM; a checkpoint was written, rerun resumes)",
}


def _usage_message(exc) -> str:
    """Click's message, naming the ``--config`` file and key when the bad value came from it."""
    message = exc.format_message()
    ctx, param = getattr(exc, "ctx", None), getattr(exc, "param", None)
    source = ctx.meta.get("config_file") if ctx is not None else None
    if source and param is not None and param.name in source[1]:
        given = (
            ctx.get_parameter_source(param.name) if hasattr(ctx, "get_parameter_source") else None
        )
        if given is None or "COMMANDLINE" not in str(given):
            message += f" (key {param.name!r} of the --config file {source[0]})"
    return message


def main(argv: list[str] | None = None) -> int:
    """The ``echo-synth`` entry point: every usage mistake (an unknown option, a bad value, a bad
    ``--config`` file) is one ``error:`` line and exit 2, like the commands' own errors;
    :data:`EXIT_CODES` lists the codes."""
    from typer._click.exceptions import UsageError

    try:
        code = app(args=argv, standalone_mode=False)
    except UsageError as exc:
        _error_line(_usage_message(exc))
        code = 2
    except EchoSynthError as exc:
        _error_line(str(exc))
        code = exc.exit_code
    except (KeyboardInterrupt, typer.Abort):
        err_console.print("interrupted", highlight=False)
        code = 130
    code = code if isinstance(code, int) else 0
    if argv is None:
        sys.exit(code)
    return code
