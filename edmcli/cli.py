"""``echo-synth``: the command line. Each command parses its options, calls one stage, prints."""

from __future__ import annotations

import enum
import functools
import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from edmcli.config import ConfigOption
from edmcli.console import console, err_console, progress
from edmcli.errors import EchoSynthError

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


def user_errors(fn):
    """Turn EchoSynthError into one line on stderr and exit code 2; Ctrl-C into exit 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EchoSynthError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("interrupted", highlight=False)
            raise typer.Exit(130) from None

    return wrapper


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
    from edmcli.data import prepare as stage
    from edmcli.data.sources import DEFAULT_META_PATTERN, camus_source, folder_source

    ratio = stage.parse_split_ratio(split_ratio)
    if source is SourceKind.phantom:
        total, label = 4 * n_patients, "phantom"
        with progress(total, "prepare (phantom)") as advance:
            result = stage.prepare_phantom(
                out, n_patients, size, seed, ratio, overwrite=overwrite, progress=advance
            )
    else:
        if source is SourceKind.camus:
            if camus_dir is None:
                raise EchoSynthError("--source camus needs --camus-dir DIR")
            root, src = camus_dir, camus_source(camus_dir)
        else:
            if folder is None:
                raise EchoSynthError("--source folder needs --folder DIR")
            pattern = meta_pattern or DEFAULT_META_PATTERN
            root = folder
            src = folder_source(folder, image_glob, label_template, pattern)
        if out.exists() and not overwrite:
            raise EchoSynthError(f"{out} already exists; pass --overwrite to replace it")
        label = src.layout
        with progress(len(src.items), f"prepare ({label})") as advance:
            result = stage.prepare_from_source(
                src, out, size, seed, ratio, keep_aspect, root, overwrite, advance
            )
    for line in result.skipped:
        console.print(f"skipped {line}", highlight=False)
    counts = ", ".join(f"{k} {v}" for k, v in result.split_counts.items())
    console.print(
        f"wrote {result.path}: {result.samples} images of {result.patients} patients "
        f"({label}, {size}×{size}; {counts})",
        highlight=False,
    )


@app.command()
@user_errors
def info(
    store: Annotated[Path, typer.Argument(help="A dataset store.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Summarise a dataset store: counts per split/view/phase, labels, size, provenance."""
    from edmcli.data.store import DatasetStore

    summary = DatasetStore(store).summary()
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
    from edmcli.presets import VAE_PRESETS, resolve
    from edmcli.training.vae import GammaVAETask, settings_dict, vae_settings_and_config

    overrides = {k: v for k, v in locals().items() if k not in _NOT_OVERRIDES}
    values = resolve(VAE_PRESETS, preset, overrides)
    settings, train_config = vae_settings_and_config(data, latent, values, seed, precision.value)
    resolved = {"kind": "vae", "preset": preset, **settings_dict(settings),
                **_train_dict(train_config)}  # fmt: skip
    _train_run(
        run=run or Path("runs") / f"vae-l{latent}",
        device=device,
        resolved=resolved,
        data=settings.data,
        train_config=train_config,
        make_task=lambda env: GammaVAETask(settings),
        describe=f"Γ-VAE L{latent} ({settings.image_size}² → {settings.latent_size}²)",
        report=lambda run, env: _vae_quality(run, settings, env.device),
        title=f"Γ-VAE L{latent}",
    )


def _train_run(
    run: Path,
    device: str,
    resolved: dict,
    data: str,
    train_config,
    make_task,
    describe: str,
    report,
    title: str,
    head: dict | None = None,
) -> None:
    """The flow every training command shares: join the process group, create or check the run
    folder, record the training patients, train, then summarise on the main rank."""
    from edmcli.training.distributed import init_distributed, shutdown_distributed
    from edmcli.training.engine import Trainer, print_summary
    from edmcli.training.run_dir import prepare_run_dir, record_training_patients

    env = init_distributed(device)
    try:
        resumed = prepare_run_dir(run, resolved, env.is_main)
        if env.is_main:
            record_training_patients(run, data)
            console.print(
                f"{'resuming' if resumed else 'training'} {describe} in {run} on {env.device}"
                f" × {env.world_size}: {train_config.steps} steps of batch {train_config.batch}",
                highlight=False,
            )
        result = Trainer(make_task(env), train_config, run, env).fit()
        if env.is_main:
            summary = {
                **(head or {}),
                "steps": result.steps,
                "resumed from step": result.resumed_from,
                "train images/s": result.images_per_second,
                **{f"final {k}": v for k, v in result.last_metrics.items()},
                **report(run, env),
                "checkpoint": str(result.checkpoint),
            }
            (run / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
            print_summary(f"{title}: {run}", summary)
    finally:
        shutdown_distributed()


_NOT_OVERRIDES = {"data", "latent", "run", "preset", "precision", "device", "seed", "config"}


def _train_dict(config) -> dict:
    from dataclasses import asdict

    return {f"train_{k}" if k in ("seed",) else k: v for k, v in asdict(config).items()}


def _vae_quality(run: Path, settings, device) -> dict:
    """Masked PSNR/SSIM of the EMA model on the validation split, and a comparison grid."""
    import torch
    from torch.utils.data import DataLoader

    from edmcli.data.dataset import EchoDataset
    from edmcli.data.store import DatasetStore
    from edmcli.evaluation.reconstruction import reconstruction_quality
    from edmcli.models.gamma_vae import GammaVAE
    from edmcli.training.checkpoint import latest_checkpoint, load_checkpoint
    from edmcli.training.grids import save_image_grid
    from edmcli.training.vae import sector_of

    model = GammaVAE(settings.model_config()).to(device)
    model.load_state_dict(load_checkpoint(latest_checkpoint(run), device)["ema"])
    split = DatasetStore(settings.data).monitoring_split()
    dataset = EchoDataset(settings.data, splits=split)
    quality = reconstruction_quality(model, DataLoader(dataset, batch_size=32), device)
    items = [dataset[i] for i in range(min(8, len(dataset)))]
    image = torch.stack([it["image"] for it in items]).to(device)
    sector = sector_of(torch.stack([it["labels"] for it in items]).to(device))
    with torch.no_grad():
        out = model(image, sector, sample=False)
    latent = torch.nn.functional.interpolate(out.z, size=image.shape[-2:], mode="nearest")
    save_image_grid([image, out.recon, latent.clamp(0, 1)], run / "comparison.png")
    return {
        f"{split} masked PSNR (dB)": quality["psnr"],
        f"{split} masked SSIM": quality["ssim"],
        "identity-to-mean PSNR (dB)": quality["baseline_psnr"],
        "identity-to-mean SSIM": quality["baseline_ssim"],
        "latent-image correlation": quality["latent_correlation"],
        f"{split} images": quality["images"],
    }


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
    augment: Annotated[bool | None, typer.Option(help="Geometric augmentation.")] = None,
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
    from edmcli.presets import DIFFUSION_PRESETS, PAPER_BATCH, resolve
    from edmcli.training.diffusion import (
        DiffusionTask,
        check_model_name,
        diffusion_settings,
        settings_dict,
    )
    from edmcli.training.engine import TrainConfig

    check_model_name(model)
    overrides = {k: v for k, v in locals().items() if k in _DIFFUSION_TRAIN_KEYS}
    values = resolve(DIFFUSION_PRESETS, preset, overrides)
    values.setdefault("batch", PAPER_BATCH[model])
    values["batch"] = batch_size = int(values["batch"])
    unet = {
        k: v
        for k, v in {
            "dropout": dropout,
            "spade_placement": spade_placement,
            "model_channels": model_channels,
        }.items()  # fmt: skip
        if v is not None
    }
    settings, loaded_vae = diffusion_settings(model, data, preset, vae, unet)
    if augment is not None:
        settings.augment = augment
    n_steps = int(values.get("steps") or max(1, round(values["kimg"] * 1000 / batch_size)))
    train_config = TrainConfig.from_values(values, n_steps, precision.value, seed)
    resolved = {"kind": "diffusion", **settings_dict(settings), **_train_dict(train_config)}

    def make_task(env):
        if loaded_vae is not None:
            loaded_vae.model.to(env.device)
        return DiffusionTask(settings, loaded_vae)

    space = "latent" if loaded_vae else "pixels"
    _train_run(
        run=run or Path("runs") / model,
        device=device,
        resolved=resolved,
        data=settings.data,
        train_config=train_config,
        make_task=make_task,
        describe=f"{model} ({preset}; {settings.net_size}² {space})",
        report=lambda run, env: _last_validation(run),
        title=model,
        head={"model": model},
    )


_DIFFUSION_TRAIN_KEYS = {
    "steps", "kimg", "batch", "batch_gpu", "lr", "ema_decay", "checkpoint_every", "log_every",
    "grid_every", "validate_every", "num_workers",
}  # fmt: skip


def _last_validation(run: Path) -> dict:
    """The last denoising check of a run's metrics log."""
    last = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "val/denoised_mse" in record:
            last = record
    if not last:
        return {}
    return {
        f"denoising check at σ=0.5 (step {last['step']}): denoised masked MSE": last[
            "val/denoised_mse"
        ],
        "noisy input masked MSE": last["val/noisy_mse"],
    }


@app.command()
@user_errors
def sample(
    model: Annotated[str, typer.Option(help="sdm, edm, ve, vp, edm-l128 or edm-l64.")],
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
    from edmcli.sampling.runs import load_diffusion_run, resolve_run
    from edmcli.sampling.sample import SampleRequest, run_sampling
    from edmcli.sampling.solvers import DEFAULT_SOLVER, SOLVERS
    from edmcli.training.distributed import init_distributed, shutdown_distributed
    from edmcli.training.engine import print_summary

    run_dir = resolve_run(model, run, runs_root)
    solver = solver or DEFAULT_SOLVER[model]
    if solver not in SOLVERS:
        raise EchoSynthError(f"--solver {solver!r} is unknown; choose from {', '.join(SOLVERS)}")
    nfe = nfe if nfe is not None else (1000 if model == "sdm" else 35)
    if k < 1 or batch < 1 or chunk < 1:
        raise EchoSynthError("--k, --batch and --chunk must be at least 1")
    env = init_distributed(device)
    try:
        loaded = load_diffusion_run(model, run_dir, env.device)
        request = SampleRequest(
            model=model, label_store=str(labels or loaded.settings.data),
            splits=[s.strip() for s in splits.split(",") if s.strip()], k=k, n=n, nfe=nfe,
            solver=solver, churn=churn, seed=seed, batch=batch, chunk=chunk, compile=compile,
            spade_cache=spade_cache, precision=precision.value,
        )  # fmt: skip
        out = out or Path("synthetic") / f"{model}-nfe{nfe}.zarr"
        from edmcli.sampling.nfe import plan

        step_plan = plan(solver, nfe)
        if env.is_main:
            console.print(
                f"sampling {model} ({run_dir}, step {loaded.step}) with {solver}: "
                f"{step_plan.note} → {out}",
                highlight=False,
            )
        result = run_sampling(request, loaded, out, env, overwrite)
        if env.is_main:
            summary = {
                "store": str(result.out),
                "samples": result.samples,
                "sampled now": result.sampled_now,
                "solver": solver,
                "steps": result.steps,
                "NFE": result.nfe,
                "seconds": result.seconds,
                "images/s": result.images_per_second,
                "grid": str(result.grid),
            }
            (out.parent / f"{out.stem}-summary.json").write_text(json.dumps(summary, indent=2))
            print_summary(f"{model} samples", summary)
    finally:
        shutdown_distributed()


def _register_evaluate() -> None:
    from edmcli.evaluation.command import evaluate_command

    app.command("evaluate")(user_errors(evaluate_command))


_register_evaluate()


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for everything the demo writes.")] = Path(
        "demo"
    ),
    n_patients: Annotated[int, typer.Option(help="Phantom patients.")] = 24,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
) -> None:
    """The main path on built-in phantom data with tiny settings (CPU minutes): prepare 64²
    phantom echoes, train a Γ-VAE L64 and EDM-L64, sample a synthetic store, and evaluate it
    against real-trained segmentation and view classification. Rerunning resumes every step."""
    from edmcli.evaluation.command import PresetChoice, evaluate_command

    store = out / "phantom64.zarr"
    steps = [
        ("prepare", lambda: prepare(
            out=store, source=SourceKind.phantom, size=64, n_patients=n_patients, seed=seed,
        ) if not store.exists() else console.print(f"using {store}")),
        ("train-vae", lambda: train_vae(
            data=store, latent=64, run=out / "runs" / "vae-l64", preset="tiny", device=device,
            seed=seed,
        )),
        ("train-diffusion", lambda: train_diffusion(
            model="edm-l64", data=store, vae=out / "runs" / "vae-l64",
            run=out / "runs" / "edm-l64", preset="tiny", device=device, seed=seed,
        )),
        ("sample", lambda: sample(
            model="edm-l64", run=out / "runs" / "edm-l64", nfe=35, compile=False,
            out=out / "synthetic" / "edm-l64-nfe35.zarr", device=device, seed=seed,
        )),
        ("evaluate", lambda: evaluate_command(
            train=[str(store), str(out / "synthetic" / "edm-l64-nfe35.zarr")], test=store,
            out=out / "evaluation", preset=PresetChoice.tiny, device=device, seed=seed,
        )),
    ]  # fmt: skip
    for name, step in steps:
        console.rule(f"[bold]demo: {name}")
        step()
    console.rule("[bold]demo: done")
    console.print(f"everything is under {out}", highlight=False)


def _view_phase_columns(summary: dict) -> list[str]:
    return sorted({k for row in summary["splits"].values() for k in row if "/" in k})


def main() -> None:  # pragma: no cover - console entry point
    sys.exit(app())
