"""Uniform external field: E = ... - μ·E_ext (periodic cells: tests/test_polarizability.py).

References: the model's own field-free energy and dipole (the field term must be
exactly -μ·E_ext), finite differences in the field (Maxwell relation
∂F_iβ/∂E_α = Z*_i,αβ with Z* from ∂μ/∂r), rotation of structure and field
together, and a net charge's force Q·E_ext.
"""

import numpy as np
import pytest
import torch
from ase.build import molecule
from scipy.spatial.transform import Rotation

import latent_lr
from latent_lr import AtomsBatch

SPECIES = [1, 6, 7, 8, 11, 17]
FIELD = np.array([0.03, -0.02, 0.05])  # V/Å


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    host = latent_lr.RadialPotential(species=SPECIES, cutoff=3.5, hidden_dim=16).double()
    return latent_lr.wrap(host).eval()


def in_field(atoms, field):
    atoms = atoms.copy()
    atoms.info["external_field"] = np.asarray(field, dtype=float)
    return AtomsBatch.from_atoms(atoms)


def test_field_energy_is_minus_dipole_dot_field(model):
    ethanol = molecule("CH3CH2OH")
    free = model(in_field(ethanol, np.zeros(3)))
    on = model(in_field(ethanol, FIELD))
    expected = free["energy"].item() - float(free["dipole"][0].numpy() @ FIELD)
    assert on["energy"].item() == pytest.approx(expected, abs=1e-12)
    assert on["field_energy"].item() == pytest.approx(-float(free["dipole"][0].numpy() @ FIELD), abs=1e-12)
    assert abs(on["field_energy"].item()) > 1e-6


def test_maxwell_relation_force_field_derivative_equals_bec(model):
    ethanol = molecule("CH3CH2OH")
    bec = model(in_field(ethanol, FIELD), compute_bec=True)["bec"].numpy()
    step = 1e-3
    derivative = np.zeros_like(bec)  # [i, α, β] = ∂F_iβ/∂E_α
    for alpha in range(3):
        shift = np.zeros(3)
        shift[alpha] = step
        plus = model(in_field(ethanol, FIELD + shift))["forces"].numpy()
        minus = model(in_field(ethanol, FIELD - shift))["forces"].numpy()
        derivative[:, alpha, :] = (plus - minus) / (2 * step)
    assert np.abs(bec).max() > 1e-2
    np.testing.assert_allclose(derivative, bec, atol=1e-8)


def test_net_charge_feels_q_times_field(model):
    ion = molecule("CH3CH2OH")
    ion.info["charge"] = 1.0
    free = model(AtomsBatch.from_atoms(ion))["forces"].sum(0).numpy()
    ion.info["external_field"] = FIELD
    on = model(AtomsBatch.from_atoms(ion))["forces"].sum(0).numpy()
    np.testing.assert_allclose(on - free, 1.0 * FIELD, atol=1e-10)


def test_rotating_structure_and_field_together_is_invariant(model):
    ethanol = molecule("CH3CH2OH")
    rotation = Rotation.random(random_state=5).as_matrix()
    turned = ethanol.copy()
    turned.positions = ethanol.positions @ rotation.T
    a = model(in_field(ethanol, FIELD))
    b = model(in_field(turned, rotation @ FIELD))
    assert b["energy"].item() == pytest.approx(a["energy"].item(), abs=1e-10)
    np.testing.assert_allclose(b["forces"].numpy(), a["forces"].numpy() @ rotation.T, atol=1e-10)
    # the field term is not rotation invariant on its own: rotating only the molecule changes it
    c = model(in_field(turned, FIELD))
    assert abs(c["energy"].item() - a["energy"].item()) > 1e-6


def test_calculator_reads_the_field_and_notices_changes(model):
    atoms = molecule("CH3CH2OH")
    atoms.calc = latent_lr.Calculator(model)
    free = atoms.get_potential_energy()
    dipole = atoms.get_dipole_moment()
    atoms.info["external_field"] = FIELD
    assert atoms.get_potential_energy() == pytest.approx(free - dipole @ FIELD, abs=1e-10)


def test_field_without_long_range_is_a_clear_error(model):
    torch.manual_seed(0)
    host = latent_lr.RadialPotential(species=SPECIES, cutoff=3.5, hidden_dim=16).double()
    short = latent_lr.wrap(host, long_range=False)
    with pytest.raises(ValueError, match="no long-range module"):
        short(in_field(molecule("CH3CH2OH"), FIELD))


def test_calculator_arguments_override_atoms_info(model):
    atoms = molecule("CH3CH2OH")
    atoms.info["charge"], atoms.info["external_field"] = 1.0, FIELD
    from_info = latent_lr.Calculator(model).get_potential_energy(atoms)
    plain = molecule("CH3CH2OH")
    from_arguments = latent_lr.Calculator(model, charge=1.0, external_field=FIELD).get_potential_energy(plain)
    assert from_arguments == pytest.approx(from_info, abs=1e-12)
    charges = latent_lr.Calculator(model, charge=-1.0).get_charges(plain)
    assert charges.sum() == pytest.approx(-1.0, abs=1e-10)
    with pytest.raises(ValueError, match="3 numbers"):
        latent_lr.Calculator(model, external_field=[1.0, 2.0])
