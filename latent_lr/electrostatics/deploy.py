"""A deployable Ewald core: TorchScript and torch.compile compatible.

:func:`latent_lr.coulomb_energy` builds its index data (pair lists with vesin,
k-index sets with numpy) in Python, which neither TorchScript nor a full
torch.compile graph can hold.  Deployments (LAMMPS, ASE drivers in C++)
compute neighbour lists outside the model anyway, so :class:`EwaldEnergy`
takes that index data as input and does only tensor math, with the same
functions as the eager engine (:func:`switched_real_space_kernel`,
:func:`padded_reciprocal_energy`, the self and background terms).
:func:`deployment_inputs` prepares its inputs with the normal Python path.

One fully periodic structure per call; energies in eV, k_e from
:mod:`latent_lr.units`, conventions as in :mod:`.coulomb`.  Forces and stress
come from autograd, as in the eager engine.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..units import COULOMB_CONSTANT
from .coulomb import _self_and_background, _smearing_to_alpha
from .kernels import switched_real_space_kernel
from .pairs import pair_vectors, periodic_pairs_within_cutoff
from .reciprocal import padded_reciprocal_energy
from .setup_cache import ewald_setup
from .validation import validate_structures


class EwaldEnergy(torch.nn.Module):
    """Ewald Coulomb energy (eV) of one periodic structure from precomputed index data.

    Args:
        smearing: Gaussian charge width σ ≥ 0, Å (0: point charges); must match
            the value given to :func:`deployment_inputs`.
    """

    def __init__(self, smearing: float = 0.0) -> None:
        super().__init__()
        if not math.isfinite(smearing) or smearing < 0.0:
            raise ValueError(f"smearing must be a finite width ≥ 0 in Å, got {smearing}.")
        self.smearing = float(smearing)
        self.coulomb_constant = COULOMB_CONSTANT

    def forward(
        self,
        positions: torch.Tensor,
        charges: torch.Tensor,
        cell: torch.Tensor,
        first: torch.Tensor,
        second: torch.Tensor,
        shifts: torch.Tensor,
        integer_k: torch.Tensor,
        ewald: torch.Tensor,
    ) -> torch.Tensor:
        """Energy, eV, as a 0-d tensor.

        Args:
            positions: (N, 3) positions, Å.
            charges: (N,) charges, e.
            cell: (3, 3) lattice vectors as rows, Å.
            first, second: (P,) half pair list: each pair within ``ewald[2]`` once.
            shifts: (P, 3) lattice translations (floats) with
                r_ij = r_second - r_first + shifts @ cell.
            integer_k: (K, 3) k-indices (floats), one of each pair (n, -n), with
                |k| < ``ewald[4]``, k = n @ 2π inv(cell).T.
            ewald: (5,) alpha (1/Å), r_switch, r_cut (Å), k_switch, k_cut (1/Å);
                see :class:`~.parameters.EwaldParameters`.
        """
        alpha, r_switch, r_cut, k_switch, k_cut = ewald.unbind(0)
        alpha_smear: Optional[torch.Tensor] = None
        if self.smearing > 0.0:
            alpha_smear = positions.new_full((), 1.0 / (math.sqrt(2.0) * self.smearing))

        distance = torch.linalg.vector_norm(pair_vectors(positions, first, second, shifts, cell), dim=1)
        kernel = switched_real_space_kernel(
            distance,
            alpha.expand_as(distance),
            alpha_smear,
            r_switch.expand_as(distance),
            r_cut.expand_as(distance),
        )
        real = (charges[first] * charges[second] * kernel).sum()

        valid = torch.ones(1, integer_k.shape[0], dtype=torch.bool, device=positions.device)
        reciprocal = padded_reciprocal_energy(
            positions.unsqueeze(0),
            charges.unsqueeze(0),
            cell.unsqueeze(0),
            integer_k.unsqueeze(0),
            valid,
            alpha.reshape(1),
            k_switch.reshape(1),
            k_cut.reshape(1),
        )
        atom_row = torch.zeros(charges.shape[0], dtype=torch.long, device=charges.device)
        constant = _self_and_background(
            charges, atom_row, alpha.reshape(1), alpha_smear, torch.linalg.det(cell).abs().reshape(1)
        )
        return self.coulomb_constant * (real + reciprocal[0] + constant[0])


def deployment_inputs(
    positions: torch.Tensor,
    charges: torch.Tensor,
    cell: torch.Tensor,
    *,
    smearing: float = 0.0,
    accuracy: float = 1e-6,
) -> dict[str, torch.Tensor]:
    """Inputs of :meth:`EwaldEnergy.forward` for one periodic structure (Python path).

    Validates like :func:`latent_lr.coulomb_energy`, takes Ewald parameters and
    k-indices from the set-up cache and builds the pair list with vesin.  The
    pair list must be rebuilt when atoms move (as any neighbour list), the
    k-indices and ``ewald`` when the cell changes.

    Args:
        positions: (N, 3) positions, Å.
        charges: (N,) charges, e.
        cell: (3, 3) lattice vectors as rows, Å.
        smearing: Gaussian charge width σ ≥ 0, Å.
        accuracy: target relative error of energies and forces.

    Returns:
        Keyword arguments of :meth:`EwaldEnergy.forward` (``positions``,
        ``charges`` and ``cell`` are the given tensors, gradients intact).
    """
    structures = validate_structures(positions, charges, cell, True, None)
    _smearing_to_alpha(smearing, positions)
    setup = ewald_setup(
        cell.detach().cpu().double().numpy(), positions.shape[0], accuracy, float(smearing)
    )
    p = setup.parameters
    pairs = periodic_pairs_within_cutoff(
        positions, structures.cell, structures.batch, structures.counts, {0: p.r_cut}
    )
    return {
        "positions": positions,
        "charges": charges,
        "cell": cell,
        "first": pairs.first,
        "second": pairs.second,
        "shifts": pairs.shifts,
        "integer_k": torch.from_numpy(setup.k_indices.copy()).to(positions),
        "ewald": positions.new_tensor([p.alpha, p.r_switch, p.r_cut, p.k_switch, p.k_cut]),
    }
