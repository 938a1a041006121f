"""Near-field blocks for the Qeq preconditioner: the strong short-range couplings (bonded neighbours).

The k-space preconditioner (:mod:`.kspace_preconditioner`) models the Qeq
operator H = D + K at long wavelengths with the diagonal D as the local part;
what remains are the short-range couplings, e.g. an O–H pair at 1 Å couples
as strongly as the diagonal (k_e erf(r/√2σ)/r = 9.8 eV/e² against 12.5).
Here the atoms are grouped into small blocks of near neighbours (connected
components of the pairs closer than :data:`NEAR_CUTOFF`, larger components cut
into chunks of at most :data:`MAX_BLOCK` atoms in index order), and each block
gets the exact local operator

    B = D + K_near,    (K_near)_ij = k_e erf(r_ij/(√2σ))/r_ij  (i ≠ j in one block),

over all pairs of the block (e.g. also H–H in water), the Coulomb matrix of the
block's Gaussian charges at nearest-image distances, with its eigenvalues
floored at :data:`EIGENVALUE_FLOOR` × min D so that B is SPD whatever the
geometry.  The combined preconditioner is the congruence

    P⁻¹ = B^{-½} D^{½} P_k⁻¹ D^{½} B^{-½}

(P_k⁻¹ the k-space one, or D⁻¹ for open structures, where P⁻¹ = B⁻¹, block
Jacobi): symmetric positive definite by construction, equal to P_k⁻¹ where the
blocks are single atoms, and it removes the intramolecular stiffness from the
spectrum that CG sees (water, 1,000 atoms, rtol 1e-10: 51 → 33 iterations).
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from ..units import COULOMB_CONSTANT
from .linear_solve import Preconditioner
from .pairs import all_pairs_within, periodic_pairs_within_cutoff

#: Atoms closer than this (Å) share a block (covalent bonds; not hydrogen bonds at ≳ 1.6 Å).
NEAR_CUTOFF = 1.25

#: Largest block (atoms); larger connected components are cut into chunks.
MAX_BLOCK = 8

#: Smallest eigenvalue of a block, as a fraction of the smallest diagonal entry in it.
EIGENVALUE_FLOOR = 0.05


def near_field_preconditioner(
    positions: torch.Tensor,
    cell: torch.Tensor,
    pbc: torch.Tensor,
    batch: torch.Tensor,
    diagonal: torch.Tensor,
    smearing: float,
    inner: Optional[Preconditioner] = None,
) -> Optional[Preconditioner]:
    """``r ↦ P⁻¹ r`` (module docstring) for the Qeq operator of a batch; None where no atoms pair up.

    Args:
        positions: (N, 3) Å; cell: (B, 3, 3) Å; pbc: (B, 3); batch: (N,) sorted.
        diagonal: (N,) D, eV/e² (H's diagonal: hardness plus Gaussian self-energy).
        smearing: σ, Å.
        inner: P_k⁻¹ (e.g. the k-space preconditioner), None: D⁻¹.
    """
    with torch.no_grad():
        positions, cell, diagonal = positions.detach(), cell.detach(), diagonal.detach()
        first, second = _near_pairs(positions, cell, pbc, batch)
        if first.numel() == 0:
            return None
        block, slot = _blocks(len(positions), first, second)
        n_blocks, size = int(block.max()) + 1, int(slot.max()) + 1
        members = torch.full((n_blocks, size), -1, dtype=torch.long, device=positions.device)
        members[block, slot] = torch.arange(len(positions), device=positions.device)
        present = members >= 0
        safe = members.clamp_min(0)
        displacement = positions[safe][:, None, :, :] - positions[safe][:, :, None, :]  # (n_blocks, m, m, 3)
        owner = batch[safe[:, 0]]
        periodic = pbc.all(dim=1)[owner]
        eye = torch.eye(3, dtype=positions.dtype, device=positions.device)
        block_cell = torch.where(periodic[:, None, None], cell[owner], eye)  # open: any invertible cell
        fractional = displacement @ torch.linalg.inv(block_cell)[:, None]
        fractional = torch.where(periodic[:, None, None, None], fractional - torch.round(fractional), fractional)
        distance = (fractional @ block_cell[:, None]).norm(dim=-1)  # nearest image
        pair = present[:, :, None] & present[:, None, :] & (distance > 0)
        safe_distance = torch.where(pair, distance, torch.ones_like(distance))
        coupling = COULOMB_CONSTANT * torch.erf(safe_distance / (math.sqrt(2.0) * smearing)) / safe_distance
        matrices = torch.where(pair, coupling, torch.zeros_like(coupling))
        padded_diagonal = torch.ones(n_blocks, size, dtype=positions.dtype, device=positions.device)
        padded_diagonal[block, slot] = diagonal
        matrices = matrices + torch.diag_embed(padded_diagonal)
        values, vectors = torch.linalg.eigh(matrices)
        floor = EIGENVALUE_FLOOR * padded_diagonal.min(dim=1).values[:, None]
        inverse_root = vectors @ torch.diag_embed(values.clamp_min(floor).rsqrt()) @ vectors.transpose(1, 2)
        root_diagonal = diagonal.sqrt()

    def blockwise(values_: torch.Tensor) -> torch.Tensor:
        padded = values_.new_zeros(n_blocks, size).index_put((block, slot), values_)
        return torch.bmm(inverse_root, padded[:, :, None])[:, :, 0][block, slot]

    def apply(residual: torch.Tensor) -> torch.Tensor:
        scaled = root_diagonal * blockwise(residual)
        middle = scaled / diagonal if inner is None else inner(scaled)
        return blockwise(root_diagonal * middle)

    return apply


def _near_pairs(
    positions: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor, batch: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(first, second) of the pairs closer than :data:`NEAR_CUTOFF` in fully periodic and open structures."""
    counts = torch.bincount(batch, minlength=cell.shape[0])
    periodic = pbc.all(dim=1)
    open_ = ~pbc.any(dim=1)
    firsts, seconds = [], []
    if bool(periodic.any()):
        pairs = periodic_pairs_within_cutoff(
            positions, cell, batch, counts, {int(i): NEAR_CUTOFF for i in torch.nonzero(periodic).flatten()}
        )
        firsts.append(pairs.first)
        seconds.append(pairs.second)
    if bool(open_.any()):
        pairs = all_pairs_within(batch, counts, open_, positions.dtype)
        close = (positions[pairs.second] - positions[pairs.first]).norm(dim=1) < NEAR_CUTOFF
        firsts.append(pairs.first[close])
        seconds.append(pairs.second[close])
    if not firsts:
        empty = torch.zeros(0, dtype=torch.long, device=positions.device)
        return empty, empty
    first, second = torch.cat(firsts), torch.cat(seconds)
    distinct = first != second  # an atom near its own image stays alone
    return first[distinct], second[distinct]


def _blocks(n_atoms: int, first: torch.Tensor, second: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(block, slot) of every atom: connected components of the pairs, cut into chunks of ≤ MAX_BLOCK."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    rows, columns = first.cpu().numpy(), second.cpu().numpy()
    graph = coo_matrix((np.ones(len(rows)), (rows, columns)), shape=(n_atoms, n_atoms))
    _, component = connected_components(graph, directed=False)
    order = np.argsort(component, kind="stable")
    sorted_components = component[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_components)) + 1]
    rank = np.arange(n_atoms) - np.repeat(starts, np.diff(np.r_[starts, n_atoms]))
    chunk = rank // MAX_BLOCK
    key = sorted_components.astype(np.int64) * (n_atoms // MAX_BLOCK + 1) + chunk
    _, block_sorted = np.unique(key, return_inverse=True)
    block, slot = np.empty(n_atoms, dtype=np.int64), np.empty(n_atoms, dtype=np.int64)
    block[order], slot[order] = block_sorted, rank % MAX_BLOCK
    device = first.device
    return torch.from_numpy(block).to(device), torch.from_numpy(slot).to(device)
