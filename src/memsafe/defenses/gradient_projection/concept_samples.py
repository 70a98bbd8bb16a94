"""Projection scoped to the samples that show a concept (`defense.gradient_projection.experimental.scope: concept_samples`).

Under `scope: all` every sample's gradient is projected off the concept subspace, so captions that name no
concept can no longer adjust the directions they share with it; in activation space that is most of the
gradient. Here only the share of each weight's gradient that comes from samples whose caption names a
concept is projected. For a layer computing y = W x that share is the sum over those samples' rows of
dy x^T: a forward hook keeps their input rows, a hook on the layer's output adds dy^T x when backward
reaches it. Those samples still teach everything outside the subspace; the others train as without the
defense. There is no W u = W0 u guarantee here: samples that name no concept move W along u too.
"""

from __future__ import annotations

import torch

from memsafe.defenses.gradient_projection.activation_basis import input_rows, output_rows
from memsafe.defenses.gradient_projection.captions import concept_mask


class ConceptSampleGradients:
    """Per layer, the part of its weight gradient that the current step's concept samples contribute."""

    def __init__(self, modules: dict[str, torch.nn.Module], concepts: list[str]):
        self.concepts = concepts
        self.mask: torch.Tensor | None = None  # the current micro-batch's concept samples
        self.sums: dict[str, torch.Tensor] = {}
        self.handles = [module.register_forward_hook(self._collector(name)) for name, module in modules.items()]

    def select(self, captions: list[str] | None) -> None:
        """The micro-batch's captions: the next forward collects the rows of those naming a concept."""
        self.mask = None if captions is None else concept_mask(captions, self.concepts)

    def _collector(self, name: str):
        def collect(module, args, output):
            if self.mask is None or not self.mask.any() or not output.requires_grad:
                return
            mask = self.mask.to(output.device)
            rows = input_rows(module, args[0].detach()[mask]).float()

            def add(grad):
                self.sums[name] = self.sums.get(name, 0) + output_rows(grad[mask]).float().T @ rows

            output.register_hook(add)

        return collect

    def take(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """The layer's collected share as `like` flattened to (out, fan_in), zero when none; then forgets it."""
        share = self.sums.pop(name, None)
        if share is None:
            return torch.zeros_like(like.flatten(1))
        return share.to(like.dtype)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles, self.sums = [], {}
