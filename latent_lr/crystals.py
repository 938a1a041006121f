"""Small reference crystals with known Madelung constants (demo and docs).

Madelung constants refer to the nearest cation–anion distance r_nn and unit
charges: E per formula unit = -M k_e |z+ z-| / r_nn for NaCl, CsCl and
zincblende (values from Glasser & Zucker, J. Phys. Chem. 64, 1183 (1980)
and Sakamoto, J. Chem. Phys. 28, 164 (1958)).
"""

from __future__ import annotations

import numpy as np
from ase import Atoms
from ase.build import bulk

#: name -> (ASE bulk structure, Madelung constant referred to r_nn).
MADELUNG_CONSTANTS = {
    "NaCl (rocksalt)": ("rocksalt", 1.747564594633),
    "CsCl": ("cesiumchloride", 1.762674773070),
    "ZnS (zincblende)": ("zincblende", 1.638055053388),
}


def ionic_crystal(kind: str, a: float = 5.0, cubic: bool = False) -> Atoms:
    """Binary ionic crystal with charges +1/-1 stored in ``atoms.info['charges']``."""
    atoms = bulk("NaCl" if kind != "cesiumchloride" else "CsCl", kind, a=a, cubic=cubic)
    charges = np.where(np.arange(len(atoms)) % 2 == 0, 1.0, -1.0)
    if cubic:
        numbers = atoms.get_atomic_numbers()
        charges = np.where(numbers == numbers[0], 1.0, -1.0)
    atoms.set_initial_charges(charges)
    return atoms


def nearest_neighbour_distance(atoms: Atoms) -> float:
    """Shortest cation–anion distance under the minimum-image convention, Å."""
    charges = atoms.get_initial_charges()
    distances = atoms.get_all_distances(mic=True)
    opposite = np.not_equal.outer(np.sign(charges), np.sign(charges))
    return float(distances[opposite].min())
