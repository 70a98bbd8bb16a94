"""Seeded epoch-wise batches whose position is one integer, so a resumed run sees the same batches."""

from __future__ import annotations

import torch


class EpochBatches:
    """Batch `k` of the run is a slice of the permutation of epoch k // batches_per_epoch.

    Batches hold dataset indices drawn from `items` (all of the dataset, or one shard of it). Every
    epoch draws a fresh permutation from (seed, epoch); the last incomplete batch is dropped. Under
    data parallelism each process takes its rank's share of every batch.
    """

    def __init__(self, items: torch.Tensor, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if len(items) == 0:
            raise ValueError("cannot draw batches from an empty dataset")
        self.items = torch.as_tensor(items, dtype=torch.long)
        self.batch_size = min(batch_size, len(self.items))
        self.batches_per_epoch = len(self.items) // self.batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self._cached_epoch = -1
        self._permutation = torch.empty(0, dtype=torch.long)

    def permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._cached_epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._permutation = self.items[torch.randperm(len(self.items), generator=generator)]
            self._cached_epoch = epoch
        return self._permutation

    def batch(self, position: int) -> torch.Tensor:
        epoch, slot = divmod(position, self.batches_per_epoch)
        indices = self.permutation(epoch)[slot * self.batch_size : (slot + 1) * self.batch_size]
        return indices[self.rank :: self.world_size]
