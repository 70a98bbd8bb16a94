"""FID through torchmetrics, with memsafe's domain features or, when its weights are on disk, Inception-v3."""

from __future__ import annotations

from pathlib import Path

import torch
from torchmetrics.image.fid import FrechetInceptionDistance

from memsafe.errors import MemsafeError


def _batches(images: torch.Tensor, size: int = 256):
    for start in range(0, len(images), size):
        yield images[start : start + size]


@torch.no_grad()
def fid_with_features(real: torch.Tensor, fake: torch.Tensor, feature_net: torch.nn.Module) -> float:
    """FID between two sets of model-range images in the feature space of `feature_net`."""
    metric = FrechetInceptionDistance(feature=feature_net.eval(), reset_real_features=True)
    for batch in _batches(real):
        metric.update(batch, real=True)
    for batch in _batches(fake):
        metric.update(batch, real=False)
    return float(metric.compute())


@torch.no_grad()
def fid_inception(real: torch.Tensor, fake: torch.Tensor, weights_path: str | Path) -> float:
    """Standard FID (Inception-v3 pool features) from a local copy of the pytorch-fid weights."""
    weights_path = Path(weights_path)
    if not weights_path.is_file():
        raise MemsafeError(f"eval.inception_weights file not found: {weights_path}")
    try:
        metric = FrechetInceptionDistance(feature=2048, normalize=True, feature_extractor_weights_path=str(weights_path))
    except ModuleNotFoundError as exc:
        raise MemsafeError("Inception FID needs torch-fidelity: pip install 'memsafe[inception]'") from exc

    def as_rgb01(images: torch.Tensor) -> torch.Tensor:
        images = ((images.float() + 1) / 2).clamp(0, 1)
        return images.repeat(1, 3, 1, 1) if images.shape[1] == 1 else images

    for batch in _batches(real):
        metric.update(as_rgb01(batch), real=True)
    for batch in _batches(fake):
        metric.update(as_rgb01(batch), real=False)
    return float(metric.compute())
