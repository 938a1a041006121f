"""Small models and structures shared by the LAMMPS and TorchSim tests (not a test module).

The models are tiny random radial backbones in float64 with chemically sized
per-element charge offsets, so latent charges, forces from the long-range term
and the charge-transfer term are all of realistic size.
"""

from __future__ import annotations

import numpy as np
import torch
from ase import Atoms
from ase.build import molecule

import latent_lr
from latent_lr.backbone import adapter_class
from latent_lr.demo import water_like_box

SPECIES = [1, 6, 7, 8]

#: Per-element charge offsets (e) of the test models.
BASELINE_CHARGES = {1: 0.4, 6: -0.2, 7: -0.5, 8: -0.8}


def make_model(seed: int = 0, **options) -> latent_lr.LongRangeModel:
    """A random float64 radial model (cut-off 3.5 Å, two layers) with latent charges."""
    torch.manual_seed(seed)
    host = latent_lr.RadialPotential(species=SPECIES, cutoff=3.5, hidden_dim=16).double()
    return set_charge_baselines(latent_lr.wrap(host, **options).eval(), BASELINE_CHARGES)


def make_host_model(backbone: str, seed: int = 0) -> latent_lr.LongRangeModel:
    """A wrapped tiny random host of ``backbone`` ("radial": :func:`make_model`; "mace": cut-off 2.5 Å, two layers)."""
    if backbone == "radial":
        return make_model(seed=seed)
    torch.manual_seed(seed)
    options = {"r_max": 2.5, "num_interactions": 2, "hidden_irreps": "8x0e + 8x1o", "MLP_irreps": "8x0e"}
    host = adapter_class(backbone).default_host(SPECIES, **options)
    return set_charge_baselines(latent_lr.wrap(host).eval(), BASELINE_CHARGES)


def set_charge_baselines(model: latent_lr.LongRangeModel, charges: dict[int, float]) -> latent_lr.LongRangeModel:
    """Set the per-element charge offsets (e) of a latent charge head (no-op for heads without them)."""
    baseline = getattr(model.long_range.charge_head, "element_baseline", None)
    if baseline is not None:
        with torch.no_grad():
            for z, q in charges.items():
                baseline.weight[z] = q
    return model


def water_box(n_molecules: int, seed: int = 0) -> Atoms:
    """A periodic cubic water box at liquid density, positions wrapped into the cell."""
    positions, _, cell = water_like_box(n_molecules, seed=seed)
    atoms = Atoms("OH2" * n_molecules, positions=positions.numpy(), cell=cell.numpy(), pbc=True)
    atoms.wrap()
    return atoms


def triclinic_water(seed: int = 1) -> Atoms:
    """A rattled water box in a restricted-triclinic (lower-triangular) cell, as LAMMPS stores it."""
    atoms = water_box(12, seed=seed)
    length = atoms.cell[0, 0]
    atoms.set_cell([[length, 0, 0], [0.9, 1.05 * length, 0], [-0.7, 1.1, 0.95 * length]], scale_atoms=True)
    atoms.rattle(0.05, seed=seed)
    atoms.wrap()
    return atoms


def charged_molecule_in_box() -> Atoms:
    """Protonated methylamine (CH3NH3+, charge +1 e) in a periodic 11 Å box."""
    atoms = molecule("H3CNH2")
    nitrogen = atoms.positions[atoms.numbers == 7][0]
    distances = np.linalg.norm(atoms.positions - nitrogen, axis=1)
    bonded = atoms.positions[(distances > 0.1) & (distances < 1.6)]
    away = nitrogen - bonded.mean(axis=0)
    atoms += Atoms("H", positions=[nitrogen + 1.02 * away / np.linalg.norm(away)])
    atoms.set_cell(np.eye(3) * 11.0)
    atoms.center()
    atoms.pbc = True
    atoms.info["charge"] = 1.0
    return atoms


def molecules(count: int, seed: int = 0) -> list[Atoms]:
    """``count`` small open molecules (4 kinds, rotated and rattled), for batched runs."""
    rng = np.random.default_rng(seed)
    names = ["H2O", "CH3OH", "H3CNH2", "HCN"]
    out = []
    for index in range(count):
        atoms = molecule(names[index % len(names)])
        atoms.rotate(rng.uniform(0, 360), rng.normal(size=3))
        atoms.rattle(0.05, seed=int(rng.integers(1 << 30)))
        out.append(atoms)
    return out
