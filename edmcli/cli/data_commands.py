"""The dataset commands: ``prepare`` builds a dataset store, ``info`` summarises one."""

from __future__ import annotations

import enum
import json
import re
from pathlib import Path
from typing import Annotated

import typer

from edmcli.config import ConfigOption
from edmcli.console import console, styled

from .errors import user_errors
from .options import stage_options


class SourceKind(str, enum.Enum):
    phantom = "phantom"
    camus = "camus"
    folder = "folder"


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
    options = stage_options(locals())
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
        styled(str(summary["path"])),
        f": {summary['samples']} images, {summary['image_size'][0]}×{summary['image_size'][1]}, "
        f"{summary['bytes_on_disk'] / 2**20:.1f} MiB on disk",
        sep="",
        highlight=False,
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


def _view_phase_columns(summary: dict) -> list[str]:
    return sorted({k for row in summary["splits"].values() for k in row if "/" in k})


@user_errors
def export(
    store: Annotated[Path, typer.Argument(help="A dataset store, real or synthetic.")],
    format: Annotated[
        str,
        typer.Option(
            "--format",
            help="nnunet (nnU-Net v2 raw layout: imagesTr/labelsTr/dataset.json, test rows in "
            "imagesTs/labelsTs), nifti or png (images/ and labels/ pairs with the store's label "
            "ids, which prepare --source folder reads back).",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="New (or empty) folder to write.")],
    sector_ignore: Annotated[
        bool,
        typer.Option(
            help="nnunet: the outside of the sector becomes label 4 'ignore' (not learnt, not "
            "scored) instead of background."
        ),
    ] = False,
) -> None:
    """Write a store as files nnU-Net, MONAI or any image tool reads, with a CSV of each
    sample's columns and the store's DATASET.md card."""
    from edmcli.console import progress
    from edmcli.data.export import check_export, export_store

    total = len(check_export(store, format, out, sector_ignore))
    with progress(total, "export") as advance:
        result = export_store(store, format, out, sector_ignore=sector_ignore, progress=advance)
    if result.format == "nnunet":
        what = f"{result.training} training cases" + (
            f", {result.test} test cases" if result.test else ""
        )
    else:
        what = f"{result.training} image/label pairs"
    console.print(f"wrote {result.out} ({result.format}): {what}; {result.table.name}, "
                  f"{result.card.name}", highlight=False)  # fmt: skip
    if result.format == "nnunet" and not re.match(r"^Dataset\d{3}_", result.out.name):
        console.print(
            "note: nnU-Net finds datasets as nnUNet_raw/DatasetXXX_NAME; rename the folder so "
            "(e.g. Dataset501_EchoSynth) before nnUNetv2_plan_and_preprocess -d XXX",
            highlight=False,
        )
