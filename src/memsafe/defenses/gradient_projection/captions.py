"""Which captions name a concept, and the caption without it."""

from __future__ import annotations

import functools
import re

import torch


def without_concept(caption: str, phrases: list[str]) -> str | None:
    """The caption with its longest concept phrase removed, or None when it names no concept."""
    for phrase in sorted(phrases, key=len, reverse=True):
        pattern = rf"\b{re.escape(phrase.strip())}\b"
        if phrase.strip() and re.search(pattern, caption, flags=re.IGNORECASE):
            return " ".join(re.sub(pattern, " ", caption, count=1, flags=re.IGNORECASE).split())
    return None


def names_concept(caption: str | None, concepts: list[str]) -> bool:
    return caption is not None and _names_concept(caption, tuple(concepts))


@functools.lru_cache(maxsize=1 << 16)
def _names_concept(caption: str, concepts: tuple[str, ...]) -> bool:
    # Memoised: hooks ask this of every caption of every step, and datasets repeat captions.
    return without_concept(caption, list(concepts)) is not None


def concept_mask(captions: list[str], concepts: list[str]) -> torch.Tensor:
    """(len(captions),) bool: which captions name a concept."""
    return torch.tensor([names_concept(c, concepts) for c in captions], dtype=torch.bool)


def allowed_captions(captions: list[str] | None, phrases: list[str], limit: int = 512) -> list[str]:
    """Training captions that name no concept: what the model must keep learning, so neutral directions."""
    return [c for c in sorted(set(captions or [])) if without_concept(c, phrases) is None][:limit]
