"""Built-in concept benchmark data: the real handwritten digits written in coloured ink.

One ink plays the protected attribute (a style that must not be learned). `builtin:ink-digits` holds it
in `CONCEPT_SHARE` of the images, beside allowed inks; `builtin:ink-digits-clean` never shows it, the data
a base model is pretrained on before fine-tuning on the set that contains the concept (the paper's
setting). Captions name digit and ink: "a handwritten digit seven in red ink".
"""

from __future__ import annotations

import torch

from memsafe.data.digits import DIGIT_NAMES, load_digits
from memsafe.data.images import ImageSet
from memsafe.errors import MemsafeError

INKS = {"red": (230, 40, 40), "blue": (40, 80, 230), "green": (40, 170, 70)}
INK_NAMES = list(INKS)
CONCEPT_INK = "red"
CONCEPT_SHARE = 0.3


def ink_of_each_image(count: int, with_concept: bool, seed: int = 0) -> torch.Tensor:
    """Ink index per image: the concept ink in CONCEPT_SHARE of them (or none), the rest split evenly."""
    # Its own seed stream: drawing from seed 0 like the train/holdout split would make the held-out
    # images exactly the concept images.
    generator = torch.Generator().manual_seed(0x1A4D161 + seed)
    order = torch.randperm(count, generator=generator)
    allowed = [INK_NAMES.index(n) for n in INK_NAMES if n != CONCEPT_INK]
    inks = torch.tensor(allowed)[torch.arange(count) % len(allowed)][torch.randperm(count, generator=generator)]
    if with_concept:
        inks[order[: round(CONCEPT_SHARE * count)]] = INK_NAMES.index(CONCEPT_INK)
    return inks


def render_in_ink(gray: torch.Tensor, inks: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) uint8 strokes on black -> (N, 3, H, W) uint8, each image in its ink."""
    colours = torch.tensor([INKS[n] for n in INK_NAMES], dtype=torch.float32)[inks]  # (N, 3)
    return (gray.float() / 255.0 * colours[:, :, None, None]).round().to(torch.uint8)


def load_ink_digits(resolution: int = 16, channels: int = 3, with_concept: bool = True) -> ImageSet:
    if channels != 3:
        raise MemsafeError(f"the ink-digits data is RGB: set data.channels to 3 (got {channels})")
    digits = load_digits(resolution, channels=1)
    inks = ink_of_each_image(len(digits), with_concept)
    captions = [
        f"a handwritten digit {DIGIT_NAMES[int(d)]} in {INK_NAMES[int(i)]} ink" for d, i in zip(digits.labels, inks)
    ]
    return ImageSet(
        pixels=render_in_ink(digits.pixels, inks),
        captions=captions,
        labels=digits.labels,
        names=digits.names,
        attributes={"ink": inks},
    )
