"""The strain trick: positions and a homogeneous strain as leaf tensors of the geometry.

Forces are -∂E/∂r and the stress is (1/V) ∂E/∂ε at ε = 0, where the strain ε
(B, 3, 3) deforms positions and cell alike, r' = r (1 + ε) and
h' = h (1 + ε) (rows of h are the lattice vectors).  Building the energy from
the strained geometry and differentiating once with respect to both leaves
gives forces and virial in a single backward pass
(:func:`latent_lr.derivatives.forces_and_stress`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .data import AtomsBatch


def apply_strain(
    positions: torch.Tensor, cell: torch.Tensor, batch: torch.Tensor, strain: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Strained positions r (1 + ε) (N, 3), Å, and cell h (1 + ε) (B, 3, 3), Å.

    Args:
        positions: (N, 3) Å; cell: (B, 3, 3) lattice vectors as rows, Å.
        batch: (N,) structure index of each atom; strain: (B, 3, 3), dimensionless.
    """
    strained_positions = positions + torch.einsum("ni,nij->nj", positions, strain[batch])
    strained_cell = cell + torch.bmm(cell, strain)
    return strained_positions, strained_cell


@dataclass
class StrainedGeometry:
    """A batch rebuilt on leaf positions and a zero strain.

    Attributes:
        positions: (N, 3) leaf positions, Å (requires grad when forces or BECs are wanted).
        strain: (B, 3, 3) zero leaf strain (requires grad when the stress is wanted).
        geometry: the batch with strained positions and cell; every other field is shared
            with the input batch (the external field is the same tensor).
    """

    positions: torch.Tensor
    strain: torch.Tensor
    geometry: AtomsBatch

    @classmethod
    def of(cls, data: AtomsBatch, positions_grad: bool, strain_grad: bool) -> "StrainedGeometry":
        """Detach ``data``'s positions into a leaf and apply a zero strain leaf to them and the cell.

        Args:
            data: the structures (positions (N, 3) Å, cell (B, 3, 3) Å).
            positions_grad: make the positions leaf require grad (forces, BECs).
            strain_grad: make the strain leaf require grad (stress).
        """
        positions = data.positions.detach().requires_grad_(positions_grad)
        strain = torch.zeros(
            data.n_structures, 3, 3, dtype=positions.dtype, device=positions.device, requires_grad=strain_grad
        )
        strained_positions, strained_cell = apply_strain(positions, data.cell, data.batch, strain)
        return cls(positions, strain, data.with_geometry(strained_positions, strained_cell))
