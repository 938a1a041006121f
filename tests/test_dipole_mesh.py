"""The periodic dipole field tensor through particle-mesh Ewald (issue 15, item 5).

References: the Ewald operator of :mod:`latent_lr.electrostatics.dipole_ewald`
at a much tighter accuracy (itself checked against the engine's Hessian in
tests/test_periodic_polarization.py), symmetry, the dense matrix, and finite
differences of the self-consistent induction energy.
"""

import numpy as np
import pytest
import torch

from latent_lr.electrostatics.dipole_ewald import dipole_operator
from latent_lr.electrostatics.induction import self_consistent_cap, self_consistent_induction

SIGMA = torch.tensor(0.8, dtype=torch.float64)
CELL = torch.tensor([[9.0, 0.4, 0.0], [0.0, 9.5, 0.3], [0.2, 0.0, 10.0]], dtype=torch.float64)


def operator(positions, accuracy, method, cell=CELL):
    n = positions.shape[0]
    return dipole_operator(
        positions, cell[None], torch.tensor([True]), torch.zeros(n, dtype=torch.long), SIGMA, accuracy, method=method
    )


@pytest.mark.parametrize("accuracy", [1e-4, 1e-6, 1e-8])
def test_pme_dipole_field_equals_the_ewald_field_to_the_engine_accuracy(accuracy):
    rng = np.random.default_rng(0)
    positions = torch.tensor(rng.uniform(0.0, 9.0, size=(40, 3)))
    dipoles = torch.tensor(rng.normal(size=(40, 3)))
    reference = operator(positions, 1e-12, "ewald").apply(dipoles)
    mesh = operator(positions, accuracy, "pme").apply(dipoles)
    error = float((mesh - reference).norm() / reference.norm())
    assert error < 10 * accuracy, error  # measured 2.9e-5, 1.2e-7, 4.7e-10
    assert error > 0  # a different method: not the Ewald sum itself


def test_pme_dipole_operator_is_symmetric_and_its_dense_matrix_matches_the_product():
    rng = np.random.default_rng(1)
    positions = torch.tensor(rng.uniform(0.0, 9.0, size=(12, 3)))
    mesh = operator(positions, 1e-6, "pme")
    dense = mesh.dense(12)
    torch.testing.assert_close(dense, dense.T, rtol=0, atol=1e-10)
    dipoles = torch.tensor(rng.normal(size=(12, 3)))
    torch.testing.assert_close(mesh.apply(dipoles), (dense @ dipoles.reshape(-1)).reshape(12, 3), rtol=0, atol=1e-10)
    reference = operator(positions, 1e-12, "ewald").dense(12)
    assert float((dense - reference).abs().max() / reference.abs().max()) < 1e-5


def test_pme_self_consistent_energy_gradients_match_finite_differences():
    rng = np.random.default_rng(2)
    positions = torch.tensor(rng.uniform(0.0, 9.0, size=(16, 3)), requires_grad=True)
    alpha = 0.8 * self_consistent_cap(SIGMA) * torch.tensor(rng.uniform(0.3, 1.0, size=16))
    field = torch.tensor(rng.normal(size=(16, 3)))
    batch = torch.zeros(16, dtype=torch.long)

    def energy(x, cell):
        return self_consistent_induction(
            alpha, field, x, batch, 1, SIGMA, cell=cell[None], periodic=torch.tensor([True]), accuracy=1e-8,
            method="pme",
        )[1].sum()

    cell = CELL.clone().requires_grad_()
    gradient, cell_gradient = torch.autograd.grad(energy(positions, cell), (positions, cell))
    h = 1e-5
    for atom, axis in ((0, 0), (5, 2), (11, 1)):
        step = torch.zeros_like(positions)
        step[atom, axis] = h
        with torch.no_grad():
            numerical = (energy(positions + step, CELL) - energy(positions - step, CELL)) / (2 * h)
        assert abs(float(numerical) - float(gradient[atom, axis])) < 1e-6 * (1 + abs(float(numerical)))
    # the cell derivative (stress) goes through the mesh's wave vectors and the fractional coordinates
    step = torch.zeros(3, 3, dtype=torch.float64)
    step[1, 1] = h
    with torch.no_grad():
        numerical = (energy(positions, CELL + step) - energy(positions, CELL - step)) / (2 * h)
    assert abs(float(numerical) - float(cell_gradient[1, 1])) < 1e-6 * (1 + abs(float(numerical)))


def test_unknown_dipole_method_is_a_clear_error():
    with pytest.raises(ValueError, match="method must be one of"):
        operator(torch.zeros(2, 3, dtype=torch.float64) + torch.eye(3, dtype=torch.float64)[:2], 1e-6, "p3m")
