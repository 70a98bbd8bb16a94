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


def own_image_nearest(samples: torch.Tensor, own: torch.Tensor, others: torch.Tensor,
                      own_index: torch.Tensor | None = None) -> torch.Tensor:
    """Per generation, whether the image its prompt captions (`own`, one row per sample) is more similar to it
    than every image of `others` (unit features); `own_index[i]`, where the own image is itself a row of
    `others`, leaves that row out. A ranking, not a threshold: it reads a noisy copy of the prompt's image as
    a copy, and a caption's ordinary look as none (the rate for prompts of images never trained on is its
    baseline)."""
    similarity = samples @ others.T
    if own_index is not None:
        similarity[torch.arange(len(samples)), own_index] = -torch.inf
    return (samples * own).sum(1) > similarity.max(1).values
