"""Gaussian-damped dipole field tensor for open-boundary structures.

(Periodic structures: the tin-foil Ewald sum in :mod:`.dipole_ewald`.)

With the engine's smeared pair kernel ψ(r) = erf(a r)/r, a = 1/(√2 σ), a
point dipole p_j at r_j produces at r_i the field T_ij p_j with

    T_ij = k_e ∇∇ψ(R),  R = r_i - r_j,
    ∇∇ψ = -f(r) I + g(r) R Rᵀ,
    f(r) = [erf(a r) - (2 a r/√π) exp(-a²r²)] / r³,
    g(r) = 3 f(r)/r² - (4 a³/√π) exp(-a²r²)/r²

(σ = 0 gives the bare tensor (3 R Rᵀ - r² I)/r⁵).  T_ij = T_ji = T_ijᵀ.

Positivity: ψ has a positive Fourier transform, so the dipolar energy of any
set of Gaussian-smeared dipoles, *self terms included*, is ≥ 0.  The self term
is -k_e ∇∇ψ(0) = c I with c = k_e 4a³/(3√π), so T ⪯ c I for the off-diagonal
tensor, and I - S T S ⪰ I - c S² is positive definite whenever every
polarisability α_i < 1/c (S = diag √α_i): no polarisation catastrophe below
that bound (:func:`catastrophe_free_polarizability`).
"""

from __future__ import annotations

import math

import torch

from ..units import COULOMB_CONSTANT
from .pairs import PairList, all_pairs_within


def open_pairs(batch: torch.Tensor, n_structures: int, dtype: torch.dtype) -> PairList:
    """Every pair i < j within each (open-boundary) structure of a batch."""
    counts = torch.bincount(batch, minlength=n_structures)
    selected = torch.ones(n_structures, dtype=torch.bool, device=batch.device)
    return all_pairs_within(batch, counts, selected, dtype)


def damped_dipole_tensor(vectors: torch.Tensor, smearing: torch.Tensor) -> torch.Tensor:
    """(P, 3, 3) k_e ∇∇ψ(R) in V/(e·Å²) for pair vectors R (P, 3), Å; σ > 0 (Å)."""
    r2 = (vectors * vectors).sum(dim=1)
    r = r2.sqrt()
    a = 1.0 / (math.sqrt(2.0) * smearing)
    gauss = torch.exp(-(a * r) ** 2)
    f = (torch.erf(a * r) - 2.0 * a * r / math.sqrt(math.pi) * gauss) / (r2 * r)
    g = (3.0 * f - 4.0 * a**3 / math.sqrt(math.pi) * gauss) / r2
    eye = torch.eye(3, dtype=vectors.dtype, device=vectors.device)
    tensor = -f[:, None, None] * eye + g[:, None, None] * vectors[:, :, None] * vectors[:, None, :]
    return COULOMB_CONSTANT * tensor


def catastrophe_free_polarizability(smearing: torch.Tensor) -> torch.Tensor:
    """1/c = 3√π / (4 k_e a³), e·Å²/V: polarisabilities below it keep I - S T S positive definite."""
    a = 1.0 / (math.sqrt(2.0) * smearing)
    return 3.0 * math.sqrt(math.pi) / (4.0 * COULOMB_CONSTANT * a**3)


def dipole_field(dipoles: torch.Tensor, pairs: PairList, tensors: torch.Tensor) -> torch.Tensor:
    """(N, 3) field Σ_j T_ij p_j (V/Å) of dipoles (N, 3) e·Å at every atom (j ≠ i)."""
    field = torch.zeros_like(dipoles)
    field = field.index_add(0, pairs.first, torch.einsum("pab,pb->pa", tensors, dipoles[pairs.second]))
    return field.index_add(0, pairs.second, torch.einsum("pab,pb->pa", tensors, dipoles[pairs.first]))


def dense_dipole_tensor(n_atoms: int, pairs: PairList, tensors: torch.Tensor) -> torch.Tensor:
    """(3N, 3N) matrix of T (block-diagonal over structures), for dense reference solves."""
    blocks = tensors.new_zeros(n_atoms, n_atoms, 3, 3).index_put((pairs.first, pairs.second), tensors)
    blocks = blocks + blocks.permute(1, 0, 3, 2)
    return blocks.permute(0, 2, 1, 3).reshape(3 * n_atoms, 3 * n_atoms)
