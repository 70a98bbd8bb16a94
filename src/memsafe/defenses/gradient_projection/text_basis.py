"""The concepts' subspace of text-encoder token embeddings (`space: text`), the paper's basis."""

from __future__ import annotations

import torch

from memsafe.defenses.gradient_projection.captions import allowed_captions, without_concept
from memsafe.defenses.gradient_projection.config import GradientProjectionConfig
from memsafe.defenses.gradient_projection.subspace import orthonormal_basis
from memsafe.errors import MemsafeError


def token_embeddings(encoder, prompts: list[str]) -> torch.Tensor:
    """Every token position of every prompt as a row: what cross-attention keys and values read. Under an
    encoder that pads without a mask (CLIP in Stable Diffusion, 77 positions) only each prompt's own tokens,
    start to end token: the padding repeats the end token at every further position, and a handful of neutral
    prompts would otherwise span the whole embedding space."""
    states = encoder.encode(prompts)
    if getattr(encoder, "use_mask", True):
        return states.reshape(-1, encoder.dim)
    return torch.cat([row[:length] for row, length in zip(states, encoder.token_counts(prompts))])


def counterfactual_differences(encoder, phrases: list[str], captions: list[str] | None, limit: int = 512):
    """Position by position, how naming a concept changes the embeddings of a training caption: each
    caption that names one against itself with the phrase removed, (rows, d). A bidirectional encoder
    spreads a phrase into every token of its caption, where the concept tokens' own directions miss it."""
    pairs = {c: without_concept(c, phrases) for c in sorted(set(captions or []))}
    named = [c for c, rest in pairs.items() if rest is not None][:limit]
    if not named:
        return None
    return (encoder.encode(named) - encoder.encode([pairs[c] for c in named])).reshape(-1, encoder.dim)


def concept_basis(encoder, config: GradientProjectionConfig, captions: list[str] | None = None):
    """Orthonormal basis U (d, k) of the concepts' embedding subspace after removing the neutral directions,
    extended by the counterfactual directions of the training `captions` that name a concept; and
    diagnostics (ranks, share of concept energy that was neutral)."""
    if not config.concepts:
        raise MemsafeError("defense.gradient_projection.concepts is empty: name at least one prohibited concept")
    if config.rank is not None and not 1 <= config.rank <= encoder.dim:
        raise MemsafeError(
            f"defense.gradient_projection.rank {config.rank} must be between 1 and the embedding dimension {encoder.dim}"
        )
    concept = token_embeddings(encoder, config.concepts).double()
    kept_captions = allowed_captions(captions, config.concepts) if config.neutral_captions else []
    neutral = token_embeddings(encoder, config.neutral + kept_captions)
    neutral_basis = orthonormal_basis(neutral, None, config.neutral_energy).double()
    residual = concept - concept @ neutral_basis @ neutral_basis.T
    # The neutral basis keeps `neutral_energy` of the neutral spectrum, so a neutral prompt leaves a
    # residual of about (1 - neutral_energy); twice that counts as nothing left.
    floor = 2.0 * (1.0 - config.neutral_energy)
    for prompt in config.concepts:
        own = token_embeddings(encoder, [prompt]).double()
        left = own - own @ neutral_basis @ neutral_basis.T
        if left.norm() ** 2 <= floor * own.norm() ** 2 or own.norm() == 0:
            raise MemsafeError(
                f"concept '{prompt}' has no embedding left outside the neutral prompts' subspace: "
                "its embeddings are zero or neutral"
            )
    basis = orthonormal_basis(residual, config.rank, config.energy).double()
    stats = {
        "concept_rank": basis.shape[1],
        "neutral_rank": neutral_basis.shape[1],
        "neutral_share": 1.0 - (residual.norm() ** 2 / concept.norm() ** 2).item(),
        "counterfactual_rank": 0,
    }
    differences = counterfactual_differences(encoder, config.concepts, captions) if config.experimental.counterfactual else None
    if differences is not None:
        known = torch.cat([neutral_basis, basis], 1)
        spread = differences.double() - differences.double() @ known @ known.T
        if spread.norm() > 1e-6 * differences.norm():
            extra = orthonormal_basis(spread, None, config.energy).double()
            basis = torch.linalg.qr(torch.cat([basis, extra], 1)).Q
            stats["counterfactual_rank"] = extra.shape[1]
    stats["rank"] = basis.shape[1]
    return basis.float(), stats


def text_moment(encoder, prompts: list[str]) -> torch.Tensor:
    """(d, d) mean of x x^T over every token embedding of the prompts: where the encoder's outputs lie."""
    tokens = token_embeddings(encoder, sorted(set(prompts))).double()
    return tokens.T @ tokens / len(tokens)
