"""Slabs: periodic along the first two cell vectors, open along the third.

A slab (pbc = (True, True, False)) is summed as a 3D periodic system whose
open axis is extended with vacuum, plus a correction that removes the
interaction between the slab and its periodic images along that axis
(Yeh & Berkowitz, J. Chem. Phys. 111, 3155 (1999)), with the terms for a slab
with net charge Q (Ballenegger, Arnold & Cerdà, J. Chem. Phys. 131, 094107
(2009)).  With heights z_i along the unit normal n̂ of the periodic plane and
the extended volume V = A L:

    E_slab = E_3D + k_e (2π / V) (M_z² - Q Σ_i q_i z_i² - Q² (L² / 12 + σ² / 2)),
    M_z = Σ_i q_i z_i,

exact for the laterally averaged charge (in-plane wavevector 0) and
independent of L, of the Ewald split and of the origin of z.  The σ² term
(σ the smearing width) is the variance σ² of the pair separation implied by
the smeared kernel erf(r/(√2σ))/r.  The 3D sum may use any periodic method (Ewald, PME).

What remains are the interactions of in-plane Fourier components of the
charge with the images, which decay like exp(-2π g / w) across a vacuum gap g,
w being the longest in-plane cell vector.  The open axis is therefore extended
to L = H + g with g = s² w / (2π), s² ≈ ln(1/accuracy) (:func:`vacuum_gap`),
i.e. a factor ≲ ``accuracy`` on those terms, where H is the larger of the third cell vector's length and
the atoms' extent along n̂.

Conventions: the first two cell vectors span the periodic plane; the third must
be perpendicular to them (or zero).  Its length only sets H: give it at least
the slab's thickness so that L, and with it the energy, does not depend on the
atoms' positions (exactly smooth forces in MD).  A net-charged slab's energy
follows the convention above (the limit L → ∞ of the 3D energy with a uniform
neutralising background, minus the background's divergent part).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

from .parameters import accuracy_to_s
from .validation import MIN_CELL_WIDTH, Structures

#: Largest |cos| accepted between the third cell vector and the periodic plane.
ORTHOGONALITY_TOLERANCE = 1e-6


def vacuum_gap(in_plane_length: float, accuracy: float) -> float:
    """Vacuum (Å) between a slab and its images: s² w / (2π), s² ≈ ln(1/accuracy).

    ``s`` is the Ewald sums' dimensionless cut-off (:func:`accuracy_to_s`,
    exp(-s²) ≈ accuracy, with its safety margin).

    Args:
        in_plane_length: length w of the longest in-plane cell vector, Å.
        accuracy: target relative error, in (0, 1).
    """
    return accuracy_to_s(accuracy) ** 2 * in_plane_length / (2.0 * math.pi)


def unit_normals(cell: torch.Tensor) -> torch.Tensor:
    """(S, 3) unit normals of the periodic planes a_1 × a_2, pointing along the third vector.

    Args:
        cell: (S, 3, 3) slab cells, lattice vectors as rows, Å.
    """
    normal = torch.linalg.cross(cell[:, 0], cell[:, 1])
    normal = normal / normal.norm(dim=1, keepdim=True)
    flip = (normal * cell[:, 2]).sum(dim=1).detach() < 0
    return torch.where(flip[:, None], -normal, normal)


def _check_slab_cells(cell: torch.Tensor, indices: list[int]) -> None:
    with torch.no_grad():
        cell = cell.double()
        area = torch.linalg.cross(cell[:, 0], cell[:, 1]).norm(dim=1)
        lengths = cell[:, :2].norm(dim=2)
        widths = area[:, None] / lengths.flip(1).clamp_min(1e-300)
        thin = widths.min(dim=1).values < MIN_CELL_WIDTH
        if bool(thin.any()):
            which = [indices[i] for i in torch.nonzero(thin).flatten()[:5].tolist()]
            raise ValueError(
                f"slab structures {which} have a degenerate periodic plane (in-plane width "
                f"below {MIN_CELL_WIDTH} Å): the first two cell vectors must be linearly "
                "independent lattice vectors in Å."
            )
        third = cell[:, 2].norm(dim=1)
        cosines = (cell[:, :2] @ cell[:, 2].unsqueeze(2)).squeeze(2).abs() / (
            lengths * third.unsqueeze(1)
        ).clamp_min(1e-300)
        tilted = (third > 0) & (cosines.max(dim=1).values > ORTHOGONALITY_TOLERANCE)
        if bool(tilted.any()):
            which = [indices[i] for i in torch.nonzero(tilted).flatten()[:5].tolist()]
            raise ValueError(
                f"slab structures {which} have a third cell vector that is not perpendicular "
                "to the first two. For pbc=(True, True, False) the third vector is the open "
                "axis: set it to a multiple of the normal of the periodic plane (or zero)."
            )


def _atom_heights(structures: Structures, normals: torch.Tensor) -> torch.Tensor:
    """(N,) heights r_i · n̂ of every atom, Å (0 for atoms outside slabs).

    Args:
        normals: (B, 3) unit normals, zero rows for structures that are not slabs.
    """
    return (structures.positions * normals[structures.batch]).sum(dim=1)


def _per_structure_normals(structures: Structures, rows: torch.Tensor, normals: torch.Tensor) -> torch.Tensor:
    return structures.positions.new_zeros(structures.n_structures, 3).index_put((rows,), normals)


def extend_slabs(structures: Structures, accuracy: float) -> Structures:
    """Turn slabs into 3D periodic structures with a vacuum-extended third vector.

    The extended third vector is L n̂ with n̂ from the first two vectors, so the
    energy does not depend on the given third vector except through the float
    L = H + :func:`vacuum_gap` (see the module docstring).

    Returns:
        A copy of ``structures`` whose slabs are marked periodic, with extended cells.
    """
    if not bool(structures.slab.any()):
        return structures
    rows = torch.nonzero(structures.slab).flatten()
    cell = structures.cell[rows]
    _check_slab_cells(cell, rows.tolist())
    normals = unit_normals(cell)
    with torch.no_grad():
        heights = _atom_heights(structures, _per_structure_normals(structures, rows, normals))
        top = heights.new_full((structures.n_structures,), -math.inf).scatter_reduce(
            0, structures.batch, heights, "amax"
        )
        bottom = heights.new_full((structures.n_structures,), math.inf).scatter_reduce(
            0, structures.batch, heights, "amin"
        )
        extents = (top - bottom)[rows]
        third = cell[:, 2].norm(dim=1)
        in_plane = cell[:, :2].norm(dim=2).max(dim=1).values
    lengths = [
        max(h, e) + vacuum_gap(w, accuracy)
        for h, e, w in zip(third.tolist(), extents.tolist(), in_plane.tolist())
    ]
    extended = torch.cat(
        [cell[:, :2], (normals * normals.new_tensor(lengths)[:, None]).unsqueeze(1)], dim=1
    )
    return dataclasses.replace(
        structures,
        cell=structures.cell.index_put((rows,), extended),
        periodic=structures.periodic | structures.slab,
    )


def slab_correction(
    structures: Structures, alpha_smear: Optional[torch.Tensor]
) -> torch.Tensor:
    """(2π/V)(M_z² - Q Σ q_i z_i² - Q² (L²/12 + σ²/2)) per structure, in units of k_e (e²/Å).

    Args:
        structures: output of :func:`extend_slabs` (extended cells).
        alpha_smear: scalar tensor 1/(√2 σ), 1/Å, or None for point charges.

    Returns:
        (B,) corrections, zero for structures that are not slabs.
    """
    slab = structures.slab
    rows = torch.nonzero(slab).flatten()
    third = structures.cell[rows, 2]
    length = third.norm(dim=1)
    normals = _per_structure_normals(structures, rows, third / length[:, None])
    heights = _atom_heights(structures, normals)
    counts = structures.counts.to(heights.dtype)
    # The correction does not depend on the origin of z; centring avoids cancellation.
    centre = heights.new_zeros(structures.n_structures).index_add(0, structures.batch, heights.detach())
    heights = heights - (centre / counts)[structures.batch]

    def per_structure(values: torch.Tensor) -> torch.Tensor:
        return heights.new_zeros(structures.n_structures).index_add(0, structures.batch, values)[rows]

    charges = structures.charges
    dipole = per_structure(charges * heights)
    total = per_structure(charges)
    second_moment = per_structure(charges * heights**2)
    sigma_squared = 0.0 if alpha_smear is None else 1.0 / (2.0 * alpha_smear**2)
    volume = torch.linalg.det(structures.cell[rows]).abs()
    correction = (2.0 * math.pi / volume) * (
        dipole**2
        - total * second_moment
        - total**2 * (length**2 / 12.0 + sigma_squared / 2.0)
    )
    return heights.new_zeros(structures.n_structures).index_put((rows,), correction)
