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
from scipy.special import erf
from test_joint_equilibration import FIELD, K_E, SIGMA, random_problem, solve
from test_model_radial import rattled_salt
from test_slab import A_VEC, B_VEC, ewald_2d_matrix, random_slab

from latent_lr import coulomb_energy
from latent_lr.electrostatics.dipole_ewald import dipole_operator
from latent_lr.electrostatics.dipole_tensor import catastrophe_free_polarizability
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


def reference_electrostatic_hessian(positions, step):
    """(4N, 4N) Hessian of E_elec(q, p) from the independent 2D Ewald sum (test_slab.ewald_2d_matrix).

    Each Gaussian dipole p_i is three pairs of Gaussian charges ±p_ia/step at r_i ± (step/2) e_a
    (error O(step²)); the pairs of one site in the home cell do not interact (E_elec has no i = j
    term), its images do.  Columns: the N charges, then p_i (x, y, z) atom by atom.
    """
    n = len(positions)
    offsets = np.concatenate([np.zeros((1, 3)), 0.5 * step * np.eye(3), -0.5 * step * np.eye(3)])  # 7 sources/site
    sources = (positions[:, None] + offsets[None]).reshape(-1, 3)
    mixing = np.zeros((7 * n, 4 * n))
    for i in range(n):
        mixing[7 * i, i] = 1.0
        for a in range(3):
            mixing[7 * i + 1 + a, n + 3 * i + a] = 1.0 / step
            mixing[7 * i + 4 + a, n + 3 * i + a] = -1.0 / step
    pair = ewald_2d_matrix(sources, 0.5, SIGMA)
    for i in range(n):
        site = slice(7 * i, 7 * i + 7)
        r = np.linalg.norm(sources[site][None] - sources[site][:, None], axis=-1) + np.eye(7)
        pair[site, site] -= K_E * erf(r / (math.sqrt(2.0) * SIGMA)) / r * (1.0 - np.eye(7))
    hessian = mixing.T @ pair @ mixing
    hessian[:n, :n] += K_E * math.sqrt(2.0 / math.pi) / SIGMA * np.eye(n)  # Gaussian self-energies of the charges
    return hessian


@pytest.mark.parametrize("total", [0.0, -1.0])
def test_slab_solution_is_the_minimiser_with_the_2d_ewald_energy(total):
    """Against the Heyes–Barber–Clarke 2D sum (in-plane images only, no vacuum, no correction)."""
    positions, _ = random_slab(n_atoms=6, seed=4)
    n = len(positions)
    chi, hardness, alpha, _ = random_problem(n, seed=9)
    field = np.array([0.04, -0.03, 0.05])  # V/Å, in-plane and normal parts
    step = 0.02
    hessian = (4 * reference_electrostatic_hessian(positions, step / 2) - reference_electrostatic_hessian(positions, step)) / 3
    hessian += np.diag(np.concatenate([hardness, np.repeat(1.0 / alpha, 3)]))
    rhs = np.concatenate([-chi + positions @ field, np.tile(field, n)])
    kkt = np.block([[hessian, np.r_[np.ones(n), np.zeros(3 * n)][:, None]], [np.r_[np.ones(n), np.zeros(3 * n)][None], np.zeros((1, 1))]])
    y = np.linalg.solve(kkt, np.r_[rhs, total])[:-1]
    energy = 0.5 * y @ hessian @ y - rhs @ y + y[:n] @ (positions @ field)

    cell = torch.tensor(np.array([A_VEC, B_VEC, [0.0, 0.0, 6.0]]))[None]
    charges, dipoles, joint_energy = solve(
        chi, hardness, alpha, positions, cell, torch.tensor([[True, True, False]]), torch.zeros(n, dtype=torch.long),
        [total], field[None], rtol=1e-14, accuracy=1e-8,
    )
    print(f"\n|Δq| {np.abs(charges.numpy() - y[:n]).max():.2e}  |Δp| {np.abs(dipoles.numpy().ravel() - y[n:]).max():.2e}"
          f"  ΔE {abs(joint_energy.item() - energy):.2e} eV  (max |p| {np.abs(y[n:]).max():.3f})")
    np.testing.assert_allclose(charges.numpy(), y[:n], atol=2e-9, rtol=0)  # 9e-11 measured
    np.testing.assert_allclose(dipoles.numpy().ravel(), y[n:], atol=2e-9, rtol=0)  # 2e-10 measured
    assert joint_energy.item() == pytest.approx(energy, abs=2e-9)  # 3e-10 eV measured
    bulk = solve(chi, hardness, alpha, positions, cell, torch.tensor([[True, True, True]]),
                 torch.zeros(n, dtype=torch.long), [total], field[None], accuracy=1e-8)
    assert np.abs(bulk[1].numpy().ravel() - y[n:]).max() > 1e-3  # the same cell as a tin-foil 3D crystal is far off


def test_conductor_like_polarisable_slab_screens_a_normal_field():
    """J → 0 with small α: E_inside → 0 and the lower half carries −ε₀E per area (Gauss; point dipoles add no charge)."""
    applied, spacing, n = 0.1, 3.0, 12  # V/Å along +z; sc column, one site per a×a cell
    positions = torch.zeros(n, 3, dtype=torch.float64)
    positions[:, 2] = spacing * torch.arange(n, dtype=torch.float64)
    cell = torch.diag(torch.tensor([spacing, spacing, float(positions[-1, 2])], dtype=torch.float64))[None]
    pbc, batch = torch.tensor([[True, True, False]]), torch.zeros(n, dtype=torch.long)
    alpha = np.full(n, 0.2 * float(catastrophe_free_polarizability(torch.tensor(SIGMA))))
    field = torch.tensor([[0.0, 0.0, applied]], dtype=torch.float64)
    charges, dipoles, _ = solve(np.zeros(n), np.full(n, 1e-3), alpha, positions, cell, pbc, batch, [0.0], field,
                                accuracy=1e-8)
    sigma = torch.tensor(SIGMA, dtype=torch.float64)
    local = (applied + electric_field(positions, charges, cell=cell, pbc=pbc, batch=batch, smearing=sigma,
                                      accuracy=1e-8)[:, 2]
             + dipole_operator(positions, cell, torch.tensor([False]), batch, sigma, 1e-8,
                               slab=torch.tensor([True])).apply(dipoles)[:, 2]).detach()
    epsilon_0 = 1.0 / (4.0 * math.pi * K_E)
    lower = float(charges[: n // 2].sum()) / spacing**2
    print(f"\nσ_lower/(−ε₀E) = {-lower / (epsilon_0 * applied):.6f}; E_z/E by layer: {np.round((local / applied).numpy(), 5)}")
    torch.testing.assert_close(dipoles[:, 2] / torch.tensor(alpha), local, atol=1e-8, rtol=0)  # p = α E_local
    assert lower == pytest.approx(-epsilon_0 * applied, rel=2e-5)  # 1e-6 measured (94x before the pair-cell fix)
    assert float(local[4:8].abs().max()) < 2e-4 * applied  # 2e-5 E measured
    assert float(dipoles[0, 2]) > 0.1 * alpha[0] * applied  # the surface layer is polarised
