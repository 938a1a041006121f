"""Self-consistent latent polarisation on slabs (pbc = (True, True, False); issue 15, item 5).

References: the autograd Hessian of the engine's slab Coulomb energy with unit
charges (its off-diagonal blocks are −T_ij, slab correction included), the
dense solve, finite differences of the model's energy, and a slab with its
images pushed far away, which must tend to the open cluster.
"""

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.calculators.fd import calculate_numerical_forces

import latent_lr
from latent_lr import AtomsBatch, coulomb_energy
from latent_lr.electrostatics.dipole_ewald import dipole_operator
from latent_lr.electrostatics.induction import self_consistent_cap, self_consistent_induction

from test_polarizability import FIELD, make_model, rattled_salt

SIGMA = 0.8
SLAB_CELL = torch.tensor([[4.0, 0.3, 0.0], [0.0, 4.5, 0.0], [0.0, 0.0, 6.0]], dtype=torch.float64)


def slab_operator(positions, accuracy):
    n = positions.shape[0]
    return dipole_operator(
        positions, SLAB_CELL[None], torch.tensor([False]), torch.zeros(n, dtype=torch.long),
        torch.tensor(SIGMA, dtype=torch.float64), accuracy, slab=torch.tensor([True]),
    )


def test_slab_dipole_operator_is_minus_the_hessian_of_the_engines_slab_energy():
    rng = np.random.default_rng(1)
    positions = torch.tensor(rng.uniform(0.0, 4.0, size=(6, 3)))
    accuracy = 1e-10
    tensor = slab_operator(positions, accuracy).dense(6).reshape(6, 3, 6, 3)
    ones = torch.ones(6, dtype=torch.float64)
    energy = lambda x: coulomb_energy(  # noqa: E731
        x, ones, cell=SLAB_CELL, pbc=(True, True, False), smearing=SIGMA, accuracy=accuracy, method="ewald"
    ).sum()
    hessian = torch.autograd.functional.hessian(energy, positions)
    off = ~torch.eye(6, dtype=torch.bool)
    difference = (tensor + hessian).permute(0, 2, 1, 3)[off].abs().max().item()
    assert difference < 1e-10, difference
    torch.testing.assert_close(tensor, tensor.permute(2, 3, 0, 1), atol=1e-13, rtol=0)
    # the Yeh–Berkowitz term matters: without it the zz blocks differ by 4π k_e/V
    operator = slab_operator(positions, accuracy)
    assert float(operator.slab_weight[0]) > 1e-3
    p = torch.tensor(rng.normal(size=(6, 3)))
    torch.testing.assert_close(operator.apply(p), (operator.dense(6) @ p.reshape(-1)).reshape(6, 3), atol=1e-12, rtol=0)


def test_slab_self_consistent_dipoles_equal_the_dense_solve_and_tend_to_the_open_cluster():
    rng = np.random.default_rng(2)
    positions = torch.tensor(rng.uniform(0.0, 3.5, size=(8, 3)))
    sigma = torch.tensor(SIGMA, dtype=torch.float64)
    alpha = 0.8 * self_consistent_cap(sigma) * torch.tensor(rng.uniform(0.3, 1.0, size=8))
    field = torch.tensor(rng.normal(size=(8, 3)))
    batch = torch.zeros(8, dtype=torch.long)

    def solve(cell, solver, slab=True):
        return self_consistent_induction(
            alpha, field, positions, batch, 1, sigma, solver, cell=cell[None], periodic=torch.tensor([False]),
            accuracy=1e-10, slab=torch.tensor([slab]),
        )[0]

    cg, dense = solve(SLAB_CELL, "cg"), solve(SLAB_CELL, "dense")
    torch.testing.assert_close(cg, dense, rtol=0, atol=1e-9)
    # in-plane images 400 Å away: the slab is an isolated cluster
    far = torch.diag(torch.tensor([400.0, 400.0, 6.0], dtype=torch.float64))
    isolated = self_consistent_induction(alpha, field, positions, batch, 1, sigma, "dense")[0]
    torch.testing.assert_close(solve(far, "dense"), isolated, rtol=0, atol=1e-6)


def test_self_consistent_slab_model_forces_are_minus_the_energy_gradient():
    model = make_model("self_consistent")
    slab = rattled_salt()[:6]
    slab.cell[2] = [0.0, 0.0, 12.0]
    slab.pbc = (True, True, False)
    slab.info["external_field"] = np.asarray(FIELD, dtype=float)
    slab.calc = latent_lr.Calculator(model)
    forces = slab.get_forces()
    numerical = calculate_numerical_forces(slab, 1e-4)
    np.testing.assert_allclose(forces, numerical, atol=1e-6)
    out = model(AtomsBatch.from_atoms(slab), compute_forces=False)
    assert float(out["induced_dipoles"].abs().max()) > 1e-4  # dipoles are induced


def test_self_consistent_on_a_wire_is_a_clear_error():
    model = make_model("self_consistent")
    wire = Atoms("NaCl", positions=[[0, 0, 0], [2.8, 0, 0]], cell=[5.6, 10, 10], pbc=(True, False, False))
    with pytest.raises(NotImplementedError, match="one direction only"):
        model(AtomsBatch.from_atoms(wire))
