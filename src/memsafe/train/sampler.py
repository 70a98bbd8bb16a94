"""Seeded batches whose position is one integer, so a resumed run sees the same batches and draws."""

from __future__ import annotations

import torch


class EpochBatches:
    """Batch `k` holds positions [k*B, (k+1)*B) of an endless stream of epochs, each epoch a fresh
    permutation of `items` drawn from (seed, epoch).

    Items are dataset indices (all of the dataset, or one shard of it). A batch may span two epochs, and
    when `items` is smaller than the batch size it holds several epochs, so the batch size, and with it
    the number of samples per step, never depends on the subset. Under data parallelism each process
    takes its rank's share of every batch.
    """

    def __init__(self, items: torch.Tensor, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if len(items) == 0:
            raise ValueError("cannot draw batches from an empty dataset")
        self.items = torch.as_tensor(items, dtype=torch.long)
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self._cache: dict[int, torch.Tensor] = {}

    def permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._cache:
            if len(self._cache) > 8:
                self._cache.clear()
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._cache[epoch] = self.items[torch.randperm(len(self.items), generator=generator)]
        return self._cache[epoch]

    def batch(self, position: int) -> torch.Tensor:
        n = len(self.items)
        stream = torch.arange(position * self.batch_size, (position + 1) * self.batch_size)
        epochs, offsets = stream // n, stream % n
        indices = torch.empty(self.batch_size, dtype=torch.long)
        for epoch in epochs.unique().tolist():
            mask = epochs == epoch
            indices[mask] = self.permutation(epoch)[offsets[mask]]
        return self.local(indices)

    def local(self, values: torch.Tensor) -> torch.Tensor:
        """This process's share of a tensor drawn for the whole (global) batch."""
        return values[self.rank :: self.world_size]

    def generator(self, position: int) -> torch.Generator:
        """The random stream of batch `position` (noise, timesteps, caption dropout, augmentation).

        Drawn for the global batch and sliced with `local`, so one process and N processes give every
        sample the same draws, and a resumed run the same as an uninterrupted one."""
        return torch.Generator().manual_seed((self.seed * 1_000_003 + position) * 2 + 1)
