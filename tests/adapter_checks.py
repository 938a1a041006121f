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


def assert_rotation_equivariance_and_bec_sum_rule(model, atol=1e-9):
    """Energy invariant; dipole and BECs rotate as vector and tensor; Σ_i Z*_i = 0."""
    import torch  # noqa: F401  (the model's outputs are tensors)
    from ase.build import molecule
    from scipy.spatial.transform import Rotation

    from latent_lr import AtomsBatch

    atoms = molecule("CH3CH2OH")
    rotation = Rotation.random(random_state=3).as_matrix()
    turned = atoms.copy()
    turned.positions = atoms.positions @ rotation.T
    a = model(AtomsBatch.from_atoms(atoms), compute_bec=True)
    b = model(AtomsBatch.from_atoms(turned), compute_bec=True)
    np.testing.assert_allclose(b["energy"].item(), a["energy"].item(), atol=atol)
    np.testing.assert_allclose(b["dipole"][0].detach().numpy(), rotation @ a["dipole"][0].detach().numpy(), atol=atol)
    bec_a, bec_b = a["bec"].detach().numpy(), b["bec"].detach().numpy()
    assert np.abs(bec_a).max() > 1e-4  # not trivially zero
    np.testing.assert_allclose(bec_b, rotation @ bec_a @ rotation.T, atol=atol)
    np.testing.assert_allclose(bec_a.sum(0), np.zeros((3, 3)), atol=atol)


def assert_long_range_sees_beyond_the_cutoff(model, atol=1e-10):
    """Moving one molecule from 15 to 25 Å changes the wrapped energy, not the host's."""
    from ase.build import molecule

    from latent_lr import AtomsBatch

    def energies(distance):
        atoms = molecule("H2O") + molecule("CH3OH")
        atoms.positions[3:] += [distance, 0, 0]
        return model(AtomsBatch.from_atoms(atoms), compute_forces=False)

    near, far = energies(15.0), energies(25.0)
    np.testing.assert_allclose(near["host_energy"].item(), far["host_energy"].item(), atol=atol)
    assert abs(near["energy"].item() - far["energy"].item()) > 1e-7
