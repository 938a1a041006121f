"""The energy terms the model adds to the host's: per-element reference energies and the field energy."""

from __future__ import annotations

import torch

from .properties import dipole_moment


def reference_energy(
    table: torch.Tensor, numbers: torch.Tensor, batch: torch.Tensor, n_structures: int
) -> torch.Tensor:
    """(B,) Σ_i E_ref(Z_i) over each structure's atoms, eV.

    Args:
        table: (119,) per-element reference energies E_ref(Z), eV, indexed by Z.
        numbers: (N,) atomic numbers; batch: (N,) structure index of each atom.
        n_structures: B.
    """
    return table.new_zeros(n_structures).index_add(0, batch, table[numbers])


def field_energy(
    charges: torch.Tensor, positions: torch.Tensor, batch: torch.Tensor, external_field: torch.Tensor
) -> torch.Tensor:
    """(B,) -(Σ_i q_i r_i)·E_ext, eV, in a uniform external field E_ext (V/Å).

    Fixed-field ensemble (the field, not the displacement, is held fixed):
    the field does work on the latent charges, the force on atom i is
    q_i E_ext (plus the field's effect through charges that move with the
    geometry).  The induced dipoles' -Σ p_i·E_ext is part of the induction
    energy of the long-range module and is not counted here.

    * Open structures: Σ q_i r_i about the coordinate origin (for a charged
      structure the origin only shifts the energy zero; the force Q E_ext
      on the net charge is physical).
    * Periodic structures: the positions *as given* are used (unwrapped
      trajectory positions: do not wrap atoms back into the cell during a
      run).  Forces q_i E_ext are well defined; the energy zero depends on
      the periodic image chosen for each atom, because Ω P = Σ q_i r_i is
      defined only modulo the polarisation quantum (Berry phase).  This is
      the electric-enthalpy functional of Nunes & Gonze (PRB 63, 155107,
      2001) and Umari & Pasquarello (PRL 89, 157602, 2002) with the
      Berry-phase polarisation replaced by the latent point-charge one; in
      DFT it is valid below the Zener breakdown field, and here latent
      charges follow the local environment only (they do not flow across
      the cell in response to the field).  In a field the stress includes
      the branch-dependent term -Σ q_i r_iα E_β (the "improper" part).

    With charges independent of E_ext the energy is linear in E_ext apart
    from the induction energy, and ∂F_iβ/∂E_α = Z*_i,αβ = ∂M_α/∂r_iβ.

    Args:
        charges: (N,) latent charges, e; positions: (N, 3) Å; batch: (N,) structure index.
        external_field: (B, 3) V/Å.
    """
    charge_dipole = dipole_moment(charges, positions, batch, external_field.shape[0])
    return -(charge_dipole * external_field.to(charge_dipole.dtype)).sum(dim=1)
