"""A synthetic long-range dataset with known physics (the demo's default data).

Each structure holds a Na⁺ ion, a Cl⁻ ion and a flexible water molecule in open
boundary conditions.  The reference energy is an analytic force field:

* water: harmonic O–H bonds (k = 20 eV/Å², r0 = 0.96 Å) and H–H distance
  (k = 5 eV/Å², r0 = 1.52 Å);
* between different molecules/ions: Born–Mayer repulsion A exp(-r/ρ)
  (A = 500 eV, ρ = 0.3 Å) plus the Coulomb energy k_e q_i q_j / r of fixed
  point charges (Na +1, Cl -1, O -0.8, H +0.4 e).

Energies, forces (analytic gradients), dipoles and charges are written to
extended XYZ.  Training structures keep the ions 2.4–6 Å apart; test structures
put them 8–12 Å apart, beyond any short-range cut-off used in the demo, so a
short-range model must miss the ion–ion Coulomb term there while a long-range
model can extrapolate it.  The labels come from this closed form, not from the
latent-lr engine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

import ase.io
import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from .units import COULOMB_CONSTANT

CHARGES = {11: 1.0, 17: -1.0, 8: -0.8, 1: 0.4}
BORN_MAYER_A, BORN_MAYER_RHO = 500.0, 0.3
BONDS = [(2, 3, 20.0, 0.96), (2, 4, 20.0, 0.96), (3, 4, 5.0, 1.52)]  # (i, j, k, r0) within water


def reference_energy_forces(atoms: Atoms) -> tuple[float, np.ndarray]:
    """Analytic energy (eV) and forces (eV/Å) of a Na, Cl, O, H, H structure."""
    positions = atoms.positions
    molecule = np.array([0, 1, 2, 2, 2])
    charges = np.array([CHARGES[z] for z in atoms.numbers])
    energy, forces = 0.0, np.zeros_like(positions)
    for i in range(len(atoms)):
        for j in range(i + 1, len(atoms)):
            if molecule[i] == molecule[j]:
                continue
            vector = positions[j] - positions[i]
            r = float(np.linalg.norm(vector))
            repulsion = BORN_MAYER_A * np.exp(-r / BORN_MAYER_RHO)
            coulomb = COULOMB_CONSTANT * charges[i] * charges[j] / r
            energy += repulsion + coulomb
            d_energy_dr = -repulsion / BORN_MAYER_RHO - coulomb / r
            forces[i] += d_energy_dr * vector / r
            forces[j] -= d_energy_dr * vector / r
    for i, j, k, r0 in BONDS:
        vector = positions[j] - positions[i]
        r = float(np.linalg.norm(vector))
        energy += k * (r - r0) ** 2
        d_energy_dr = 2 * k * (r - r0)
        forces[i] += d_energy_dr * vector / r
        forces[j] -= d_energy_dr * vector / r
    return energy, forces


def _random_unit(rng: np.random.Generator) -> np.ndarray:
    vector = rng.normal(size=3)
    return vector / np.linalg.norm(vector)


def _water(rng: np.random.Generator, centre: np.ndarray) -> np.ndarray:
    angle = np.deg2rad(104.5 + rng.normal(scale=4.0))
    lengths = 0.96 + rng.normal(scale=0.03, size=2)
    local = np.array(
        [[0.0, 0.0, 0.0], [lengths[0], 0.0, 0.0], [lengths[1] * np.cos(angle), lengths[1] * np.sin(angle), 0.0]]
    )
    rotation, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    return centre + local @ rotation.T


def make_structure(rng: np.random.Generator, ion_distance: float) -> Atoms:
    """Na⁺, Cl⁻ at ``ion_distance`` (Å), and a water within 2.3–5 Å of one ion, labelled."""
    axis = _random_unit(rng)
    na, cl = np.zeros(3), ion_distance * axis
    for _ in range(1000):
        host_ion = na if rng.random() < 0.5 else cl
        water = _water(rng, host_ion + rng.uniform(2.3, 5.0) * _random_unit(rng))
        gaps = np.linalg.norm(water[:, None, :] - np.stack([na, cl])[None], axis=2)
        if gaps.min() > 1.9:
            break
    positions = np.vstack([na, cl, water])
    positions -= positions.mean(axis=0)
    atoms = Atoms(numbers=[11, 17, 8, 1, 1], positions=positions)
    energy, forces = reference_energy_forces(atoms)
    charges = np.array([CHARGES[z] for z in atoms.numbers])
    atoms.arrays["ref_charges"] = charges
    atoms.info["ref_dipole"] = charges @ positions
    atoms.info["distance"] = ion_distance
    atoms.info["charge"] = 0.0
    atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)
    return atoms


def write_dataset(
    directory: Union[str, Path], n_train: int = 240, n_test: int = 60, seed: int = 0
) -> dict[str, Path]:
    """Write ``train.xyz`` (ions 2.4–6 Å apart) and ``test.xyz`` (8–12 Å) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    train = [make_structure(rng, rng.uniform(2.4, 6.0)) for _ in range(n_train)]
    test = [make_structure(rng, rng.uniform(8.0, 12.0)) for _ in range(n_test)]
    paths = {"train": directory / "train.xyz", "test": directory / "test.xyz"}
    ase.io.write(paths["train"], train, format="extxyz")
    ase.io.write(paths["test"], test, format="extxyz")
    return paths
