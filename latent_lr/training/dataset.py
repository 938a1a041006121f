"""Labelled structures from extended-XYZ files, and batching them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import ase.io
import numpy as np
import torch
from ase import Atoms

from ..data import AtomsBatch


@dataclass
class LabelKeys:
    """Where labels live in the extended-XYZ file (``atoms.info`` / ``atoms.arrays``).

    ``energy`` (eV) and ``forces`` (eV/Å) are also read from a calculator that
    ASE attached while reading.  Optional labels are skipped when None.
    """

    energy: Optional[str] = "energy"
    forces: Optional[str] = "forces"
    dipole: Optional[str] = None
    charges: Optional[str] = None
    total_charge: Optional[str] = None
    bec: Optional[str] = None


@dataclass
class Frame:
    """One structure with its labels (numpy arrays; missing labels are None)."""

    atoms: Atoms
    energy: Optional[float] = None
    forces: Optional[np.ndarray] = None
    dipole: Optional[np.ndarray] = None
    charges: Optional[np.ndarray] = None
    bec: Optional[np.ndarray] = None
    total_charge: float = 0.0
    info: dict = field(default_factory=dict)


def _lookup(atoms: Atoms, key: Optional[str], per_atom: bool):
    if key is None:
        return None
    store = atoms.arrays if per_atom else atoms.info
    if key in store:
        return np.asarray(store[key], dtype=float)
    if per_atom and key in atoms.info:
        return np.asarray(atoms.info[key], dtype=float)
    calc = atoms.calc
    if calc is not None and key in getattr(calc, "results", {}):
        return np.asarray(calc.results[key], dtype=float)
    return None


def frame_from_atoms(atoms: Atoms, keys: LabelKeys) -> Frame:
    """Extract labels named by ``keys`` from one structure."""
    energy = _lookup(atoms, keys.energy, per_atom=False)
    forces = _lookup(atoms, keys.forces, per_atom=True)
    dipole = _lookup(atoms, keys.dipole, per_atom=False)
    charges = _lookup(atoms, keys.charges, per_atom=True)
    bec = _lookup(atoms, keys.bec, per_atom=True)
    total = _lookup(atoms, keys.total_charge, per_atom=False) if keys.total_charge else None
    clean = Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
    clean.info["charge"] = float(total) if total is not None else 0.0
    return Frame(
        atoms=clean,
        energy=None if energy is None else float(energy),
        forces=forces,
        dipole=None if dipole is None else dipole.reshape(3),
        charges=charges,
        bec=None if bec is None else bec.reshape(len(atoms), 3, 3),
        total_charge=clean.info["charge"],
        info={k: v for k, v in atoms.info.items() if np.isscalar(v)},
    )


def read_frames(path: Union[str, Path], keys: LabelKeys) -> list[Frame]:
    """Read every structure of an extended-XYZ file with its labels."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist.")
    structures = ase.io.read(path, index=":")
    frames = [frame_from_atoms(atoms, keys) for atoms in structures]
    if not frames:
        raise ValueError(f"{path} holds no structures.")
    if keys.energy and all(f.energy is None for f in frames):
        raise ValueError(
            f"no energies under key {keys.energy!r} in {path}; available info keys: "
            f"{sorted(structures[0].info)}; set --energy-key."
        )
    if keys.forces and all(f.forces is None for f in frames):
        raise ValueError(
            f"no forces under key {keys.forces!r} in {path}; available arrays: "
            f"{sorted(structures[0].arrays)}; set --forces-key (SPICE uses 'force')."
        )
    return frames


def collate(frames: Sequence[Frame], dtype: torch.dtype, device=None) -> tuple[AtomsBatch, dict[str, torch.Tensor]]:
    """Batch frames; targets hold only labels present in every frame of the batch."""
    data = AtomsBatch.from_atoms([f.atoms for f in frames], dtype=dtype, device=device)
    targets: dict[str, torch.Tensor] = {}

    def stack(name: str, values) -> None:
        if all(v is not None for v in values):
            array = np.concatenate(values) if name in ("forces", "charges", "bec") else np.stack(values)
            targets[name] = torch.tensor(array, dtype=dtype, device=device)

    stack("energy", [None if f.energy is None else np.asarray(f.energy) for f in frames])
    stack("forces", [f.forces for f in frames])
    stack("dipole", [f.dipole for f in frames])
    stack("charges", [f.charges for f in frames])
    stack("bec", [f.bec for f in frames])
    return data, targets
