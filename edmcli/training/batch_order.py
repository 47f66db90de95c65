"""The order in which training sees samples, batch by batch: a pure function of (seed, epoch,
rank).

Because the order depends on nothing else, a run resumed at step *s* sees exactly the batches an
uninterrupted run sees from step *s* on, whatever the number of DataLoader workers.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, 0xE90C])).permutation(n)


class ResumableDistributedSampler(Sampler[int]):
    """Shuffled indices for one rank, ``batches_per_epoch × batch`` of them per epoch, starting
    ``start_batch`` batches into epoch ``epoch``. Each epoch drops the tail that does not fill a
    global batch (so every rank takes the same number of steps)."""

    def __init__(self, n: int, batch: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if n < batch * world_size:
            raise ValueError(
                f"{n} training samples cannot fill one global batch of {batch * world_size}"
            )
        self.n, self.batch, self.seed = n, batch, seed
        self.rank, self.world_size = rank, world_size
        self.batches_per_epoch = n // (batch * world_size)
        self.epoch = 0
        self.start_batch = 0

    def set_position(self, epoch: int, start_batch: int) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch

    def __iter__(self) -> Iterator[int]:
        perm = epoch_permutation(self.n, self.seed, self.epoch)
        global_batch = self.batch * self.world_size
        for b in range(self.start_batch, self.batches_per_epoch):
            chunk = perm[b * global_batch : (b + 1) * global_batch]
            yield from chunk[self.rank :: self.world_size].tolist()
