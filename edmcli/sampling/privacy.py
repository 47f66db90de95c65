"""``sample --privacy-filter P``: a sample closer to its generator's training images than the
P-th percentile of real test images of new patients is dropped and redrawn with a new seed.

The statistic is the pixel-space relative distance of :mod:`edmcli.runs.memorisation` (nearest
training image / mean of the 5 nearest); the threshold is its P-th percentile over the real
*test* images of the generator's training store whose patients it never saw. Redraw *a* of
sample *i* uses the seed (seed, i, :data:`REDRAW_STREAM` + a), so the store stays byte-identical
whatever the number of processes or where a run resumed. After :data:`MAX_REDRAWS` redraws a
sample still too close stops the run with one line (the store stays incomplete).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edmcli.data.store import DatasetStore
from edmcli.errors import EchoSynthError
from edmcli.runs.folder import load_training_patients
from edmcli.runs.memorisation import (
    K_NEAREST,
    MIN_REFERENCE,
    MemorisationReference,
    TrainingImages,
    generator_training_images,
    reference_split,
)

MAX_REDRAWS = 8
REDRAW_STREAM = 2000
REFERENCE_SPLIT = "test"


def ordinal(value: float) -> str:
    """1 → 1st, 2 → 2nd, 5 → 5th, 11 → 11th, 2.5 → 2.5th."""
    if value != int(value):
        return f"{value:g}th"
    n = int(value)
    suffix = "th" if n % 100 in (11, 12, 13) else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def check_percentile(percentile: float) -> None:
    """Refuse a percentile outside (0, 50]: the filter would drop nothing or most samples."""
    if not 0 < percentile <= 50:
        raise EchoSynthError(
            f"--privacy-filter {percentile:g} must be a percentile in (0, 50] (1 or 5 drops the "
            "samples closer to a training image than 1 % or 5 % of new real patients are)"
        )


def reference_rows(run: Path, generator_patients: list[str]) -> tuple[str, np.ndarray]:
    """(store, rows): the test images of the diffusion run's training store whose patients the
    generator never saw; refused with fewer than :data:`MIN_REFERENCE`."""
    store = str(load_training_patients(run)["store"])
    rows = reference_split(DatasetStore(store), np.asarray(generator_patients, dtype=str),
                           REFERENCE_SPLIT)  # fmt: skip
    if len(rows) < MIN_REFERENCE:
        raise EchoSynthError(
            f"--privacy-filter needs at least {MIN_REFERENCE} real {REFERENCE_SPLIT} images of "
            f"patients the generator never saw in {store} (its training store), found {len(rows)}"
        )
    return store, rows


@dataclass
class PrivacyFilter:
    """The check, its threshold and what it records in the store's provenance."""

    check: MemorisationReference
    percentile: float
    threshold: float
    record: dict[str, Any]

    @classmethod
    def build(cls, percentile: float, runs: list[Path], generator_patients: list[str]
              ) -> PrivacyFilter:  # fmt: skip
        """The filter of a generator (its diffusion run first, then its Γ-VAE run)."""
        training = generator_training_images(runs)
        store, rows = reference_rows(runs[0], generator_patients)
        reader = DatasetStore(store)
        images, labels = reader.read_rows(rows)
        reference = TrainingImages(torch.from_numpy(images.astype(np.float32) / 255),
                                   torch.from_numpy(labels),
                                   reader.column("patient")[rows], [])  # fmt: skip
        check = MemorisationReference.build(training, reference)
        threshold = check.threshold(percentile)
        record = {
            "percentile": percentile,
            "threshold": threshold,
            "statistic": f"pixel-space relative distance (nearest training image / mean of the "
            f"{K_NEAREST} nearest), each image standardised inside its sector",
            "reference": {"store": store, "split": REFERENCE_SPLIT, "images": len(rows)},
            "training": {"images": len(training), "sources": training.sources},
            "max_redraws": MAX_REDRAWS,
            "redraw_seed": f"(seed, sample index, {REDRAW_STREAM} + redraw)",
        }
        return cls(check, percentile, threshold, record)

    def too_close(self, pixels: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
        """Boolean (B,): which uint8 images (B, 1, H, W) fall below the threshold."""
        return self.check.pixel_statistic(pixels.float() / 255, labels) < self.threshold

    def apply(
        self,
        pixels: torch.Tensor,
        labels: torch.Tensor,
        seeds: list[int],
        new_seed: Callable[[int, int], int],
        redraw: Callable[[np.ndarray, list[int]], torch.Tensor],
        first: int,
    ) -> tuple[torch.Tensor, list[int], np.ndarray]:
        """Redraw the samples of a batch (``first``: the store index of its first sample) that
        are too close: ``new_seed(row, attempt)`` their seed, ``redraw(rows, seeds)`` their
        new uint8 images. Returns (images, final seeds, redraws per sample)."""
        pixels, seeds = pixels.clone(), list(seeds)
        redraws = np.zeros(len(pixels), dtype=np.int16)
        for attempt in range(1, MAX_REDRAWS + 2):
            close = np.flatnonzero(self.too_close(pixels, labels))
            if len(close) == 0:
                return pixels, seeds, redraws
            if attempt > MAX_REDRAWS:
                i = int(close[0])
                raise EchoSynthError(
                    f"sample {first + i} stayed closer to a training image than the "
                    f"{ordinal(self.percentile)} percentile of new patients after {MAX_REDRAWS} "
                    f"redraws (last seed {seeds[i]}): the generator reproduces its training "
                    "images for this label map; lower --privacy-filter or use an earlier "
                    "checkpoint (the store stays incomplete)"
                )
            fresh = [new_seed(int(r), attempt) for r in close]
            pixels[torch.from_numpy(close)] = redraw(close, fresh).to(pixels.device)
            for r, s in zip(close, fresh, strict=True):
                seeds[int(r)] = s
            redraws[close] += 1
        raise AssertionError("unreachable")
