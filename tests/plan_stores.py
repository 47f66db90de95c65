"""Tiny hand-made dataset stores and run folders for the plan tests: the shapes and metadata that
``prepare`` never writes (non-square images, no training split, unknown views, foreign label
names, label values outside the convention), built in milliseconds."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from edmcli.data.store import DatasetStore
from edmcli.data.store_format import SampleMeta, meta_columns
from edmcli.data.store_writer import create_store, mark_complete, write_block


def tiny_store(
    path: Path,
    height: int = 16,
    width: int = 16,
    splits: Sequence[str] = ("train", "train", "val", "test"),
    views: Sequence[str] | None = None,
    label_value: int = 1,
    attrs: dict[str, Any] | None = None,
    complete: bool = True,
) -> Path:
    """A store of ``len(splits)`` samples: a sector (4) with a square of ``label_value``."""
    n = len(splits)
    views = views or ["A2C", "A4C"] * (n // 2) + ["A2C"] * (n % 2)
    group = create_store(path, n, height, width, attrs or {}, shard=16)
    labels = np.full((n, height, width), 4, np.uint8)
    labels[:, 2:6, 2:6] = label_value
    images = np.where(labels > 0, 120, 0).astype(np.uint8)
    metas = [SampleMeta(patient=f"p{i}", view=views[i], phase="ED", split=s)
             for i, s in enumerate(splits)]  # fmt: skip
    write_block(group, 0, images, labels, meta_columns(metas))
    if complete:
        mark_complete(group)
    return path


def fake_vae_run(
    run: Path,
    latent: int = 64,
    image_size: int = 32,
    kind: str = "vae",
    checkpoint: bytes | None = b"not read by a plan",
    sigma_data: float | None = 0.3,
    latent_mean: float | None = None,
) -> Path:
    """A Γ-VAE run folder as ``train-vae`` leaves it, without weights: ``config.yaml``, a
    checkpoint file holding ``checkpoint`` (a plan hashes it, never loads it) and
    ``latent_stats.json`` (with ``sigma_data``, and ``mean`` when ``latent_mean`` is given)."""
    import json

    from edmcli.runs.vae_run import VAESettings, settings_dict

    settings = VAESettings(data="/nowhere/store.zarr", latent=latent, image_size=image_size,
                           base_channels=8, num_res_blocks=1, norm_groups=8)  # fmt: skip
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"kind": kind, **settings_dict(settings)}))
    if checkpoint is not None:
        (run / "checkpoints").mkdir()
        (run / "checkpoints" / "checkpoint-00000004.pt").write_bytes(checkpoint)
    if sigma_data is not None:
        stats = {"sigma_data": sigma_data}
        if latent_mean is not None:
            stats["mean"] = latent_mean
        (run / "latent_stats.json").write_text(json.dumps(stats))
    return run


def fake_diffusion_run(root: Path, name: str = "edm-l64", *, data: Path, model: str = "edm-l64",
             kind: str = "diffusion", image_size: int = 32, class_cond: str | None = None,
             checkpoint: bool = True, patients: bool = True, **extra) -> Path:  # fmt: skip
    """A diffusion run folder as training leaves it, minus the weights (an empty checkpoint)."""
    run = root / name
    (run / "checkpoints").mkdir(parents=True)
    config = {
        "kind": kind, "model": model, "data": str(data), "preset": "tiny",
        "image_size": image_size, "net_size": 16, "unet": {}, "class_cond": class_cond, **extra,
    }  # fmt: skip
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    if checkpoint:
        (run / "checkpoints" / "checkpoint-00000004.pt").write_bytes(b"")
    if patients:
        record = {"patients": DatasetStore(data).patients(["train", "val"]), "splits": ["train"]}
        (run / "training_patients.json").write_text(json.dumps(record))
    return run


def files(root: Path) -> list[str]:
    """Every path under ``root`` (relative), to check that planning wrote nothing."""
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob("*"))
