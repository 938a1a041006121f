"""Joint charge–dipole equilibration on slabs (pbc = (True, True, False)).

References computed by other code than the joint solver's slab coupling: Qeq on
slabs (α → 0), the engine's slab field of frozen net-charged charges and the slab
self-consistent induction (J → ∞), finite differences of the energy and of the
moment, and the symmetry of ∂M/∂E_ext.
"""

import math

import numpy as np
import pytest
import torch
from test_joint_equilibration import FIELD, K_E, SIGMA, random_problem, solve
from test_model_radial import rattled_salt

from latent_lr import coulomb_energy
from latent_lr.electrostatics.field import electric_field
from latent_lr.electrostatics.induction import self_consistent_induction
from latent_lr.electrostatics.joint_equilibration import equilibrate_charges_and_dipoles
from latent_lr.electrostatics.qeq import equilibrate_charges, qeq_energy

NORMAL_FIELD = np.array([0.01, -0.02, 0.06])  # V/Å, mostly normal to the slab


def slab_problem(seed):
    """χ, J, α of a rattled triclinic-in-plane NaCl slab (8 atoms, one layer of cells, vacuum along z)."""
    slab = rattled_salt()
    n = len(slab)
    chi, hardness, alpha, _ = random_problem(n, seed)
    geometry = (
        torch.tensor(slab.positions), torch.tensor(slab.cell.array)[None],
        torch.tensor([[True, True, False]]), torch.zeros(n, dtype=torch.long),
    )
    return chi, hardness, alpha, geometry


def test_zero_polarizability_on_a_slab_is_slab_qeq():
    chi, hardness, _, (positions, cell, pbc, batch) = slab_problem(seed=1)
    field = torch.tensor(NORMAL_FIELD)[None]
    total = torch.tensor([-1.0], dtype=torch.float64)
    charges, dipoles, energy = solve(chi, hardness, np.zeros(len(chi)), positions, cell, pbc, batch, total, field)
    chi, hardness = torch.tensor(chi), torch.tensor(hardness)
    sigma = torch.tensor(SIGMA, dtype=torch.float64)
    qeq = equilibrate_charges(chi - (positions * field).sum(1), hardness, positions, cell, pbc, batch, total, sigma,
                              solver="dense")
    torch.testing.assert_close(charges, qeq, atol=1e-10, rtol=0)
    assert dipoles.abs().max() < 1e-12
    torch.testing.assert_close(energy, qeq_energy(qeq, chi, hardness, positions, cell, pbc, batch, sigma), atol=1e-10, rtol=0)


def test_infinite_hardness_on_a_slab_is_slab_induction_by_the_frozen_net_charge():
    """J → ∞ pins q at q⁰ (net charge 0.7 e, so the correction's Q z_i term matters); Richardson in 1/J."""
    _, _, alpha, (positions, cell, pbc, batch) = slab_problem(seed=3)
    n = len(alpha)
    frozen = torch.tensor(np.random.default_rng(4).normal(scale=0.5, size=n))
    frozen = frozen - frozen.mean() + 0.7 / n
    field = torch.tensor(NORMAL_FIELD)[None]
    sigma = torch.tensor(SIGMA, dtype=torch.float64)

    def joint(hardness):
        charges, dipoles, energy = solve(
            -hardness * frozen.numpy(), np.full(n, hardness), alpha, positions, cell, pbc, batch,
            frozen.sum()[None], field, rtol=1e-15,
        )
        return charges, dipoles, energy + 0.5 * hardness * (frozen**2).sum()

    coarse, fine = joint(1e6), joint(2e6)
    charges, dipoles, energy = (2 * f - c for f, c in zip(fine, coarse))
    charge_field = electric_field(positions, frozen, cell=cell, pbc=pbc, batch=batch, smearing=sigma)
    reference_dipoles, induction = self_consistent_induction(
        torch.tensor(alpha), charge_field + field, positions, batch, 1, sigma, solver="dense", cell=cell,
        periodic=pbc.all(1), slab=torch.tensor([True]),
    )
    electrostatic = coulomb_energy(positions, frozen, cell=cell, pbc=pbc, batch=batch, smearing=sigma)
    self_energy = 0.5 * K_E * math.sqrt(2.0 / math.pi) / SIGMA * (frozen**2).sum()
    torch.testing.assert_close(charges, frozen, atol=1e-10, rtol=0)
    torch.testing.assert_close(dipoles, reference_dipoles, atol=1e-9, rtol=0)
    torch.testing.assert_close(energy, electrostatic + self_energy + induction, atol=1e-8, rtol=0)
    assert reference_dipoles[:, 2].abs().max() > 1e-2


def slab_solution(positions, field, seed=5, total=-1.0):
    chi, hardness, alpha, (_, cell, pbc, batch) = slab_problem(seed)
    as_tensor = (lambda v: torch.as_tensor(v, dtype=torch.float64))
    return equilibrate_charges_and_dipoles(
        as_tensor(chi), as_tensor(hardness), as_tensor(alpha), positions, cell, pbc, batch,
        as_tensor([total]), torch.tensor(SIGMA, dtype=torch.float64), field, rtol=1e-14,
    )


def test_slab_polarisability_is_symmetric_psd_and_the_finite_difference_of_the_moment():
    positions = slab_problem(5)[3][0]

    def moment(field):
        charges, dipoles, _ = slab_solution(positions, field.reshape(1, 3))
        return (charges[:, None] * positions).sum(0) + dipoles.sum(0)

    field = torch.tensor(NORMAL_FIELD)
    tensor = torch.autograd.functional.jacobian(moment, field).numpy()
    np.testing.assert_allclose(tensor, tensor.T, atol=1e-9)
    assert np.linalg.eigvalsh(tensor).min() >= 0
    step = 1e-3  # M is linear in E_ext
    numerical = np.stack(
        [((moment(field + step * e) - moment(field - step * e)) / (2 * step)).numpy() for e in torch.eye(3, dtype=torch.float64)], 1
    )
    np.testing.assert_allclose(tensor, numerical, atol=1e-8)
    assert tensor[2, 2] > 0 and tensor[2, 2] != pytest.approx(tensor[0, 0], rel=1e-3)  # normal ≠ in-plane


def test_slab_forces_are_minus_the_finite_difference_of_the_energy():
    positions = slab_problem(5)[3][0].clone().requires_grad_()
    field = torch.tensor(NORMAL_FIELD)[None]
    _, _, energy = slab_solution(positions, field)
    (forces,) = torch.autograd.grad(-energy.sum(), positions)

    def energy_at(moved):
        return slab_solution(moved, field)[2].item()

    step = 1e-4
    for atom, axis in [(0, 2), (3, 0), (7, 2), (5, 1)]:
        plus, minus = positions.detach().clone(), positions.detach().clone()
        plus[atom, axis] += step
        minus[atom, axis] -= step
        numerical = -(energy_at(plus) - energy_at(minus)) / (2 * step)
        np.testing.assert_allclose(forces[atom, axis].item(), numerical, atol=1e-7)


def test_a_batch_of_a_slab_an_open_and_a_periodic_structure_equals_each_alone():
    chi_s, hardness_s, alpha_s, (positions_s, cell_s, _, _) = slab_problem(seed=7)
    chi_m, hardness_m, alpha_m, positions_m = random_problem(5, seed=8)
    n_s, n_m = len(chi_s), len(chi_m)
    cell = torch.cat([torch.zeros(1, 3, 3, dtype=torch.float64), cell_s, cell_s])
    pbc = torch.tensor([[False] * 3, [True, True, False], [True] * 3])
    batch = torch.cat([torch.zeros(n_m, dtype=torch.long), torch.ones(n_s, dtype=torch.long), torch.full((n_s,), 2)])
    fields = torch.tensor(np.stack([FIELD, NORMAL_FIELD, -FIELD]))
    positions = torch.cat([torch.tensor(positions_m), positions_s, positions_s])
    together = solve(
        np.concatenate([chi_m, chi_s, chi_s]), np.concatenate([hardness_m, hardness_s, hardness_s]),
        np.concatenate([alpha_m, alpha_s, alpha_s]), positions, cell, pbc, batch, [0.5, -1.0, 1.0], fields,
    )
    one = torch.zeros(n_s, dtype=torch.long)
    alone = [
        solve(chi_m, hardness_m, alpha_m, positions_m, torch.zeros(1, 3, 3, dtype=torch.float64),
              pbc[:1], torch.zeros(n_m, dtype=torch.long), [0.5], fields[:1]),
        solve(chi_s, hardness_s, alpha_s, positions_s, cell_s, pbc[1:2], one, [-1.0], fields[1:2]),
        solve(chi_s, hardness_s, alpha_s, positions_s, cell_s, pbc[2:], one, [1.0], fields[2:]),
    ]
    for index, joint in enumerate(together):
        torch.testing.assert_close(joint, torch.cat([a[index] for a in alone]), atol=1e-10, rtol=0)
    assert (together[1][n_m:n_m + n_s] - together[1][n_m + n_s:]).abs().max() > 1e-3  # slab ≠ bulk


def test_other_partly_periodic_structures_are_a_clear_error():
    chi, hardness, alpha, (positions, cell, _, batch) = slab_problem(seed=2)
    with pytest.raises(NotImplementedError, match="open, fully periodic and slab"):
        solve(chi, hardness, alpha, positions, cell, torch.tensor([[True, False, True]]), batch, [0.0], None)
