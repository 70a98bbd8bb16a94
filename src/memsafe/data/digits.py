"""The built-in dataset: scikit-learn's 1,797 real handwritten digits (8x8, shipped in the package), upscaled."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from memsafe.data.images import ImageSet

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def load_digits(resolution: int = 16, channels: int = 1) -> ImageSet:
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = torch.from_numpy(bunch.images).float().unsqueeze(1) / 16.0  # values 0..16 in the source
    images = F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False)
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).repeat(1, channels, 1, 1)
    labels = torch.from_numpy(bunch.target).long()
    return ImageSet(
        pixels=pixels,
        captions=[f"a handwritten digit {DIGIT_NAMES[int(y)]}" for y in labels],
        labels=labels,
        names=[f"digits/{i:04d}" for i in range(len(labels))],
    )
