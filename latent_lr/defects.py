"""Charged defects in periodic cells: the Makov–Payne finite-size correction.

A periodic cell with net charge q is neutralised by a uniform background
(the engine's convention, :func:`latent_lr.coulomb_energy`).  The energy of a
charged defect computed in a supercell of linear size L then converges slowly
to that of the isolated defect (Leslie & Gillan, J. Phys. C 18, 973 (1985);
Makov & Payne, Phys. Rev. B 51, 4014 (1995)):

    E(L) = E∞ − k_e q² α_M / (2 ε L) + O(L⁻³),

with α_M the Madelung constant of the supercell lattice (point charge in a
neutralising background, referred to L = Ω^{1/3}) and ε the relative
permittivity of the host.  For a latent-lr model ε is the model's own
dielectric constant, e.g. from its polarisation in a field (tin-foil cell,
P = ε₀(ε − 1)E) or, for a cubic lattice of polarisable sites of polarisability
volume α' (Å³) at number density n (Å⁻³), from Clausius–Mossotti:
(ε − 1)/(ε + 2) = 4π n α'/3 (:func:`clausius_mossotti_permittivity`).

Units: charges in e, lengths in Å, cells as rows in Å, energies in eV,
ε dimensionless; k_e = 14.399645 eV·Å/e².

Use :func:`makov_payne_correction` to correct one supercell energy
(E∞ ≈ E(L) + correction), or :func:`fit_finite_size` to extrapolate a series
of supercells.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np
import torch

from .electrostatics import coulomb_energy
from .units import COULOMB_CONSTANT

#: Madelung constant α_M of a point charge in a neutralising background in a
#: simple cubic cell of edge L (energy −k_e q² α_M/(2L)); Leslie & Gillan (1985).
SIMPLE_CUBIC_MADELUNG = 2.8372974794

CellLike = Union[float, Sequence[Sequence[float]], np.ndarray, torch.Tensor]


def _cell_matrix(cell: CellLike) -> torch.Tensor:
    """(3, 3) float64 cell, Å, from an edge length (cubic) or a 3×3 matrix of row vectors."""
    matrix = torch.as_tensor(np.asarray(cell, dtype=np.float64))
    if matrix.ndim == 0:
        matrix = torch.eye(3, dtype=torch.float64) * matrix
    if matrix.shape != (3, 3):
        raise ValueError(
            f"cell must be a cubic edge length (Å) or a 3×3 matrix of lattice vectors as rows, got shape {tuple(matrix.shape)}."
        )
    if not abs(float(torch.linalg.det(matrix))) > 0:
        raise ValueError("cell has zero volume: give three linearly independent lattice vectors (Å).")
    return matrix


def madelung_constant(cell: CellLike) -> float:
    """α_M of a supercell lattice: a point charge in a neutralising background has energy −k_e q² α_M/(2L).

    L = Ω^{1/3} (Ω the cell volume).  Computed with the engine's Ewald sum
    (accuracy 1e-10); 2.8373 for simple cubic, 2.8885 bcc and 2.8883 fcc cells
    (Makov & Payne 1995, Table I).

    Args:
        cell: cubic edge (Å) or (3, 3) lattice vectors as rows (Å).
    """
    matrix = _cell_matrix(cell)
    origin = torch.zeros(1, 3, dtype=torch.float64)
    charge = torch.ones(1, dtype=torch.float64)
    energy = float(coulomb_energy(origin, charge, cell=matrix, pbc=True, accuracy=1e-10, method="ewald"))
    length = abs(float(torch.linalg.det(matrix))) ** (1.0 / 3.0)
    return -2.0 * length * energy / COULOMB_CONSTANT


def makov_payne_correction(charge: float, cell: CellLike, permittivity: float = 1.0) -> float:
    """Leading (monopole) finite-size correction of a charged-defect energy, eV: k_e q² α_M / (2 ε L).

    Add it to the supercell energy: E∞ ≈ E(L) + correction, with an error O(L⁻³)
    (the defect's quadrupole and the host's discreteness).

    Args:
        charge: net charge q of the cell, e.
        cell: cubic edge L (Å) or (3, 3) lattice vectors as rows (Å).
        permittivity: relative permittivity ε ≥ 1 of the host (1: vacuum, no screening).
    """
    if not permittivity >= 1.0:
        raise ValueError(f"permittivity must be a relative permittivity ≥ 1, got {permittivity}.")
    matrix = _cell_matrix(cell)
    alpha_m = madelung_constant(matrix)
    length = abs(float(torch.linalg.det(matrix))) ** (1.0 / 3.0)
    return COULOMB_CONSTANT * charge**2 * alpha_m / (2.0 * permittivity * length)


def clausius_mossotti_permittivity(polarizability: float, number_density: float) -> float:
    """ε of a cubic lattice of point polarisable sites: (ε − 1)/(ε + 2) = 4π n α'/3, α' = k_e α.

    Args:
        polarizability: α per site, e·Å²/V (latent-lr's unit; α' = k_e α in Å³).
        number_density: n, sites per Å³.
    """
    x = 4.0 * math.pi * number_density * COULOMB_CONSTANT * polarizability / 3.0
    if not 0.0 <= x < 1.0:
        raise ValueError(
            f"4π n α'/3 = {x:.4g} must lie in [0, 1) (beyond 1 the lattice polarises catastrophically): "
            "lower the polarisability or the density."
        )
    return (1.0 + 2.0 * x) / (1.0 - x)


@dataclass(frozen=True)
class FiniteSizeFit:
    """E(L) = e_infinity + Σ_k coefficients[k] L^{-powers[k]} fitted to supercell energies.

    Attributes:
        e_infinity: extrapolated isolated-defect energy, eV.
        powers: the inverse powers of L fitted (e.g. (1, 3, 5)).
        coefficients: one per power, eV·Å^power; the first (power 1) is −k_e q² α_M/(2ε).
    """

    e_infinity: float
    powers: tuple[int, ...]
    coefficients: tuple[float, ...]

    def permittivity(self, charge: float, madelung: float = SIMPLE_CUBIC_MADELUNG) -> float:
        """ε implied by the fitted 1/L coefficient b = −k_e q² α_M/(2ε)."""
        if self.powers[0] != 1:
            raise ValueError("the fit has no 1/L term: include power 1 in powers.")
        if charge == 0 or not self.coefficients[0] < 0:
            raise ValueError(
                f"ε needs a charged cell (q = {charge:g} e) and a negative 1/L coefficient (fitted "
                f"{self.coefficients[0]:.4g} eV·Å); b ≥ 0 means no screened monopole term (a conductor, ε = ∞)."
            )
        return -COULOMB_CONSTANT * charge**2 * madelung / (2.0 * self.coefficients[0])


def fit_finite_size(
    lengths: Sequence[float], energies: Sequence[float], powers: Sequence[int] = (1, 3)
) -> FiniteSizeFit:
    """Least-squares fit of E(L) = E∞ + Σ_k c_k L^{-p_k} to energies of growing supercells.

    Args:
        lengths: supercell sizes L (Å), e.g. Ω^{1/3}; at least len(powers) + 1 distinct values.
        energies: E(L), eV, same length.
        powers: inverse powers of L; the Makov–Payne form is (1, 3), (1, 3, 5) adds the next order.
    """
    size = np.asarray(lengths, dtype=np.float64)
    values = np.asarray(energies, dtype=np.float64)
    if size.shape != values.shape or size.ndim != 1:
        raise ValueError(f"lengths and energies must be 1-D and of equal length, got {size.shape} and {values.shape}.")
    if len(np.unique(size)) < len(powers) + 1:
        raise ValueError(
            f"fitting E∞ and {len(powers)} powers of 1/L needs at least {len(powers) + 1} distinct sizes, got {len(np.unique(size))}."
        )
    if not bool((size > 0).all()):
        raise ValueError("supercell lengths must be > 0 Å.")
    design = np.stack([np.ones_like(size)] + [size ** (-float(p)) for p in powers], axis=1)
    solution = np.linalg.lstsq(design, values, rcond=None)[0]
    return FiniteSizeFit(float(solution[0]), tuple(int(p) for p in powers), tuple(float(c) for c in solution[1:]))
