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


@pytest.mark.parametrize("chunk", [7, 1024])
def test_mesh_density_energy_derivatives_match_finite_differences(monkeypatch, chunk):
    """DipoleMesh.density_energy (analytic first-derivative backward, spread and gathered ``chunk`` atoms at a
    time): ∂E/∂(positions, cell, q, p) and the position Hessian-vector product (the autograd fallback of a
    graph-building backward) against central finite differences of the energy and of its gradient."""
    from latent_lr.electrostatics import dipole_mesh

    monkeypatch.setattr(dipole_mesh, "SUPPORT_CHUNK_ATOMS", chunk)
    rng = np.random.default_rng(4)
    n = 20
    positions0 = torch.tensor(rng.uniform(0.0, 9.0, size=(n, 3)))
    charges0, dipoles0 = torch.tensor(rng.normal(size=n)), torch.tensor(0.3 * rng.normal(size=(n, 3)))

    def energy(positions, cell, charges, dipoles):  # fixed α, mesh and order: E_rec is smooth in the cell
        mesh = dipole_mesh.dipole_mesh(positions, cell, torch.arange(n), torch.tensor(0.6, dtype=torch.float64),
                                       (20, 18, 22), 6, eager=False)
        return mesh.density_energy(charges, dipoles)

    inputs = [t.clone().requires_grad_() for t in (positions0, CELL, charges0, dipoles0)]
    analytic = torch.autograd.grad(energy(*inputs), inputs)  # the contracted backward
    gradients = torch.autograd.grad(energy(*inputs), inputs, create_graph=True)  # the autograd form
    h = 1e-5
    for which, index in ((0, (3, 1)), (0, (17, 2)), (1, (0, 0)), (1, (2, 1)), (2, (5,)), (3, (8, 0)), (3, (12, 2))):
        plus, minus = [t.detach().clone() for t in inputs], [t.detach().clone() for t in inputs]
        plus[which][index] += h
        minus[which][index] -= h
        with torch.no_grad():
            numerical = float(energy(*plus) - energy(*minus)) / (2 * h)
        for found in (analytic, gradients):
            assert abs(numerical - float(found[which][index].detach())) < 1e-6 * (1 + abs(numerical)), (which, index)
    direction = torch.tensor(rng.normal(size=(n, 3)))
    (hessian_direction,) = torch.autograd.grad((gradients[0] * direction).sum(), inputs[0])

    def position_gradient(x):
        x = x.clone().requires_grad_()
        return torch.autograd.grad(energy(x, CELL, charges0, dipoles0), x)[0]

    numerical = (position_gradient(positions0 + h * direction) - position_gradient(positions0 - h * direction)) / (2 * h)
    assert float((numerical - hessian_direction).norm() / numerical.norm()) < 1e-5


def test_mesh_density_energy_backward_twice_and_mixed_precision():
    """A retained graph may be traversed twice (same gradients), and float32 charges on a float64 mesh give a
    float64 energy whose charge gradient is float32 and equals the float64 one to single precision."""
    from latent_lr.electrostatics import dipole_mesh

    rng = np.random.default_rng(5)
    n = 9
    positions = torch.tensor(rng.uniform(0.0, 9.0, size=(n, 3)), requires_grad=True)
    mesh = dipole_mesh.dipole_mesh(positions, CELL, torch.arange(n), torch.tensor(0.6, dtype=torch.float64),
                                   (16, 18, 20), 6, eager=False)
    charges, dipoles = torch.tensor(rng.normal(size=n)), torch.tensor(0.3 * rng.normal(size=(n, 3)))
    energy = mesh.density_energy(charges, dipoles)
    first = torch.autograd.grad(energy, positions, retain_graph=True)[0]
    torch.testing.assert_close(torch.autograd.grad(energy, positions, retain_graph=True)[0], first, rtol=0, atol=0)
    single = charges.float().requires_grad_()
    double = charges.clone().requires_grad_()
    low, high = mesh.density_energy(single, dipoles), mesh.density_energy(double, dipoles)
    assert low.dtype == torch.float64
    (low_gradient,), (high_gradient,) = torch.autograd.grad(low, single), torch.autograd.grad(high, double)
    assert low_gradient.dtype == torch.float32
    torch.testing.assert_close(low_gradient.double(), high_gradient, rtol=1e-5, atol=1e-6)
