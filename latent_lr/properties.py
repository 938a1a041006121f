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
* Slabs (pbc = (True, True, False), open along the unit normal n̂ of the
  plane of the first two cell vectors): there is no bulk polarisation (the
  cell volume includes an arbitrary vacuum), so a slab reports its *dipole
  per cell* M (e·Å), i.e. per in-plane cell area A (M / A in e/Å is the
  surface dipole density that sets the potential step ΔV = M·n̂ / (ε₀ A)
  across the slab).  Its normal component M·n̂ = Σ_i q_i r_i·n̂ is exact and
  branch-free (origin-dependent only for a charged slab); its in-plane
  components follow the Berry-phase branch of the two periodic directions,
  as P does for crystals (defined modulo the quantum q a_a).  See
  :func:`slab_dipole`.
* Born effective charges: Z*_i,αβ = ∂M_α/∂r_iβ (e), with M the dipole of a
  molecule, the dipole per cell of a slab or the cell dipole V P of a
  crystal.  Along the normal of a slab d_ij is the open-boundary r_j - r_i,
  along its two periodic directions the sine weighting below.  Writing q_j(r) for latent
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
* Induced dipoles p_i (latent polarisabilities) add to both moments,
  M = Σ q_i r_i + Σ p_i, so Z* gains Σ_j ∂p_j,α/∂r_iβ (3 more backward passes);
  then ∂F_iβ/∂E_α = Z*_i,αβ still holds (Maxwell relation of the energy).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .electrostatics.slab import unit_normals


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


def slab_dipole(
    charges: torch.Tensor,
    positions: torch.Tensor,
    cell: torch.Tensor,
    batch: torch.Tensor,
    slab: torch.Tensor,
) -> torch.Tensor:
    """(B, 3) dipole per cell of slabs, e·Å (zeros for structures that are not slabs).

    M = φ_1 a_1 + φ_2 a_2 + (Σ_i q_i r_i·n̂) n̂ with φ_a = Σ_i q_i s_ia the
    charge-weighted fractional coordinates along the two in-plane lattice
    vectors, reduced to the branch [-1/2, 1/2), and n̂ the unit normal of
    the plane (the third cell vector's length plays no role).

    Args:
        charges: (N,) e; positions: (N, 3) Å; batch: (N,) structure index.
        cell: (B, 3, 3) lattice vectors as rows, Å.
        slab: (B,) bool, True for slabs (pbc = (True, True, False)).
    """
    eye = torch.eye(3, dtype=cell.dtype, device=cell.device)
    frame = _slab_frames(cell, slab)
    fractional = torch.einsum("ib,iba->ia", positions, torch.linalg.inv(frame)[batch])
    phase = positions.new_zeros(cell.shape[0], 3).index_add(0, batch, charges[:, None] * fractional)
    periodic_axes = eye[2] == 0  # reduce the two in-plane phases only
    phase = phase - torch.where(periodic_axes, torch.floor(phase + 0.5), torch.zeros_like(phase)).detach()
    dipole = torch.einsum("ba,bac->bc", phase, frame)
    return torch.where(slab[:, None], dipole, torch.zeros_like(dipole))


def _slab_frames(cell: torch.Tensor, slab: torch.Tensor) -> torch.Tensor:
    """(B, 3, 3) rows a_1, a_2, n̂ for slabs (n̂ the unit normal), the identity elsewhere (detached n̂)."""
    eye = torch.eye(3, dtype=cell.dtype, device=cell.device).expand_as(cell)
    safe = torch.where(slab[:, None, None], cell, eye)
    normal = unit_normals(safe.detach())
    return torch.where(slab[:, None, None], torch.cat([safe[:, :2], normal[:, None]], dim=1), eye)


def born_effective_charges(
    charges: torch.Tensor,
    positions: torch.Tensor,
    cell: torch.Tensor,
    pbc: torch.Tensor,
    batch: torch.Tensor,
    create_graph: bool = False,
    enforce_sum_rule: bool = True,
    induced_dipoles: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """(N, 3, 3) Born effective charges Z*_i,αβ = ∂M_α/∂r_iβ, in e.

    ``charges`` must have been computed from ``positions`` (which requires grad).
    Costs 3 backward passes for open structures, 5 for slabs and 6 for periodic ones.

    Args:
        charges: (N,) latent charges, e.
        positions: (N, 3) positions, Å, the leaf they were computed from.
        cell: (B, 3, 3); pbc: (B, 3); batch: (N,).
        create_graph: keep the graph for higher derivatives (training on BECs).
        enforce_sum_rule: for periodic structures and slabs, subtract the mean of
            Σ_i Z*_i - Q·1 over each structure's atoms (open structures satisfy
            the sum rule exactly and are left alone).
        induced_dipoles: (N, 3) e·Å computed from ``positions``, or None.
    """
    eye = torch.eye(3, dtype=positions.dtype, device=positions.device)
    bec = charges.detach()[:, None, None] * eye if not create_graph else charges[:, None, None] * eye
    if induced_dipoles is not None and induced_dipoles.requires_grad:
        rows = []
        for alpha in range(3):
            (g,) = torch.autograd.grad(
                induced_dipoles[:, alpha].sum(), positions, retain_graph=True, create_graph=create_graph,
                allow_unused=True,
            )
            rows.append(torch.zeros_like(positions) if g is None else g)
        bec = bec + torch.stack(rows, dim=1)
    if not charges.requires_grad:
        return bec

    def gradient(weights: torch.Tensor) -> torch.Tensor:
        (g,) = torch.autograd.grad(
            (charges * weights).sum(), positions, retain_graph=True, create_graph=create_graph,
            allow_unused=True,
        )
        return torch.zeros_like(positions) if g is None else g

    # Per structure a frame of three axes (rows): the lattice vectors of a crystal, a_1, a_2
    # and the unit normal of a slab, the Cartesian axes of an open structure; each axis is
    # either periodic (Berry sine weighting) or open (d_ij = r_j - r_i along it).
    slab = (pbc == pbc.new_tensor([True, True, False])).all(dim=1)
    crystal = pbc.all(dim=1)
    frame = torch.where(crystal[:, None, None], cell, _slab_frames(cell, slab)).detach()
    periodic_axis = torch.stack([crystal | slab, crystal | slab, crystal], dim=1)[batch]
    coordinates = torch.einsum("ib,iba->ia", positions.detach(), torch.linalg.inv(frame)[batch])
    for a in range(3):
        axis = frame[batch, a]
        periodic_atom, open_atom = periodic_axis[:, a], ~periodic_axis[:, a]
        if bool(open_atom.any()):
            # Σ_j s_ja ∂q_j/∂r_iβ; subtracting s_ia Σ_j ∂q_j/∂r_iβ (zero at fixed charge) is unnecessary.
            local = gradient(torch.where(open_atom, coordinates[:, a], torch.zeros_like(coordinates[:, a])))
            bec = bec + torch.where(open_atom[:, None, None], axis[:, :, None] * local[:, None, :], torch.zeros_like(bec))
        if bool(periodic_atom.any()):
            angle = 2.0 * math.pi * torch.where(periodic_atom, coordinates[:, a], torch.zeros_like(coordinates[:, a]))
            sin_grad = gradient(torch.where(periodic_atom, torch.sin(angle), torch.zeros_like(angle)))
            cos_grad = gradient(torch.where(periodic_atom, torch.cos(angle), torch.zeros_like(angle)))
            local = (torch.cos(angle)[:, None] * sin_grad - torch.sin(angle)[:, None] * cos_grad) / (2.0 * math.pi)
            bec = bec + torch.where(periodic_atom[:, None, None], axis[:, :, None] * local[:, None, :], torch.zeros_like(bec))
    periodic_atom = (crystal | slab)[batch]
    if bool(periodic_atom.any()):
        # Slabs: the normal row satisfies the sum rule exactly, so the subtraction only moves the in-plane rows.
        if enforce_sum_rule:
            n_structures = cell.shape[0]
            counts = torch.bincount(batch, minlength=n_structures).to(bec.dtype)
            total = bec.new_zeros(n_structures, 3, 3).index_add(0, batch, bec)
            total_charge = charges.new_zeros(n_structures).index_add(0, batch, charges)
            excess = (total - total_charge[:, None, None] * eye) / counts[:, None, None]
            bec = bec - torch.where(periodic_atom[:, None, None], excess[batch], torch.zeros_like(bec))
    return bec


def cell_moment(
    dipole: torch.Tensor, polarization: torch.Tensor, cell: torch.Tensor, periodic: torch.Tensor
) -> torch.Tensor:
    """(B, 3) total moment M, e·Å: the dipole (open, slab) or the cell dipole Ω P (periodic).

    Args:
        dipole: (B, 3) e·Å; polarization: (B, 3) e/Å²; cell: (B, 3, 3) Å; periodic: (B,) bool.
    """
    volume = torch.linalg.det(cell).abs()
    return torch.where(periodic[:, None], polarization * volume[:, None], dipole)


def polarizability_tensor(
    moment: torch.Tensor, external_field: torch.Tensor, create_graph: bool = False
) -> torch.Tensor:
    """(B, 3, 3) polarisability ∂M_α/∂E_ext,β, e·Å²/V, by 3 backward passes.

    ``moment`` must have been computed from ``external_field`` (which requires grad)
    for a non-zero result; the graph is retained for later passes.

    Args:
        moment: (B, 3) e·Å (see :func:`cell_moment`); external_field: (B, 3) V/Å.
        create_graph: keep the graph for higher derivatives (training on α).
    """
    rows = []
    for alpha in range(3):
        (g,) = torch.autograd.grad(
            moment[:, alpha].sum(), external_field, retain_graph=True,
            create_graph=create_graph, allow_unused=True,
        ) if moment.requires_grad else (None,)
        rows.append(torch.zeros_like(external_field) if g is None else g)
    return torch.stack(rows, dim=1)
