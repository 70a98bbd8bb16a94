"""Gradient projection: concept-level exclusion during training (see shared/research/gradproj.md).

Text reaches a text-to-image UNet only through layers that multiply text-encoder token embeddings c:
the cross-attention key/value projections (`attn2.to_k`, `attn2.to_v`). For such a weight W (out x d) and
an orthonormal basis U (d x k) of the prohibited concepts' embedding subspace, every update is restricted
to the orthogonal complement with strength lambda:  dW <- dW - lambda * dW U U^T.  At lambda = 1, W u stays
at its starting value for every u in span(U): training cannot change how the layer responds to the concept.

Two modes:
- "update" (default): snapshot W before the optimizer step and project the step's whole change dW
  afterwards. Exact under AdamW's per-element scaling, weight decay, mixed precision and accumulation.
- "gradient": project the gradient before the optimizer. Cheaper to reason about, but AdamW's
  per-element scaling and weight decay leak concept components back in; kept for comparison.

Under LoRA (W = W0 + B A, A: r x d) the same is applied to A, and A is initialised as A (I - U U^T), so
(B A) u = 0 stays true whatever B learns.

Two opt-in extensions (bench/gradproj.py measures both): `counterfactual` adds the directions by which a
concept phrase changes the other tokens of its training captions, and `project_inputs` trains on caption
embeddings without their concept component, so layers after the frozen keys/values cannot decode it.
"""

from __future__ import annotations

import re

import torch

from memsafe.config import GradientProjectionConfig, RunConfig
from memsafe.errors import MemsafeError
from memsafe.train.hooks import TrainHook


def orthonormal_basis(vectors: torch.Tensor, rank: int | None, energy: float) -> torch.Tensor:
    """(d, k) orthonormal basis of the rows' span: the top-k right singular vectors, k = `rank` or the
    smallest k whose squared singular values reach `energy` of the total."""
    _, singular, vh = torch.linalg.svd(vectors.double(), full_matrices=False)
    if rank is None:
        cumulative = singular.pow(2).cumsum(0) / singular.pow(2).sum().clamp_min(1e-30)
        rank = int(torch.searchsorted(cumulative, torch.tensor(energy, dtype=cumulative.dtype)).item()) + 1
    return vh[: min(rank, vh.shape[0])].T.float()


def token_embeddings(encoder, prompts: list[str]) -> torch.Tensor:
    """Every token position of every prompt as a row: what cross-attention keys and values read."""
    return encoder.encode(prompts).reshape(-1, encoder.dim)


def without_concept(caption: str, phrases: list[str]) -> str | None:
    """The caption with its longest concept phrase removed, or None when it names no concept."""
    for phrase in sorted(phrases, key=len, reverse=True):
        pattern = rf"\b{re.escape(phrase.strip())}\b"
        if phrase.strip() and re.search(pattern, caption, flags=re.IGNORECASE):
            return " ".join(re.sub(pattern, " ", caption, count=1, flags=re.IGNORECASE).split())
    return None


def allowed_captions(captions: list[str] | None, phrases: list[str], limit: int = 512) -> list[str]:
    """Training captions that name no concept: what the model must keep learning, so neutral directions."""
    return [c for c in sorted(set(captions or [])) if without_concept(c, phrases) is None][:limit]


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
    if config.concept_images:
        raise MemsafeError(
            "defense.gradient_projection.concept_images needs a joint text-image encoder; "
            "the configured text encoder has no image tower"
        )
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
    differences = counterfactual_differences(encoder, config.concepts, captions) if config.counterfactual else None
    if differences is not None:
        known = torch.cat([neutral_basis, basis], 1)
        spread = differences.double() - differences.double() @ known @ known.T
        if spread.norm() > 1e-6 * differences.norm():
            extra = orthonormal_basis(spread, None, config.energy).double()
            basis = torch.linalg.qr(torch.cat([basis, extra], 1)).Q
            stats["counterfactual_rank"] = extra.shape[1]
    stats["rank"] = basis.shape[1]
    return basis.float(), stats


def projected_parameters(model: torch.nn.Module, layers: list[str], dim: int) -> dict[str, torch.nn.Parameter]:
    """Trainable weights that multiply d-dimensional text embeddings in the matching layers: the Linear
    weight itself (full fine-tuning) or, under LoRA, the adapter's `lora_A` factor."""
    found = {}
    for name, module in model.named_modules():
        if not any(name.endswith(suffix) or f"{suffix}." in f"{name}." for suffix in layers):
            continue
        for pname, param in module.named_parameters(recurse=True):
            if not param.requires_grad or param.dim() != 2 or param.shape[1] != dim:
                continue
            if "lora_B" in pname:
                continue
            found[f"{name}.{pname}"] = param
    if not found:
        raise MemsafeError(
            f"no trainable layer of the model matches defense.gradient_projection.layers {layers} "
            f"(with {dim}-d inputs): a text-conditional UNet reads text in attn2.to_k / attn2.to_v"
        )
    return found


class GradientProjection(TrainHook):
    name = "gradient_projection"

    def __init__(self, basis: torch.Tensor, config: GradientProjectionConfig, stats: dict[str, float] | None = None):
        self.basis = basis  # (d, k), orthonormal columns
        self.config = config
        self.strength = config.strength
        self.stats = dict(stats or {})
        self.params: dict[str, torch.nn.Parameter] = {}
        self.before: torch.Tensor | None = None  # the projected weights before the optimizer step, stacked
        self.removed_sq = self.total_sq = 0.0

    def attach(self, model: torch.nn.Module) -> None:
        self.params = projected_parameters(model, self.config.layers, self.basis.shape[0])
        self.rows = [p.shape[0] for p in self.params.values()]
        with torch.no_grad():
            for name, param in self.params.items():
                if "lora_A" in name:  # start the adapter orthogonal to the concepts
                    param.sub_(self._component(param))

    def _on_basis(self, matrix: torch.Tensor) -> torch.Tensor:
        """Coordinates of the rows of `matrix` on the basis: (rows, k)."""
        return matrix @ self.basis.to(device=matrix.device, dtype=matrix.dtype)

    def _from_basis(self, coordinates: torch.Tensor) -> torch.Tensor:
        """Rows back in the d-dimensional space: (rows, d)."""
        return coordinates @ self.basis.to(device=coordinates.device, dtype=coordinates.dtype).T

    def _component(self, matrix: torch.Tensor) -> torch.Tensor:
        return self._from_basis(self._on_basis(matrix))

    def _stacked(self, tensors) -> torch.Tensor:
        """All projected matrices as one (sum of rows, d) matrix: one product per step instead of one per layer."""
        return torch.cat([t.detach() for t in tensors])

    def _subtract(self, targets, stacked_component: torch.Tensor) -> None:
        for target, part in zip(targets, stacked_component.split(self.rows)):
            target.sub_(part, alpha=self.strength)

    def on_train_start(self, trainer) -> None:
        self.attach(trainer.unwrapped)

    def on_batch_start(self, batch, trainer):
        states = batch["model_kwargs"].get("encoder_hidden_states")
        if not self.config.project_inputs or states is None:
            return batch
        projected = states - self.strength * self._component(states)
        return batch | {"model_kwargs": batch["model_kwargs"] | {"encoder_hidden_states": projected}}

    def on_after_backward(self, model, trainer) -> None:
        if not self.params:
            self.attach(model)
        params = list(self.params.values())
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        with torch.no_grad():
            gradient = self._stacked(grads)
            on_basis = self._on_basis(gradient)
            # ||G U U^T|| = ||G U|| for orthonormal U. Kept as tensors: no device sync per step.
            self.removed_sq = self.removed_sq + on_basis.pow(2).sum() * self.strength**2
            self.total_sq = self.total_sq + gradient.pow(2).sum()
            if self.config.mode == "gradient":
                self._subtract(grads, self._from_basis(on_basis))
            else:
                self.before = self._stacked(params)

    def on_after_step(self, model, trainer) -> None:
        if self.config.mode != "update" or self.before is None:
            return
        params = list(self.params.values())
        with torch.no_grad():
            change = self._stacked(params) - self.before
            self._subtract(params, self._component(change))
        self.before = None

    def log_values(self) -> dict[str, float]:
        """Share of the projected layers' gradient norm removed since the last log."""
        total = float(self.total_sq)
        share = (float(self.removed_sq) / total) ** 0.5 if total else 0.0
        self.removed_sq = self.total_sq = 0.0
        return {"removed_grad_norm": share, "rank": float(self.basis.shape[1])}

    def state_dict(self):
        return {"basis": self.basis, "strength": self.strength}

    def load_state_dict(self, state):
        if "basis" in state:
            self.basis = state["basis"].float()


def hook_maker(config: RunConfig, train_set):
    """Builds the concept basis once; each call of the returned function makes a fresh hook (one per
    trainer, e.g. per IET proxy)."""
    if config.model.conditioning != "text":
        raise MemsafeError("defense gradient_projection needs a text-conditional model (model.conditioning: text)")
    from memsafe.models.text import TextEncoder

    encoder = TextEncoder(config.model.text_encoder, config.model.max_text_length)
    basis, stats = concept_basis(encoder, config.defense.gradient_projection, train_set.captions)
    return lambda: [GradientProjection(basis, config.defense.gradient_projection, stats)]
