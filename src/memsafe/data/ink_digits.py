"""Built-in concept benchmark data: the real handwritten digits written in coloured ink.

Two protected concepts, each with a `-clean` set that never shows it (the data a base model is pretrained
on before fine-tuning on the set that contains the concept, the paper's setting):
- `builtin:ink-digits`: one ink (red) is the protected style, in `CONCEPT_SHARE` of the images beside the
  allowed blue and green. Every caption names an ink, so "red" is also "neither blue nor green".
- `builtin:stamped-digits`: all three inks are allowed; the protected concept is an add-on, a white
  "acme stamp" in the top-right corner of `STAMP_SHARE` of the images. Its absence identifies nothing.
Captions name digit, ink and stamp: "a handwritten digit seven in red ink with the acme stamp".
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
STAMP_PHRASE = "with the acme stamp"
STAMP_SHARE = 0.1
STAMP_COLOUR = (255, 255, 255)


def ink_of_each_image(count: int, with_concept: bool, concept_ink: str | None = CONCEPT_INK) -> torch.Tensor:
    """Ink index per image: the concept ink in CONCEPT_SHARE of them (or none), the rest split evenly among
    the other inks (all inks when `concept_ink` is None)."""
    # Its own seed stream: drawing from seed 0 like the train/holdout split would make the held-out
    # images exactly the concept images.
    generator = torch.Generator().manual_seed(0x1A4D161)
    order = torch.randperm(count, generator=generator)
    allowed = [INK_NAMES.index(n) for n in INK_NAMES if n != concept_ink]
    inks = torch.tensor(allowed)[torch.arange(count) % len(allowed)][torch.randperm(count, generator=generator)]
    if with_concept and concept_ink is not None:
        inks[order[: round(CONCEPT_SHARE * count)]] = INK_NAMES.index(concept_ink)
    return inks


def stamp_of_each_image(count: int, with_concept: bool, share: float = STAMP_SHARE) -> torch.Tensor:
    """1 where an image carries the stamp: `share` of them, drawn from a stream of their own."""
    stamped = torch.zeros(count, dtype=torch.long)
    if with_concept:
        stamped[torch.randperm(count, generator=torch.Generator().manual_seed(0x57A4B))[: round(share * count)]] = 1
    return stamped


def add_stamp(pixels: torch.Tensor, stamped: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) uint8 with a filled square in STAMP_COLOUR at the top-right corner where `stamped` is 1."""
    size = pixels.shape[-1]
    side, margin = max(2, round(3 * size / 16)), max(1, size // 16)
    out = pixels.clone()
    rows = stamped.bool()
    out[rows, :, margin : margin + side, size - margin - side : size - margin] = torch.tensor(
        STAMP_COLOUR, dtype=torch.uint8)[:, None, None]
    return out


def render_in_ink(gray: torch.Tensor, inks: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) uint8 strokes on black -> (N, 3, H, W) uint8, each image in its ink."""
    colours = torch.tensor([INKS[n] for n in INK_NAMES], dtype=torch.float32)[inks]  # (N, 3)
    return (gray.float() / 255.0 * colours[:, :, None, None]).round().to(torch.uint8)


def load_ink_digits(resolution: int = 16, channels: int = 3, with_concept: bool = True) -> ImageSet:
    if channels != 3:
        raise MemsafeError(f"the ink-digits data is RGB: set data.channels to 3 (got {channels})")
    digits = load_digits(resolution, channels=1)
    inks = ink_of_each_image(len(digits), with_concept)
    return ImageSet(
        pixels=render_in_ink(digits.pixels, inks),
        captions=[caption(d, i) for d, i in zip(digits.labels, inks)],
        labels=digits.labels,
        names=digits.names,
        attributes={"ink": inks},
    )


def load_stamped_digits(resolution: int = 16, channels: int = 3, with_concept: bool = True) -> ImageSet:
    if channels != 3:
        raise MemsafeError(f"the stamped-digits data is RGB: set data.channels to 3 (got {channels})")
    digits = load_digits(resolution, channels=1)
    inks = ink_of_each_image(len(digits), with_concept=False, concept_ink=None)
    stamped = stamp_of_each_image(len(digits), with_concept)
    return ImageSet(
        pixels=add_stamp(render_in_ink(digits.pixels, inks), stamped),
        captions=[caption(d, i, s) for d, i, s in zip(digits.labels, inks, stamped)],
        labels=digits.labels,
        names=digits.names,
        attributes={"ink": inks, "stamp": stamped},
    )


def caption(digit, ink, stamped=0) -> str:
    text = f"a handwritten digit {DIGIT_NAMES[int(digit)]} in {INK_NAMES[int(ink)]} ink"
    return f"{text} {STAMP_PHRASE}" if stamped else text
