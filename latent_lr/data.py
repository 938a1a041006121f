"""A batch of atomic structures in the form every part of latent-lr reads."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Optional, Sequence

import numpy as np
import torch
from ase import Atoms

from .spin import MULTIPLICITY_KEY, SPIN_KEY, total_spin


@dataclass
class AtomsBatch:
    """Structures concatenated atom-wise.

    Attributes:
        positions: (N, 3) Cartesian positions, Å.
        numbers: (N,) atomic numbers.
        cell: (B, 3, 3) lattice vectors as rows, Å (zeros for open boundaries).
        pbc: (B, 3) periodicity flags.
        batch: (N,) structure index of each atom, sorted.
        total_charge: (B,) net charge of each structure, e.
        external_field: (B, 3) uniform external field, V/Å (zeros if none).
        total_spin: (B,) total spin 2S_z = N↑ − N↓ of each structure (None: 0; see
            :mod:`latent_lr.spin`); only a model with ``spin_channel`` reads it.
    """

    positions: torch.Tensor
    numbers: torch.Tensor
    cell: torch.Tensor
    pbc: torch.Tensor
    batch: torch.Tensor
    total_charge: torch.Tensor
    external_field: Optional[torch.Tensor] = None
    total_spin: Optional[torch.Tensor] = None

    @property
    def n_structures(self) -> int:
        return self.cell.shape[0]

    @property
    def n_atoms(self) -> torch.Tensor:
        """(B,) atoms per structure."""
        return torch.bincount(self.batch, minlength=self.n_structures)

    @property
    def periodic(self) -> torch.Tensor:
        """(B,) True for fully periodic structures."""
        return self.pbc.all(dim=1)

    @property
    def slab(self) -> torch.Tensor:
        """(B,) True for slabs, pbc = (True, True, False).

        A slab is periodic along the first two cell vectors and open along the
        third, which must be perpendicular to them (its length is the cell
        height, vacuum included; see :mod:`latent_lr.electrostatics.slab`).
        """
        flags = self.pbc.new_tensor([True, True, False])
        return (self.pbc == flags).all(dim=1)

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "AtomsBatch":
        """Copy to a device, casting floating-point fields to ``dtype``."""
        moved: dict[str, Any] = {}  # field name -> tensor or None (fields differ in optionality)
        for field in fields(self):
            value = getattr(self, field.name)
            if value is None:
                moved[field.name] = None
            elif value.dtype.is_floating_point:
                moved[field.name] = value.to(device=device, dtype=dtype or value.dtype)
            else:
                moved[field.name] = value.to(device=device)
        return AtomsBatch(**moved)

    def with_geometry(self, positions: torch.Tensor, cell: torch.Tensor) -> "AtomsBatch":
        """The same batch with new (e.g. strained, grad-carrying) positions and cell."""
        return replace(self, positions=positions, cell=cell)

    @classmethod
    def from_atoms(
        cls,
        structures: Sequence[Atoms] | Atoms,
        dtype: torch.dtype = torch.float64,
        device=None,
        total_charge_key: str = "charge",
        external_field_key: str = "external_field",
        spin_key: Optional[str] = SPIN_KEY,
        multiplicity_key: Optional[str] = MULTIPLICITY_KEY,
    ) -> "AtomsBatch":
        """Batch ASE structures.

        The net charge of each structure is read from ``atoms.info[total_charge_key]``
        (0 when absent), the external field (V/Å) from ``atoms.info[external_field_key]``,
        the total spin 2S_z from ``atoms.info[spin_key]`` or the multiplicity
        ``atoms.info[multiplicity_key]`` (0 when both are absent; checked by
        :func:`latent_lr.spin.total_spin`, a bad value is a ValueError).
        """
        if isinstance(structures, Atoms):
            structures = [structures]
        if len(structures) == 0:
            raise ValueError("no structures given; pass at least one ase.Atoms.")
        for index, atoms in enumerate(structures):
            if len(atoms) == 0:
                raise ValueError(f"structure {index} of the {len(structures)} given has no atoms; remove it.")
            if not np.isfinite(atoms.positions).all():
                raise ValueError(
                    f"structure {index} of the {len(structures)} given has NaN or inf positions; fix or remove it."
                )
        positions = np.concatenate([atoms.positions for atoms in structures])
        numbers = np.concatenate([atoms.numbers for atoms in structures])
        cells = np.stack(
            [
                atoms.cell.array if atoms.pbc.any() else np.zeros((3, 3))
                for atoms in structures
            ]
        )
        pbc = np.stack([atoms.pbc for atoms in structures])
        batch = np.repeat(np.arange(len(structures)), [len(a) for a in structures])
        charge = [float(atoms.info.get(total_charge_key, 0.0)) for atoms in structures]
        spin = [
            total_spin(atoms.info, atoms.numbers, total, spin_key, multiplicity_key,
                       where=f"structure {index} of the {len(structures)} given")
            for index, (atoms, total) in enumerate(zip(structures, charge))
        ]
        field = np.stack(
            [
                np.asarray(atoms.info.get(external_field_key, np.zeros(3)), dtype=float)
                for atoms in structures
            ]
        )
        return cls(
            positions=torch.tensor(positions, dtype=dtype, device=device),
            numbers=torch.tensor(numbers, dtype=torch.long, device=device),
            cell=torch.tensor(cells, dtype=dtype, device=device),
            pbc=torch.tensor(pbc, dtype=torch.bool, device=device),
            batch=torch.tensor(batch, dtype=torch.long, device=device),
            total_charge=torch.tensor(charge, dtype=dtype, device=device),
            external_field=torch.tensor(field, dtype=dtype, device=device),
            total_spin=torch.tensor(spin, dtype=dtype, device=device),
        )
