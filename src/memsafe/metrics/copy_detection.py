"""Copy detection: cosine similarity of each generation to its nearest training image in a feature space.

Convention of Somepalli et al. and the DCR code used by IET-AGC+: top-1 similarity per generation,
reported as the fraction above 0.5 and the 95th percentile ("sim_95pc"), beside the same statistics for
training images against their nearest *other* training image (the background level of similarity).
"""

from __future__ import annotations

import torch

from memsafe.metrics.nearest import nearest_neighbours


def top1_similarity(query_features: torch.Tensor, reference_features: torch.Tensor, skip_self: bool = False):
    """(similarity, index) of each query's most similar reference; features must be L2-normalised."""
    k = 2 if skip_self else 1
    found = nearest_neighbours(query_features, reference_features, k=k)
    column = k - 1
    # For unit vectors ||a - b||^2 = 2 - 2 cos(a, b).
    similarity = 1.0 - found.sq_dists[:, column] / 2.0
    return similarity.float(), found.indices[:, column]


def copy_statistics(
    similarity: torch.Tensor, threshold: float = 0.5, prefix: str = "", calibrate=None
) -> dict[str, float]:
    """Cosine statistics, and the fraction of copies: calibrated score (if the network has a calibration)
    above `threshold`."""
    score = calibrate(similarity) if calibrate is not None else similarity
    return {
        f"{prefix}copy_fraction": score.gt(threshold).double().mean().item(),
        f"{prefix}sim_mean": similarity.mean().item(),
        f"{prefix}sim_95pc": torch.quantile(similarity.double(), 0.95).item(),
    }
