"""Measurements: nearest-neighbour memorization, copy detection, FID."""

from memsafe.metrics.copy_detection import copy_statistics, top1_similarity
from memsafe.metrics.evaluate import Evaluation, evaluate_samples
from memsafe.metrics.features import FeatureNet, domain_feature_net, load_feature_net, train_feature_net
from memsafe.metrics.fid import fid_inception, fid_with_features
from memsafe.metrics.nearest import (
    MQ_THRESHOLDS,
    Neighbours,
    distance_ratio,
    memorized_fraction,
    mq_counts,
    mq_scores,
    nearest_neighbours,
)

__all__ = [
    "MQ_THRESHOLDS", "Evaluation", "FeatureNet", "Neighbours", "copy_statistics", "distance_ratio",
    "domain_feature_net", "evaluate_samples", "fid_inception", "fid_with_features", "load_feature_net",
    "memorized_fraction", "mq_counts", "mq_scores", "nearest_neighbours", "top1_similarity", "train_feature_net",
]
