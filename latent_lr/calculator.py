"""ASE calculator for wrapped models."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator as AseCalculator
from ase.calculators.calculator import all_changes

from .data import AtomsBatch
from .electrostatics import EngineState
from .model import LongRangeModel
from .spin import SPIN_KEY, total_spin


class Calculator(AseCalculator):
    """Energies (eV), forces (eV/Å), stress (eV/Å³; periodic, and in-plane for slabs), latent charges (e),
    dipole (e·Å; the cell dipole Ω P for periodic structures), Born effective
    charges (e, shape (N, 3, 3)) and the polarisability tensor ∂M/∂E_ext (e·Å²/V,
    shape (3, 3); ``calc.get_property("polarizability", atoms)``) from a wrapped model.

    The net charge is read from ``atoms.info['charge']``, the total spin 2S_z from
    ``atoms.info['spin']`` or ``atoms.info['multiplicity']`` (see :mod:`latent_lr.spin`; the keys
    are the model's :attr:`~latent_lr.LongRangeModel.info_keys`, those its training read) and a
    uniform external field (V/Å) from ``atoms.info['external_field']`` when present; the
    ``charge``, ``spin`` and ``external_field`` arguments, when given, take precedence.
    A model with the spin channel also gives per-atom spin populations n↑ − n↓ as ASE's
    ``magmoms`` (μ_B for g = 2; ``atoms.get_magnetic_moments()``) and their sum 2S_z as ``magmom``.

    Args:
        model: a model from :func:`latent_lr.wrap` or :func:`latent_lr.load`.
        device: torch device to run on.
        dtype: torch dtype (default: the model's).
        charge: net charge of every structure this calculator sees, e.
        spin: total spin 2S_z = N↑ − N↓ of every structure this calculator sees (an integer;
            checked against the electron count like ``atoms.info['spin']``).
        external_field: uniform field (3,), V/Å (fixed-field ensemble; for periodic
            structures keep positions unwrapped during a run, see ``LongRangeModel._field_energy``).
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress", "charges", "dipole", "bec", "polarizability",
                              "magmoms", "magmom"]

    def __init__(
        self,
        model: LongRangeModel,
        device: Union[str, torch.device] = "cpu",
        dtype: Optional[torch.dtype] = None,
        charge: Optional[float] = None,
        spin: Optional[int] = None,
        external_field: Optional[Sequence[float]] = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not isinstance(model, LongRangeModel):
            raise ValueError("Calculator takes a model from latent_lr.wrap() or latent_lr.load().")
        if external_field is not None and np.shape(external_field) != (3,):
            raise ValueError(
                f"external_field must be 3 numbers (V/Å), got shape {np.shape(external_field)}."
            )
        self.charge = None if charge is None else float(charge)
        if spin is not None:
            total_spin({SPIN_KEY: spin}, [], float("nan"), where="Calculator(spin=...)")
        self.spin = None if spin is None else int(spin)
        self.external_field = None if external_field is None else np.asarray(external_field, dtype=float)
        self.model = model.to(device=device, dtype=dtype or model.dtype).eval()
        #: This calculator's engine state (PME keeps its mesh along a trajectory); never shared.
        self.engine_state = EngineState()

    def clear_caches(self) -> None:
        """Forget the kept PME mesh, cached tensors and results (the next call chooses afresh)."""
        self.engine_state.clear_caches()
        self.reset()

    def check_state(self, atoms: Atoms, tol: float = 1e-15) -> list[str]:
        """ASE's checks plus the net charge and external field held in ``atoms.info``."""
        changes = super().check_state(atoms, tol)
        if self.atoms is not None:
            spin_keys = [key for key in self.model.spin_keys if key is not None]
            for key in (self.model.info_keys.total_charge, "external_field", *spin_keys):
                old, new = self.atoms.info.get(key, 0.0), atoms.info.get(key, 0.0)
                if not np.array_equal(np.asarray(old, dtype=float), np.asarray(new, dtype=float)):
                    changes.append(f"info[{key!r}]")
        return changes

    def calculate(self, atoms: Optional[Atoms] = None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        keys = self.model.info_keys
        spin_keys = self.model.spin_keys
        if self.charge is not None or self.spin is not None:  # the arguments win over atoms.info
            atoms = self.atoms.copy()
            if self.charge is not None:
                atoms.info[keys.total_charge] = self.charge
            if self.spin is not None and self.model.reads_spin:
                spin_keys = (spin_keys[0] or SPIN_KEY, None)
                atoms.info[spin_keys[0]] = self.spin
        data = AtomsBatch.from_atoms(
            atoms, dtype=self.model.dtype, device=self.model.device, total_charge_key=keys.total_charge,
            spin_key=spin_keys[0], multiplicity_key=spin_keys[1],
        )
        if self.external_field is not None:
            data.external_field = torch.tensor(
                self.external_field, dtype=self.model.dtype, device=self.model.device
            ).expand(data.n_structures, 3)
        periodic = bool(self.atoms.pbc.all())
        # Slabs, pbc = (True, True, False): in-plane stress per cell volume (see LongRangeModel).
        with_stress = periodic or (self.atoms.pbc.tolist() == [True, True, False] and bool(self.atoms.cell.volume > 0))
        want_bec = "bec" in properties and self.model.long_range is not None
        want_polarizability = "polarizability" in properties and self.model.long_range is not None
        out = self.model(
            data, compute_forces=True, compute_stress=with_stress, compute_bec=want_bec,
            compute_polarizability=want_polarizability, engine_state=self.engine_state,
        )
        energy = float(out["energy"][0])
        self.results["energy"] = energy
        self.results["free_energy"] = energy
        self.results["forces"] = out["forces"].cpu().numpy().astype(float)
        if with_stress:
            self.results["stress"] = _voigt(out["stress"][0].cpu().numpy())
        if self.model.long_range is not None:
            self.results["charges"] = out["charges"].cpu().numpy().astype(float)
            moment = out["polarization"][0] * abs(float(np.linalg.det(self.atoms.cell.array))) if periodic else out["dipole"][0]
            self.results["dipole"] = moment.cpu().numpy().astype(float)
        if "spins" in out:
            self.results["magmoms"] = out["spins"].cpu().numpy().astype(float)
            self.results["magmom"] = float(out["spins"].sum())
        if want_bec:
            self.results["bec"] = out["bec"].cpu().numpy().astype(float)
        if want_polarizability:
            self.results["polarizability"] = out["polarizability"][0].cpu().numpy().astype(float)


def _voigt(stress: np.ndarray) -> np.ndarray:
    """3x3 -> ASE Voigt order (xx, yy, zz, yz, xz, xy)."""
    return np.array([stress[0, 0], stress[1, 1], stress[2, 2], stress[1, 2], stress[0, 2], stress[0, 1]])
