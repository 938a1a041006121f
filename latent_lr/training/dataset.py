"""Labelled structures from extended-XYZ files, and batching them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

import ase.io
import numpy as np
import torch
from ase import Atoms

from ..data import AtomsBatch
from ..errors import UserInputError, frame_location
from ..spin import SPIN_KEY, total_spin


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
    total_spin: Optional[str] = None
    multiplicity: Optional[str] = None


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
    total_spin: int = 0
    info: dict = field(default_factory=dict)
    source: Optional[tuple[str, int]] = None

    @property
    def location(self) -> str:
        """Where the frame came from, e.g. ``"train.xyz, frame 17 (0-based)"`` (index in the user's file)."""
        if self.source is None:
            return "a structure given in memory"
        return frame_location(*self.source)


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


def frame_from_atoms(atoms: Atoms, keys: LabelKeys, source: Optional[tuple[str, int]] = None) -> Frame:
    """Extract labels named by ``keys`` from one structure.

    ``source`` is (file as the user gave it, 0-based frame index in that file);
    it names the frame in error messages.  Non-finite positions, cells or
    labels are a :class:`~latent_lr.errors.UserInputError`.
    """
    where = frame_location(*source) if source is not None else "structure"
    if len(atoms) == 0:
        raise UserInputError(f"{where}: the structure has no atoms; remove it from the input.")
    _reject_non_finite(where, "positions (Å)", atoms.positions)
    if atoms.pbc.any():
        _reject_non_finite(where, "cell (Å)", atoms.cell.array)
    energy = _lookup(atoms, keys.energy, per_atom=False)
    forces = _lookup(atoms, keys.forces, per_atom=True)
    dipole = _lookup(atoms, keys.dipole, per_atom=False)
    charges = _lookup(atoms, keys.charges, per_atom=True)
    bec = _lookup(atoms, keys.bec, per_atom=True)
    total = _lookup(atoms, keys.total_charge, per_atom=False) if keys.total_charge else None
    clean = Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
    clean.info["charge"] = float(total) if total is not None else 0.0
    spin = 0
    if keys.total_spin or keys.multiplicity:
        try:
            spin = total_spin(atoms.info, atoms.numbers, clean.info["charge"], keys.total_spin, keys.multiplicity, where)
        except ValueError as error:
            raise UserInputError(str(error)) from error
    if spin:
        clean.info[SPIN_KEY] = spin
    return Frame(
        atoms=clean,
        energy=None if energy is None else float(energy),
        forces=forces,
        dipole=None if dipole is None else dipole.reshape(3),
        charges=charges,
        bec=None if bec is None else bec.reshape(len(atoms), 3, 3),
        total_charge=clean.info["charge"],
        total_spin=spin,
        info={k: v for k, v in atoms.info.items() if np.isscalar(v)},
        source=source,
    )


def _reject_non_finite(where: str, what: str, values) -> None:
    if values is not None and not np.isfinite(values).all():
        raise UserInputError(f"{where}: NaN or inf in the {what}; fix or remove this frame.")


def _check_labels(frame: Frame) -> None:
    for name in ("energy", "forces", "dipole", "charges", "bec"):
        _reject_non_finite(frame.location, f"{name} label", getattr(frame, name))


def iter_frames(path: Union[str, Path], keys: LabelKeys) -> Iterator[Frame]:
    """Yield the structures of an extended-XYZ file one at a time (read lazily, ``ase.io.iread``).

    Each frame keeps (path as given, 0-based index in the file) as ``source``.
    A missing, unreadable or malformed file and non-finite values raise
    :class:`~latent_lr.errors.UserInputError` naming the file and frame.
    """
    name = str(path)
    if not Path(path).is_file():
        raise UserInputError(f"{name} does not exist or is not a file; check the path.")
    structures = ase.io.iread(path, index=":")
    index = 0
    while True:
        try:
            atoms = next(structures)
        except StopIteration:
            return
        except PermissionError as error:  # (ASE's XYZError is an OSError too: it is a malformed frame, below)
            raise UserInputError(f"cannot read {name}: {error.strerror}; check the file's permissions.") from error
        except Exception as error:  # ASE's readers raise many types for a malformed file
            detail = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise UserInputError(
                f"{frame_location(name, index)}: not a valid extended-XYZ frame ({detail}); "
                "give an extended-XYZ file (ase.io.write(..., format='extxyz'))."
            ) from error
        frame = frame_from_atoms(atoms, keys, source=(name, index))
        _check_labels(frame)
        yield frame
        index += 1


def read_frames(path: Union[str, Path], keys: LabelKeys) -> list[Frame]:
    """Read every structure of an extended-XYZ file with its labels (see :func:`iter_frames`)."""
    frames = list(iter_frames(path, keys))
    if not frames:
        raise UserInputError(f"{path} holds no structures; give a non-empty extended-XYZ file.")
    require_labels(
        path, keys, any(f.energy is not None for f in frames), any(f.forces is not None for f in frames), sorted(frames[0].info)
    )
    return frames


def require_labels(path: Union[str, Path], keys: LabelKeys, any_energy: bool, any_forces: bool, info_keys: Sequence[str]) -> None:
    """Raise when a file asked for energies (forces) has none in any frame; ``info_keys``: its first frame's."""
    if keys.energy and not any_energy:
        raise UserInputError(
            f"{frame_location(path, 0)}: no energy under info key {keys.energy!r} (nor in any other frame); "
            f"available info keys: {list(info_keys)}; set --energy-key."
        )
    if keys.forces and not any_forces:
        raise UserInputError(
            f"{frame_location(path, 0)}: no forces under arrays key {keys.forces!r} (nor in any other frame); "
            f"set --forces-key (SPICE uses 'force')."
        )


def check_frame_elements(check: Callable[[torch.Tensor], None], frames: Sequence[Frame]) -> None:
    """Run a backbone's ``check_elements`` on each frame; a failure names the frame's file and index."""
    for frame in frames:
        try:
            check(torch.as_tensor(frame.atoms.numbers))
        except ValueError as error:
            raise UserInputError(f"{frame.location}: {error}") from error


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
