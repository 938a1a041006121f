"""Synthetic labelled structures of mixed sizes for the data-pipeline benchmarks.

Molecule-like clusters (open boundaries) of H, C, N, O on a jittered grid
(2.0 Å spacing, so no two atoms are closer than ~1.6 Å), or periodic boxes of
the same density, labelled by a Lennard-Jones sum (ε = 0.01 eV, σ = 1.4 Å;
energies eV, forces eV/Å, analytic).  The labels only make the training step
realistic; nothing is learned from them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TextIO, Union

import numpy as np
from ase import Atoms

ELEMENTS = np.array([1, 6, 7, 8])
SPACING, JITTER = 2.0, 0.2  # Å (0.125 atoms/Å³, about the atom density of organic molecules and water)
EPSILON, SIGMA = 0.01, 1.4  # eV, Å


def lennard_jones(atoms: Atoms) -> tuple[float, np.ndarray]:
    """Energy (eV) and forces (N, 3) eV/Å of a Lennard-Jones sum (minimum image for periodic boxes)."""
    vectors = atoms.positions[None, :, :] - atoms.positions[:, None, :]
    if atoms.pbc.all():
        lengths = np.diag(atoms.cell.array)
        vectors -= lengths * np.round(vectors / lengths)
    r2 = (vectors**2).sum(axis=-1)
    np.fill_diagonal(r2, np.inf)
    s6 = (SIGMA**2 / r2) ** 3
    energy = 0.5 * float((4 * EPSILON * (s6**2 - s6)).sum())
    d_energy = (4 * EPSILON * (-12 * s6**2 + 6 * s6) / r2)[:, :, None] * vectors  # dE/dr_ij along r_j - r_i
    return energy, d_energy.sum(axis=1)


def cluster(n_atoms: int, rng: np.random.Generator, periodic: bool = False) -> Atoms:
    """One labelled structure of ``n_atoms`` atoms (a compact cluster, or a cubic box if ``periodic``)."""
    side = int(np.ceil(n_atoms ** (1 / 3)))
    grid = np.stack(np.meshgrid(*[np.arange(side)] * 3, indexing="ij"), axis=-1).reshape(-1, 3)
    centre = (side - 1) / 2
    order = np.argsort(((grid - centre) ** 2).sum(axis=1) + rng.uniform(0, 0.5, len(grid)))
    sites = grid[order[:n_atoms]] if not periodic else grid[rng.permutation(len(grid))[:n_atoms]]
    positions = SPACING * sites + rng.uniform(-JITTER, JITTER, (n_atoms, 3))
    atoms = Atoms(rng.choice(ELEMENTS, n_atoms), positions=positions)
    if periodic:
        atoms.cell = np.eye(3) * SPACING * side
        atoms.pbc = True
    energy, forces = lennard_jones(atoms)
    atoms.info["energy"] = energy
    atoms.arrays["forces"] = forces
    return atoms


def mixed_set(count: int, min_atoms: int, max_atoms: int, seed: int = 0, periodic: bool = False) -> list[Atoms]:
    """``count`` structures with sizes drawn uniformly from ``min_atoms..max_atoms``."""
    rng = np.random.default_rng(seed)
    return [cluster(int(n), rng, periodic) for n in rng.integers(min_atoms, max_atoms + 1, size=count)]


def write_extxyz(structures: list[Atoms], target: Union[str, Path, TextIO]) -> None:
    """Write ``energy`` and ``forces`` as extended XYZ quickly (to a path, or appended to an open file)."""
    if isinstance(target, (str, Path)):
        with open(target, "w") as handle:
            write_extxyz(structures, handle)
        return
    for atoms in structures:
        lattice = " ".join(f"{x:.10g}" for x in atoms.cell.array.reshape(-1))
        periodic = " ".join("T" if p else "F" for p in atoms.pbc)
        target.write(f"{len(atoms)}\n")
        head = f'Lattice="{lattice}" ' if atoms.pbc.any() else ""
        target.write(f'{head}Properties=species:S:1:pos:R:3:forces:R:3 energy={atoms.info["energy"]!r} pbc="{periodic}"\n')
        table = np.column_stack([atoms.positions, atoms.arrays["forces"]])
        symbols = atoms.get_chemical_symbols()
        target.write("".join(f"{s} " + " ".join(repr(float(v)) for v in row) + "\n" for s, row in zip(symbols, table)))
