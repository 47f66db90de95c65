"""Stand-ins for ``evaluate --fidelity`` tests: a store posing as ``sample`` output whose images
encode their own label maps, a "segmenter" that reads them back, a "classifier" that always
says A4C, and a "Γ-VAE" that shifts its images."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edmcli.data.labels import SECTOR
from edmcli.data.store import DatasetStore
from edmcli.data.store_format import STRING_FIELDS
from edmcli.data.store_writer import create_store, mark_complete, write_block
from edmcli.evaluation.downstream import load_split
from edmcli.evaluation.image_sets import ImageSet, real_image_set
from edmcli.evaluation.judges import NetworkOutputs, ReferenceNetworks, run_networks

STEP = 50  # intensity step per label id: label l is drawn as l·50 / 255
PNG = b"\x89PNG"


def label_copy_store(real, path, k=2, shift=0, noise=0.0, model="edm-l64", nfe=9, seed=0,
                     vae_run=None, splits=("train",)):  # fmt: skip
    """A store posing as ``sample`` output from the ``splits`` label maps of ``real`` (default
    its train split): ``k`` samples per source map, each image the map's labels drawn as
    intensities (rolled by ``shift`` columns: a generator that misplaces its structures; plus
    uniform noise of amplitude ``noise``)."""
    reader = DatasetStore(real)
    rows = reader.indices(list(splits))
    labels = np.repeat(np.asarray(reader.labels.get_orthogonal_selection((rows,))), k, axis=0)
    images = np.roll(labels.astype(np.float64) * STEP, shift, axis=2)
    rng = np.random.default_rng(seed)
    images = np.clip(images + noise * 255 * rng.random(images.shape), 0, 255).round()
    n, h, w = labels.shape
    provenance = {
        "source": "synthetic", "model": model, "nfe": nfe, "solver": "heun",
        "run": str(path.parent / "no-such-run"), "label_store": str(real),
        "label_splits": list(splits),
        "generator_patients": reader.patients(["train", "val"]),
    }  # fmt: skip
    if vae_run is not None:
        provenance["vae_run"] = str(vae_run)
    extra = {"source_index": np.dtype("int64"), "transform": np.dtype("int16"),
             "seed": np.dtype("int64")}  # fmt: skip
    group = create_store(path, n, h, w, {"provenance": provenance}, extra_fields=extra)
    columns = {name: np.repeat(reader.column(name)[rows], k) for name in STRING_FIELDS}
    columns["split"] = np.full(n, "train")
    columns["source_index"] = np.repeat(rows, k).astype(np.int64)
    columns["transform"] = np.tile(np.arange(k), len(rows)).astype(np.int16)
    columns["seed"] = np.arange(n, dtype=np.int64)
    write_block(group, 0, images.astype(np.uint8), labels, columns)
    mark_complete(group)
    return path


class LabelReader(nn.Module):
    """A "segmenter" that decodes intensities into label ids (0–3; the sector is background)
    and exposes a ``bottleneck`` whose pooled output is a feature vector."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(()))  # segment() asks for a parameter's device
        self.bottleneck = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.bottleneck(F.avg_pool2d(x, 4))  # features: 4×4 block means
        ids = torch.round(x[:, 0] * 255 / STEP).long().clamp(0, SECTOR)
        ids = torch.where(ids == SECTOR, torch.zeros_like(ids), ids)
        return F.one_hot(ids, 4).permute(0, 3, 1, 2).float() * 10


class AlwaysA4C(nn.Module):
    """A "classifier" that says A4C for every image; ``avgpool`` gives its features."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(()))
        self.avgpool = nn.AdaptiveAvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.avgpool(x)
        return torch.tensor([[0.0, 1.0]]).expand(len(x), 2)


def reference_nets(size: int) -> ReferenceNetworks:
    return ReferenceNetworks(LabelReader(), size, AlwaysA4C(), size, batch=16)


def real_test_set(store) -> tuple[ImageSet, NetworkOutputs]:
    data = real_image_set(load_split(store, "test"))
    size = int(data.images.shape[-1])
    return data, run_networks(reference_nets(size), data.images)


class RollVAE(nn.Module):
    """A "Γ-VAE" whose latent is the image and whose decoder shifts it ``shift`` columns."""

    def __init__(self, shift: int = 0, size: int = 32) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(()))
        self.shift = shift
        self.config = type("Config", (), {"image_size": size})()

    def encode(self, image: torch.Tensor, sector: torch.Tensor) -> torch.Tensor:
        return image

    def decode(self, latent: torch.Tensor, sector: torch.Tensor, labels=None) -> torch.Tensor:
        return torch.roll(latent, self.shift, dims=3)
