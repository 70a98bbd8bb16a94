"""The sink: a private direction that explains the concept samples' content instead of allowed content."""

from __future__ import annotations

import torch

from memsafe.errors import MemsafeError


def sink_vector(moment: torch.Tensor, frozen: list[torch.Tensor]) -> tuple[torch.Tensor, float]:
    """The sink (d,): among the directions that no frozen basis (d, k) touches, the one the text tokens use
    least, at their RMS norm; and the share of the tokens' mean energy along it. With the text route frozen,
    training still has to explain the concept in the concept images, and would otherwise tie it to allowed
    content that comes with it; added to those samples' embeddings, the sink explains it instead. The concept
    stays in the weights, behind a vector no caption reaches: it stops prompts, not someone who has the weights."""
    dim = moment.shape[0]
    covered = sum((b.double() @ b.double().T for b in frozen), torch.zeros(dim, dim, dtype=torch.float64))
    values, vectors = torch.linalg.eigh(covered)
    free = vectors[:, values < 1e-6]
    if free.shape[1] == 0:
        raise MemsafeError("defense.gradient_projection.sink: the projected subspaces cover the whole text-embedding "
                           "space, so no direction is left for the sink; lower energy / activation_energy or rank")
    _, least = torch.linalg.eigh(free.T @ moment @ free)
    direction = free @ least[:, 0]
    share = (direction @ moment @ direction / moment.trace()).item()
    return (direction * moment.trace().sqrt()).float(), share
