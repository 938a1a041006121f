"""Checks every adapter's wrapped model must pass, shared by the adapter test files."""

import numpy as np
from ase.build import bulk
from ase.calculators.fd import calculate_numerical_forces, calculate_numerical_stress

import latent_lr


def triclinic_salt():
    """Rattled rock-salt NaCl in a sheared (triclinic) cubic cell, 8 atoms."""
    crystal = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
    crystal.cell[0, 1] = 0.5
    crystal.cell[2, 0] = -0.3
    crystal.rattle(0.1, seed=1)
    return crystal


def assert_forces_match_finite_differences(model, atoms, step=1e-4, atol=1e-7):
    atoms.calc = latent_lr.Calculator(model)
    np.testing.assert_allclose(atoms.get_forces(), calculate_numerical_forces(atoms, step), atol=atol)


def assert_long_range_stress_matches_finite_strain(model, host):
    """Stress equals finite strain and the long-range term changes it (it reaches the virial)."""
    atoms = triclinic_salt()
    atoms.calc = latent_lr.Calculator(model)
    stress = atoms.get_stress()
    np.testing.assert_allclose(stress, calculate_numerical_stress(atoms, 1e-5), atol=1e-8)
    short = latent_lr.Calculator(latent_lr.wrap(host, long_range=False))
    assert np.abs(stress - short.get_stress(atoms)).max() > 1e-6
