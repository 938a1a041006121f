"""Slabs, pbc = (True, True, False), through the model layer (radial backbone).

References: finite differences (ASE) for forces, in-plane stress and the
normal row of the Born effective charges; the vacuum height in the cell must
not change the long-range energy.
"""

import numpy as np
import pytest
import torch
from ase.build import bulk
from ase.calculators.fd import calculate_numerical_forces

import latent_lr
from latent_lr import AtomsBatch

SPECIES = [1, 6, 7, 8, 11, 17]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    host = latent_lr.RadialPotential(species=SPECIES, cutoff=3.5, hidden_dim=16).double()
    return latent_lr.wrap(host).eval()


def salt_slab(height: float = 12.0):
    """Two rattled NaCl(001) layers, oblique in-plane cell, open along z (cell height ``height`` Å)."""
    slab = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
    slab.cell[1, 0] = 0.6
    slab.positions[:, 2] += 0.5 * (height - 2.82)
    slab.set_cell([slab.cell[0], slab.cell[1], [0.0, 0.0, height]], scale_atoms=False)
    slab.pbc = [True, True, False]
    slab.rattle(0.1, seed=5)
    return slab


def in_plane_numerical_stress(atoms, d: float) -> np.ndarray:
    """(σ_xx, σ_yy, σ_xy) in eV/Å³ by central differences of in-plane strains (the
    third vector must stay normal to the plane, so ASE's full-strain version does not apply)."""
    volume = atoms.get_volume()
    values = []
    for i, j in [(0, 0), (1, 1), (0, 1)]:
        energies = []
        for sign in (1, -1):
            strain = np.eye(3)
            strain[i, j] += sign * d
            strain[j, i] = strain[i, j]
            strained = atoms.copy()
            strained.calc = atoms.calc
            strained.set_cell(atoms.cell.array @ strain, scale_atoms=True)
            energies.append(strained.get_potential_energy())
        values.append((energies[0] - energies[1]) / (2 * d * volume * (1 if i == j else 2)))
    return np.array(values)


def test_forces_are_minus_the_energy_gradient(model):
    atoms = salt_slab()
    atoms.calc = latent_lr.Calculator(model)
    np.testing.assert_allclose(atoms.get_forces(), calculate_numerical_forces(atoms, 1e-4), atol=1e-7)


def test_in_plane_stress_matches_finite_strain_and_normal_components_are_zero(model):
    atoms = salt_slab()
    atoms.calc = latent_lr.Calculator(model)
    stress = atoms.get_stress()
    in_plane = [0, 1, 5]  # xx, yy, xy (Voigt)
    np.testing.assert_allclose(stress[in_plane], in_plane_numerical_stress(atoms, 1e-5), atol=1e-8)
    np.testing.assert_array_equal(stress[[2, 3, 4]], 0.0)
    # The long-range term reaches the in-plane stress.
    short = latent_lr.Calculator(latent_lr.wrap(model.backbone, long_range=False).eval())
    assert np.abs(stress - short.get_stress(atoms)).max() > 1e-6


def test_calculator_on_a_slab_gives_dipole_and_born_charges(model):
    atoms = salt_slab()
    calc = latent_lr.Calculator(model)
    calc.calculate(atoms, ["energy", "forces", "stress", "charges", "dipole", "bec"])
    charges, dipole, bec = calc.results["charges"], calc.results["dipole"], calc.results["bec"]
    assert dipole.shape == (3,) and bec.shape == (len(atoms), 3, 3)
    # Normal component: exact Σ q z (neutral slab, origin-free).
    assert abs(charges.sum()) < 1e-10
    np.testing.assert_allclose(dipole[2], charges @ atoms.positions[:, 2], atol=1e-10)
    # Acoustic sum rule, all rows (normal row exact, in-plane rows enforced).
    np.testing.assert_allclose(bec.sum(axis=0), 0.0, atol=1e-10)

    def normal_dipole(moved):
        return latent_lr.Calculator(model).get_property("dipole", moved)[2]

    h = 1e-4
    for i in (0, 5):
        for beta in range(3):
            plus, minus = atoms.copy(), atoms.copy()
            plus.positions[i, beta] += h
            minus.positions[i, beta] -= h
            derivative = (normal_dipole(plus) - normal_dipole(minus)) / (2 * h)
            assert abs(bec[i, 2, beta] - derivative) < 1e-7, (i, beta, bec[i, 2, beta], derivative)


def test_long_range_energy_does_not_depend_on_the_vacuum_height(model):
    thin, tall = salt_slab(6.0), salt_slab(40.0)
    tall.positions[:, 2] += thin.positions[0, 2] - tall.positions[0, 2]
    out = model(AtomsBatch.from_atoms([thin, tall]), compute_stress=True)
    energy = out["long_range_energy"]
    assert energy.abs().min() > 1e-3
    assert abs(float(energy[0] - energy[1])) < 1e-6 * float(energy.abs().max())
    torch.testing.assert_close(out["forces"][: len(thin)], out["forces"][len(thin):], atol=1e-8, rtol=0)
    # The stress is per cell volume A c: c σ (the surface stress, eV/Å²) agrees.
    torch.testing.assert_close(6.0 * out["stress"][0], 40.0 * out["stress"][1], atol=1e-8, rtol=0)
    # Slabs report a dipole per cell and no polarisation.
    assert out["polarization"].abs().max() == 0
    torch.testing.assert_close(out["dipole"][0], out["dipole"][1], atol=1e-9, rtol=0)


def test_slab_with_zero_third_vector_gives_no_stress_but_energy(model):
    atoms = salt_slab()
    atoms.cell[2] = 0.0
    out = model(AtomsBatch.from_atoms(atoms))
    assert "stress" not in out and torch.isfinite(out["energy"]).all()
    with pytest.raises(ValueError, match="third cell vector is zero"):
        model(AtomsBatch.from_atoms(atoms), compute_stress=True)
