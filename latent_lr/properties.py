"""Dipoles, polarisation and Born effective charges from latent charges.

Conventions
-----------
* Dipole (open boundary): μ = Σ_i q_i r_i in e·Å, about the origin of the
  given coordinates (origin-dependent for charged structures).
* Polarisation (periodic): P = (1/V) Σ_a a_a φ_a with φ_a = Σ_i q_i s_ia the
  charge-weighted fractional coordinate along lattice vector a_a, reduced to
  the branch φ_a ∈ [-1/2, 1/2). This is the classical point-charge form of the
  Berry-phase (Resta/King-Smith–Vanderbilt) polarisation: like it, P is defined
  modulo the quantum a_a / V per unit charge, and only changes of P along a
  continuous path are physical.  Units: e/Å².
* Born effective charges: Z*_i,αβ = ∂M_α/∂r_iβ (e), with M the dipole of a
  molecule or the cell dipole V P of a crystal.  Writing q_j(r) for latent
  charges that depend on all positions,

      Z*_i,αβ = q_i δ_αβ + Σ_j d_ij,α ∂q_j/∂r_iβ,

  where d_ij = r_j - r_i for open boundaries and, for periodic cells, the
  smooth periodic vector d_ij = Σ_a a_a sin(2π (s_ja - s_ia)) / 2π (the
  Berry-phase weighting seen from atom i), which is independent of the
  periodic images chosen and equals r_j - r_i for nearby atoms in large cells.
  For open boundaries translation invariance of the charges makes the
  acoustic sum rule Σ_i Z*_i = Q·1 exact.  For periodic cells the sine
  weighting breaks it at order (cut-off / cell length)²; as in DFPT codes,
  :func:`born_effective_charges` then restores it by subtracting the
  per-structure mean violation (``enforce_sum_rule=True``, the default).
"""

from __future__ import annotations

import math

import torch


def dipole_moment(charges: torch.Tensor, positions: torch.Tensor, batch: torch.Tensor, n_structures: int) -> torch.Tensor:
    """(B, 3) dipoles Σ q_i r_i, e·Å."""
    return positions.new_zeros(n_structures, 3).index_add(0, batch, charges[:, None] * positions)


def polarization(
    charges: torch.Tensor, positions: torch.Tensor, cell: torch.Tensor, batch: torch.Tensor
) -> torch.Tensor:
    """(B, 3) Berry-phase-branch polarisation, e/Å² (zeros for singular cells)."""
    n_structures = cell.shape[0]
    volume = torch.linalg.det(cell)
    usable = volume.abs() > 1e-12
    safe_cell = torch.where(usable[:, None, None], cell, torch.eye(3, dtype=cell.dtype, device=cell.device))
    fractional = torch.einsum("ib,iba->ia", positions, torch.linalg.inv(safe_cell)[batch])
    phase = positions.new_zeros(n_structures, 3).index_add(0, batch, charges[:, None] * fractional)
    phase = phase - torch.floor(phase + 0.5).detach()
    cell_dipole = torch.einsum("ba,bac->bc", phase, safe_cell)
    polarisation = cell_dipole / torch.where(usable, volume.abs(), torch.ones_like(volume))[:, None]
    return torch.where(usable[:, None], polarisation, torch.zeros_like(polarisation))


def born_effective_charges(
    charges: torch.Tensor,
    positions: torch.Tensor,
    cell: torch.Tensor,
    pbc: torch.Tensor,
    batch: torch.Tensor,
    create_graph: bool = False,
    enforce_sum_rule: bool = True,
) -> torch.Tensor:
    """(N, 3, 3) Born effective charges Z*_i,αβ = ∂M_α/∂r_iβ, in e.

    ``charges`` must have been computed from ``positions`` (which requires grad).
    Costs 3 backward passes for open structures and 6 for periodic ones.

    Args:
        charges: (N,) latent charges, e.
        positions: (N, 3) positions, Å, the leaf they were computed from.
        cell: (B, 3, 3); pbc: (B, 3); batch: (N,).
        create_graph: keep the graph for higher derivatives (training on BECs).
        enforce_sum_rule: for periodic structures, subtract the mean of
            Σ_i Z*_i - Q·1 over each structure's atoms (open structures satisfy
            the sum rule exactly and are left alone).
    """
    n_atoms = positions.shape[0]
    eye = torch.eye(3, dtype=positions.dtype, device=positions.device)
    bec = charges.detach()[:, None, None] * eye if not create_graph else charges[:, None, None] * eye
    if not charges.requires_grad:
        return bec
    periodic_atom = pbc.all(dim=1)[batch]
    open_atom = ~periodic_atom
    grads = []

    def gradient(weights: torch.Tensor) -> torch.Tensor:
        (g,) = torch.autograd.grad(
            (charges * weights).sum(), positions, retain_graph=True, create_graph=create_graph,
            allow_unused=True,
        )
        return torch.zeros_like(positions) if g is None else g

    coordinates = positions.detach()
    if bool(open_atom.any()):
        rows = []
        for alpha in range(3):
            weights = torch.where(open_atom, coordinates[:, alpha], torch.zeros_like(coordinates[:, alpha]))
            rows.append(gradient(weights))
        # Σ_j r_jα ∂q_j/∂r_iβ; subtracting r_iα Σ_j ∂q_j/∂r_iβ (zero at fixed charge) is unnecessary.
        open_part = torch.stack(rows, dim=1)
        bec = bec + torch.where(open_atom[:, None, None], open_part, torch.zeros_like(open_part))
    if bool(periodic_atom.any()):
        inverse = torch.linalg.inv(
            torch.where(pbc.all(dim=1)[:, None, None], cell, eye.expand_as(cell))
        ).detach()
        fractional = torch.einsum("ib,iba->ia", coordinates, inverse[batch])
        angle = 2.0 * math.pi * fractional
        lattice_part = positions.new_zeros(n_atoms, 3, 3)
        for a in range(3):
            sin_grad = gradient(torch.where(periodic_atom, torch.sin(angle[:, a]), torch.zeros_like(angle[:, a])))
            cos_grad = gradient(torch.where(periodic_atom, torch.cos(angle[:, a]), torch.zeros_like(angle[:, a])))
            local = (torch.cos(angle[:, a])[:, None] * sin_grad - torch.sin(angle[:, a])[:, None] * cos_grad) / (2.0 * math.pi)
            lattice_vector = cell.detach()[batch, a]
            lattice_part = lattice_part + lattice_vector[:, :, None] * local[:, None, :]
        bec = bec + torch.where(periodic_atom[:, None, None], lattice_part, torch.zeros_like(lattice_part))
        if enforce_sum_rule:
            n_structures = cell.shape[0]
            counts = torch.bincount(batch, minlength=n_structures).to(bec.dtype)
            total = bec.new_zeros(n_structures, 3, 3).index_add(0, batch, bec)
            total_charge = charges.new_zeros(n_structures).index_add(0, batch, charges)
            excess = (total - total_charge[:, None, None] * eye) / counts[:, None, None]
            bec = bec - torch.where(periodic_atom[:, None, None], excess[batch], torch.zeros_like(bec))
    return bec
