"""Data: the built-in digits, image folders, and the train / held-out split."""

from __future__ import annotations

import torch

from memsafe.config import DataConfig
from memsafe.data.digits import load_digits
from memsafe.data.image_folder import load_image_folder
from memsafe.data.ink_digits import load_ink_digits, load_stamped_digits
from memsafe.data.images import ImageSet, split_holdout, to_model_range, to_uint8, to_unit_range
from memsafe.errors import MemsafeError

BUILTIN_PREFIX = "builtin:"
BUILTIN_SETS = {
    "digits": load_digits,
    "ink-digits": lambda resolution, channels: load_ink_digits(resolution, channels, with_concept=True),
    "ink-digits-clean": lambda resolution, channels: load_ink_digits(resolution, channels, with_concept=False),
    "stamped-digits": lambda resolution, channels: load_stamped_digits(resolution, channels, with_concept=True),
    "stamped-digits-clean": lambda resolution, channels: load_stamped_digits(resolution, channels, with_concept=False),
}


def load_images(config: DataConfig) -> ImageSet:
    if config.source.startswith(BUILTIN_PREFIX):
        name = config.source[len(BUILTIN_PREFIX):]
        if name not in BUILTIN_SETS:
            raise MemsafeError(f"unknown built-in dataset '{name}' (have: {', '.join(BUILTIN_SETS)})")
        return BUILTIN_SETS[name](config.resolution, config.channels)
    return load_image_folder(config.source, config.resolution, config.channels, config.center_crop, lazy=True)


def load_dataset(config: DataConfig, images: ImageSet | None = None) -> tuple[ImageSet, ImageSet]:
    """(training images, held-out images) as the config asks (held out from `source`, or the
    `holdout_source` folder), from `images` when already loaded;
    `thin_text` and `exclude_text` filter the training images only (held-out images stay the same for every
    variant). Thinning comes first, so that filtering drops concept images from the same thinned set."""
    images = images if images is not None else load_images(config)
    if config.holdout_source:
        train, _ = split_holdout(images, config.max_train_images, 0, config.seed)
        holdout = load_image_folder(config.holdout_source, config.resolution, config.channels, config.center_crop,
                                    lazy=True)
        if config.holdout_images:
            holdout, _ = split_holdout(holdout, config.holdout_images, 0, config.seed)
    else:
        train, holdout = split_holdout(images, config.max_train_images, config.holdout_images, config.seed)
    train = thin_captions(train, config.thin_text, config.thin_except_text, config.seed)
    return exclude_captions(train, config.exclude_text), holdout


def exclude_captions(images: ImageSet, words: list[str]) -> ImageSet:
    if not words:
        return images
    keep = [i for i, caption in enumerate(captions_for(images, "data.exclude_text")) if not has_any(caption, words)]
    if not keep:
        raise MemsafeError(f"data.exclude_text {words} removes every training image")
    return images.subset(keep)


def captions_for(images: ImageSet, option: str) -> list[str]:
    if images.captions is None:
        raise MemsafeError(f"{option} needs captions (metadata.jsonl 'text' fields)")
    return images.captions


def has_any(caption: str, words: list[str]) -> bool:
    return any(word in caption for word in words)


def thin_captions(images: ImageSet, shares: dict[str, float], spared: list[str], seed: int) -> ImageSet:
    """Keeps `shares[word]` (a seeded draw) of the images whose caption has `word` and none of `spared`:
    content made scarce outside the images that carry a concept."""
    if not shares:
        return images
    captions = captions_for(images, "data.thin_text")
    generator = torch.Generator().manual_seed(seed)
    dropped: set[int] = set()
    for word, share in shares.items():
        if not isinstance(share, (int, float)) or isinstance(share, bool) or not 0.0 <= share <= 1.0:
            raise MemsafeError(f"data.thin_text['{word}'] must be a share in [0, 1], got {share!r}")
        candidates = [i for i, caption in enumerate(captions) if word in caption and not has_any(caption, spared)]
        if not candidates:
            raise MemsafeError(f"data.thin_text: no training caption has '{word}' (without {spared})")
        order = torch.randperm(len(candidates), generator=generator).tolist()
        dropped |= {candidates[j] for j in order[round(share * len(candidates)):]}
    return images.subset([i for i in range(len(images)) if i not in dropped])


__all__ = ["ImageSet", "load_dataset", "load_images", "split_holdout", "to_model_range", "to_uint8", "to_unit_range"]
