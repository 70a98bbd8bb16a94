"""Nearest-neighbour memorization in pixel space, in the two conventions of the literature.

(a) Gu et al., "On Memorization in Diffusion Models": ||x - NN1|| / ||x - NN2|| < 1/3 counts as memorized;
    `memorized_fraction` everywhere in memsafe means this.
(b) The IET-AGC code's "MQ" curve: ||x - NN1||^2 / mean of ||x - NN_j||^2 over the 50 nearest, reported as
    counts below 0.15, 0.2, 0.3, ..., 0.9.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MQ_THRESHOLDS = (0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass
class Neighbours:
    sq_dists: torch.Tensor  # (Q, k) squared L2, ascending
    indices: torch.Tensor  # (Q, k) reference indices


def distinct_images(images: torch.Tensor) -> list[int]:
    """Index of the first of each set of identical images. A generation that copies an image the training
    set holds twice has two equally near neighbours, so the NN1/NN2 ratio must be taken over distinct ones."""
    import hashlib

    seen: dict[bytes, int] = {}
    for index, image in enumerate(images):
        seen.setdefault(hashlib.blake2b(image.contiguous().numpy().tobytes(), digest_size=16).digest(), index)
    return sorted(seen.values())


@torch.no_grad()
def distinct_nearest_neighbours(queries: torch.Tensor, references: torch.Tensor, k: int = 50) -> Neighbours:
    """`nearest_neighbours` among the distinct references, indices into `references`."""
    keep = distinct_images(references)
    found = nearest_neighbours(queries, references[keep], k=k)
    return Neighbours(found.sq_dists, torch.tensor(keep, dtype=torch.long)[found.indices])


@torch.no_grad()
def nearest_neighbours(
    queries: torch.Tensor, references: torch.Tensor, k: int = 50, query_chunk: int = 1024, reference_chunk: int = 8192
) -> Neighbours:
    """The k nearest references of each query by squared L2, in chunks so memory stays bounded.

    Candidates are found with a float32 matrix product and their distances recomputed exactly in
    float64, so an identical image has distance 0, not rounding noise.
    """
    if references.shape[0] == 0:
        raise ValueError("no reference images to compare against")
    q = queries.flatten(1).float()
    r = references.flatten(1).float()
    if q.shape[1] != r.shape[1]:
        raise ValueError(f"queries have {q.shape[1]} values each, references {r.shape[1]}")
    k = min(k, r.shape[0])
    r_norms = r.pow(2).sum(1)
    all_d, all_i = [], []
    for qs in range(0, q.shape[0], query_chunk):
        qc = q[qs : qs + query_chunk]
        qc_norms = qc.pow(2).sum(1, keepdim=True)
        best_d = torch.full((qc.shape[0], 0), float("inf"))
        best_i = torch.zeros((qc.shape[0], 0), dtype=torch.long)
        for rs in range(0, r.shape[0], reference_chunk):
            rc = r[rs : rs + reference_chunk]
            d = (qc_norms + r_norms[rs : rs + reference_chunk] - 2.0 * qc @ rc.T).clamp_min(0)
            cand_d = torch.cat([best_d, d], 1)
            cand_i = torch.cat([best_i, torch.arange(rs, rs + rc.shape[0]).expand(qc.shape[0], -1)], 1)
            # Keep a margin of extra candidates: float32 rounding may misorder near-ties.
            keep = min(cand_d.shape[1], k + 8)
            best_d, pos = cand_d.topk(keep, dim=1, largest=False)
            best_i = cand_i.gather(1, pos)
        exact = torch.cat([
            (qc[i : i + 64].double().unsqueeze(1) - r[best_i[i : i + 64]].double()).pow(2).sum(-1)
            for i in range(0, qc.shape[0], 64)  # small slices: the gathered neighbours are (64, k, D)
        ])
        exact, order = exact.sort(dim=1)
        all_d.append(exact[:, :k])
        all_i.append(best_i.gather(1, order)[:, :k])
    return Neighbours(torch.cat(all_d), torch.cat(all_i))


def distance_ratio(neighbours: Neighbours) -> torch.Tensor:
    """||x - NN1|| / ||x - NN2|| per query (0 when x equals a training image)."""
    if neighbours.sq_dists.shape[1] < 2:
        raise ValueError("the distance ratio needs at least two reference images")
    d1 = neighbours.sq_dists[:, 0].sqrt()
    d2 = neighbours.sq_dists[:, 1].sqrt()
    return torch.where(d1 == 0, torch.zeros_like(d1), d1 / d2.clamp_min(1e-12))


def memorized_fraction(ratios: torch.Tensor, threshold: float = 1 / 3) -> float:
    return ratios.lt(threshold).double().mean().item()


def mq_scores(neighbours: Neighbours, k: int = 50) -> torch.Tensor:
    """||x - NN1||^2 over the mean squared distance to the k nearest (NN1 included), per query."""
    d = neighbours.sq_dists[:, :k]
    mean = d.mean(1)
    return torch.where(d[:, 0] == 0, torch.zeros_like(mean), d[:, 0] / mean.clamp_min(1e-12))


def mq_counts(scores: torch.Tensor, thresholds: tuple[float, ...] = MQ_THRESHOLDS) -> dict[str, int]:
    """Counts of queries with MQ score below each threshold, keyed like the reference code (v_15 ... v_90)."""
    return {f"v_{round(t * 100)}": int(scores.lt(t).sum()) for t in thresholds}
