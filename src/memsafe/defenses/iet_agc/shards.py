"""IET's shards: a seeded balanced split, and AGC+'s redistribution of persistently skipped samples."""

from __future__ import annotations

import torch

from memsafe.errors import MemsafeError


def split_shards(num_items: int, shards: int, seed: int) -> torch.Tensor:
    """Shard id of every sample: a seeded random partition into `shards` parts whose sizes differ by <= 1."""
    if shards > num_items:
        raise MemsafeError(f"defense.iet_agc.shards {shards} is larger than the number of training images ({num_items})")
    order = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed))
    assignment = torch.empty(num_items, dtype=torch.long)
    assignment[order] = torch.arange(num_items) % shards
    return assignment


def redistribute(assignment: torch.Tensor, skip_rate: torch.Tensor, threshold: float, shards: int) -> int:
    """Move samples skipped in >= `threshold` of their round's visits to another shard, in place.

    Most-skipped samples move first, each to the other shard with the fewest samples (ties: lowest id),
    which spreads them over many proxies. A shard never drops below one sample. Returns the number moved."""
    if shards < 2:
        return 0
    sizes = torch.bincount(assignment, minlength=shards)
    candidates = torch.nonzero(skip_rate >= threshold).squeeze(1)
    candidates = candidates[torch.argsort(skip_rate[candidates], descending=True, stable=True)]
    moved = 0
    for index in candidates.tolist():
        source = int(assignment[index])
        if sizes[source] <= 1:
            continue
        others = sizes.clone()
        others[source] = torch.iinfo(others.dtype).max
        target = int(torch.argmin(others))
        assignment[index] = target
        sizes[source] -= 1
        sizes[target] += 1
        moved += 1
    return moved
