"""All of memsafe's measurements of one set of generations against the training and held-out images."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from memsafe.config import EvalConfig
from memsafe.data.images import ImageSet, to_uint8
from memsafe.metrics.copy_detection import copy_statistics, top1_similarity
from memsafe.metrics.features import domain_feature_net, load_feature_net
from memsafe.metrics.fid import fid_inception, fid_with_features
from memsafe.metrics.nearest import (
    Neighbours,
    distance_ratio,
    distinct_nearest_neighbours,
    memorized_fraction,
    mq_counts,
    mq_scores,
)


@dataclass
class CopyReference:
    """The training images generations are compared with, embedded once in the copy features."""

    images: torch.Tensor  # model range
    features: torch.Tensor
    feature_net: Any

    @classmethod
    def build(cls, train_set: ImageSet, feature_net: torch.nn.Module) -> CopyReference:
        images = train_set.as_model_input()
        return cls(images=images, features=_embed(feature_net, images), feature_net=feature_net)


@dataclass
class Evaluation:
    metrics: dict
    samples: torch.Tensor  # model range
    neighbours: Neighbours  # pixel-space neighbours in the training set
    ratios: torch.Tensor  # NN1 / NN2 distance ratio per sample
    reference: CopyReference  # the training images in the copy features the samples were measured in


def feature_network(config: EvalConfig, real_images: ImageSet, progress: bool = True):
    """The user's feature network, or the domain network trained on `real_images`: every real image of
    the source (not only the training split), so that the network and its calibration see the domain's
    whole variety."""
    if config.features != "domain":
        return load_feature_net(config.features)
    return domain_feature_net(real_images.as_model_input(), progress=progress)


def copies(samples: torch.Tensor, reference: CopyReference, config: EvalConfig) -> tuple[dict, Neighbours, torch.Tensor]:
    """(readings, pixel-space neighbours, NN1 / NN2 ratios) of `samples` against the training images: the
    nearest-neighbour ratio and the copy features' similarity."""
    neighbours = distinct_nearest_neighbours(samples, reference.images, k=50)
    ratios = distance_ratio(neighbours)
    metrics: dict = {
        "memorized_fraction": memorized_fraction(ratios, config.memorization_threshold),
        "memorization_threshold": config.memorization_threshold,
        "nn_ratio_median": ratios.median().item(),
        "mq_counts": mq_counts(mq_scores(neighbours)),
    }
    similarity, _ = top1_similarity(_embed(reference.feature_net, samples), reference.features)
    calibrate = getattr(reference.feature_net, "calibrate", None)
    metrics |= copy_statistics(similarity, config.copy_threshold, calibrate=calibrate)
    return metrics, neighbours, ratios


def evaluate_samples(
    samples: torch.Tensor,
    train_set: ImageSet,
    holdout: ImageSet,
    config: EvalConfig,
    feature_net: torch.nn.Module | None = None,
    progress: bool = True,
    real_images: ImageSet | None = None,
) -> Evaluation:
    """Measure `samples` against the training images. The domain feature network is trained on
    `real_images` (default: training plus held-out images) unless `feature_net` is given."""
    if feature_net is None:
        if real_images is None:
            real_images = ImageSet(torch.cat([train_set.pixels, holdout.pixels]))
        feature_net = feature_network(config, real_images, progress)
    reference = CopyReference.build(train_set, feature_net)
    found, neighbours, ratios = copies(samples, reference, config)
    metrics: dict = {"num_samples": len(samples), "num_train_images": len(train_set)} | found
    calibrate = getattr(feature_net, "calibrate", None)
    if len(train_set) > 1:
        background, _ = top1_similarity(reference.features, reference.features, skip_self=True)
        metrics |= copy_statistics(background, config.copy_threshold, prefix="train_", calibrate=calibrate)
    metrics["copy_threshold"] = config.copy_threshold
    if calibrate is not None:
        # The calibrated threshold expressed as a raw cosine similarity.
        metrics["copy_threshold_cosine"] = feature_net.background_similarity + (config.copy_threshold - 0.5) * 2 * (
            1 - feature_net.background_similarity
        )

    metrics |= sscd_metrics(samples, train_set, holdout, config)

    reference_images, metrics["fid_reference"] = (
        (holdout.as_model_input(), "holdout") if len(holdout) >= 2 else (reference.images, "train")
    )
    if config.inception_weights:
        metrics["fid"] = fid_inception(reference_images, samples, config.inception_weights)
        metrics["fid_features"] = "inception"
    else:
        metrics["fid"] = fid_with_features(reference_images, samples, feature_net)
        metrics["fid_features"] = config.features
    return Evaluation(metrics=metrics, samples=samples, neighbours=neighbours, ratios=ratios, reference=reference)


# The readings of copies that `copy_readings` takes again on other samples of the same model.
COPY_READINGS = ("memorized_fraction", "copy_fraction", "copy_rate_sscd")


def copy_readings(samples: torch.Tensor, evaluation: Evaluation, train_set: ImageSet, holdout: ImageSet,
                  config: EvalConfig) -> dict:
    """COPY_READINGS of `samples` (SSCD's when `eval.sscd` measures it), taken as `evaluation` took its own:
    e.g. the same model's samples at another guidance scale."""
    found, _, _ = copies(samples, evaluation.reference, config)
    found |= sscd_metrics(samples, train_set, holdout, config)
    return {key: found[key] for key in COPY_READINGS if key in found}


def sscd_metrics(samples: torch.Tensor, train_set: ImageSet, holdout: ImageSet, config: EvalConfig) -> dict:
    """SSCD replication rate (metrics/sscd.py) when `eval.sscd` asks for it: "auto" measures colour images
    whenever the detector is installed, "on" requires it."""
    from memsafe.metrics import sscd

    colour = train_set.pixels.shape[1] == 3
    if config.sscd == "off" or (config.sscd == "auto" and not (colour and sscd.available())):
        return {}
    detector = sscd.SSCD(config.sscd_size)
    found, _ = sscd.sscd_statistics(detector, to_uint8(samples), train_set.pixels, holdout.pixels)
    return found


def _embed(net: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    if hasattr(net, "embed"):
        return net.embed(images)
    with torch.no_grad():
        return torch.nn.functional.normalize(torch.cat([net(b) for b in images.split(512)]).float(), dim=1)
