"""Linear algebra of concept subspaces: bases from spectra, and the projector M -> M U U^T."""

from __future__ import annotations

import torch


def orthonormal_basis(vectors: torch.Tensor, rank: int | None, energy: float) -> torch.Tensor:
    """(d, k) orthonormal basis of the rows' span: the top-k right singular vectors, k = `rank` or the
    smallest k whose squared singular values reach `energy` of the total."""
    _, singular, vh = torch.linalg.svd(vectors.double(), full_matrices=False)
    rank = energy_rank(singular.pow(2), energy) if rank is None else rank
    return vh[: min(rank, vh.shape[0])].T.float()


def energy_rank(spectrum: torch.Tensor, energy: float) -> int:
    """The smallest k whose first k values of a descending energy spectrum hold `energy` of its sum."""
    cumulative = spectrum.cumsum(0) / spectrum.sum().clamp_min(1e-30)
    return int(torch.searchsorted(cumulative, torch.tensor(energy, dtype=cumulative.dtype)).item()) + 1


def energy_basis(covariance: torch.Tensor, energy: float) -> torch.Tensor:
    """(d, k) eigenvectors of a covariance holding `energy` of its trace, largest first."""
    values, vectors = torch.linalg.eigh(covariance)
    values, vectors = values.flip(0).clamp_min(0), vectors.flip(1)
    return vectors[:, : min(energy_rank(values, energy), vectors.shape[1])]


def concept_specific_basis(concept: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """(d, k) orthonormal basis of the directions along which naming a concept moves the inputs more than
    changing to another allowed caption does: generalized eigenvectors of (concept, allowed) covariances
    with eigenvalue above 1, both per pair."""
    ridge = 1e-6 * allowed.diagonal().mean().clamp_min(1e-30)
    lower = torch.linalg.cholesky(allowed + ridge * torch.eye(len(allowed), dtype=allowed.dtype))
    whitened = torch.linalg.solve_triangular(lower, concept, upper=False)
    whitened = torch.linalg.solve_triangular(lower, whitened.T, upper=False)  # L^-1 C L^-T, symmetric
    ratios, vectors = torch.linalg.eigh((whitened + whitened.T) / 2)
    directions = torch.linalg.solve_triangular(lower.T, vectors[:, ratios > 1.0], upper=True)
    return torch.linalg.qr(directions).Q


class SubspaceProjector:
    """M -> M U U^T for an orthonormal basis U (d, k). When k > d / 2 it computes M - M Q Q^T with the
    complement Q instead: the smaller product (per-layer activation bases often take most of a layer)."""

    def __init__(self, basis: torch.Tensor, device: torch.device, dtype: torch.dtype):
        self.rank = basis.shape[1]
        self.complement = self.rank > basis.shape[0] / 2
        if self.complement:
            basis = basis.double()
            values, vectors = torch.linalg.eigh(torch.eye(len(basis), dtype=basis.dtype) - basis @ basis.T)
            basis = vectors[:, values > 0.5]
        self.basis = basis.to(device=device, dtype=dtype)

    def component(self, matrix: torch.Tensor) -> torch.Tensor:
        part = matrix @ self.basis @ self.basis.T
        return matrix - part if self.complement else part

    def energy(self, matrix: torch.Tensor) -> torch.Tensor:
        """||M U U^T||^2 = ||M U||^2, as a tensor (no device sync)."""
        inside = (matrix @ self.basis).pow(2).sum()
        return matrix.pow(2).sum() - inside if self.complement else inside
