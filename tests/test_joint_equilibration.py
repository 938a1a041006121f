"""Joint charge-dipole equilibration (``charge_model="qeq_dipoles"``).

References: a dense NumPy KKT solve of the quadratic form built here from the
Gaussian-kernel formulas, the existing Qeq (α = 0) and self-consistent
polarisation (J → ∞, Richardson-extrapolated) results, finite differences of
the moment, the energy and the solution (gradcheck), and the symmetry of
∂M/∂E_ext.
"""

import math

import numpy as np
import pytest
import torch
from ase.build import molecule
from scipy.special import erf
from test_model_radial import make_model, rattled_salt  # the tiny radial test backbone

import latent_lr
from latent_lr import AtomsBatch, LongRangeConfig, coulomb_energy
from latent_lr.electrostatics.dipole_tensor import catastrophe_free_polarizability
from latent_lr.electrostatics.field import electric_field
from latent_lr.electrostatics.induction import self_consistent_induction
from latent_lr.electrostatics.joint_equilibration import equilibrate_charges_and_dipoles
from latent_lr.electrostatics.qeq import equilibrate_charges, qeq_energy

K_E = latent_lr.COULOMB_CONSTANT
SIGMA = 1.0
FIELD = np.array([0.03, -0.02, 0.05])  # V/Å


def random_problem(n, seed, alpha_fraction=0.8):
    """χ (eV/e), J (eV/e²), α (e·Å²/V, below the catastrophe bound) and positions (Å) of n atoms."""
    rng = np.random.default_rng(seed)
    bound = float(catastrophe_free_polarizability(torch.tensor(SIGMA)))
    return (
        rng.normal(size=n), rng.uniform(1.0, 3.0, n), rng.uniform(0.1, alpha_fraction, n) * bound,
        rng.uniform(0.0, 4.0, (n, 3)),
    )


def open_geometry(n):
    return (
        torch.zeros(1, 3, 3, dtype=torch.float64), torch.zeros(1, 3, dtype=torch.bool),
        torch.zeros(n, dtype=torch.long),
    )


def numpy_joint_kkt(chi, hardness, alpha, positions, total, field, sigma=SIGMA):
    """Charges, dipoles and energy (without −Σ q r·E) from one dense KKT solve, open boundaries.

    Pair kernel ψ(r) = erf(ar)/r, a = 1/(√2σ): charge–charge k_e ψ, charge q_j – dipole p_i
    k_e q_j p_i·∇ψ(r_i − r_j), dipole–dipole −k_e p_iᵀ∇∇ψ(r_i − r_j) p_j, self k_e 2a/√π q²/2.
    """
    n = len(chi)
    matrix = numpy_joint_matrix(hardness, alpha, positions, sigma)
    linear = np.concatenate([chi - positions @ field, -np.tile(field, n)])
    constraint = np.concatenate([np.ones(n), np.zeros(3 * n)])
    kkt = np.block([[matrix, constraint[:, None]], [constraint[None, :], np.zeros((1, 1))]])
    solution = np.linalg.solve(kkt, np.concatenate([-linear, [total]]))[: 4 * n]
    energy = 0.5 * solution @ matrix @ solution + linear @ solution
    charges = solution[:n]
    return charges, solution[n:].reshape(n, 3), energy + charges @ (positions @ field)


def numpy_joint_matrix(hardness, alpha, positions, sigma=SIGMA):
    """The (4n, 4n) Hessian of E(q, p) in the unknowns (q_1..q_n, p_1..p_n), open boundaries (see numpy_joint_kkt)."""
    n = len(hardness)
    a = 1.0 / (math.sqrt(2.0) * sigma)
    matrix = np.zeros((4 * n, 4 * n))
    for i in range(n):
        matrix[i, i] = hardness[i] + K_E * 2.0 * a / math.sqrt(math.pi)
        matrix[n + 3 * i : n + 3 * i + 3, n + 3 * i : n + 3 * i + 3] = np.eye(3) / alpha[i]
        for j in range(n):
            if i == j:
                continue
            vector = positions[i] - positions[j]
            r = np.linalg.norm(vector)
            unit = vector / r
            gauss = 2.0 * a / math.sqrt(math.pi) * math.exp(-((a * r) ** 2))
            psi = erf(a * r) / r
            d_psi = gauss / r - erf(a * r) / r**2
            d2_psi = 2.0 * erf(a * r) / r**3 - gauss * (2.0 / r**2 + 2.0 * a * a)
            hessian = d2_psi * np.outer(unit, unit) + d_psi / r * (np.eye(3) - np.outer(unit, unit))
            matrix[i, j] = K_E * psi
            coupling = K_E * d_psi * unit  # ∂(q_j p_i energy)/∂p_i per unit q_j
            matrix[j, n + 3 * i : n + 3 * i + 3] = coupling
            matrix[n + 3 * i : n + 3 * i + 3, j] = coupling
            matrix[n + 3 * i : n + 3 * i + 3, n + 3 * j : n + 3 * j + 3] = -K_E * hessian
    return matrix


def solve(chi, hardness, alpha, positions, cell, pbc, batch, total, field, rtol=1e-13, accuracy=1e-6):
    as_tensor = (lambda v: torch.as_tensor(v, dtype=torch.float64))
    return equilibrate_charges_and_dipoles(
        as_tensor(chi), as_tensor(hardness), as_tensor(alpha), as_tensor(positions), cell, pbc, batch,
        as_tensor(total), torch.tensor(SIGMA, dtype=torch.float64), None if field is None else as_tensor(field),
        rtol=rtol, accuracy=accuracy,
    )


def test_joint_solution_equals_a_dense_numpy_kkt_solve():
    chi, hardness, alpha, positions = random_problem(7, seed=0)
    reference = numpy_joint_kkt(chi, hardness, alpha, positions, 1.0, FIELD)
    charges, dipoles, energy = solve(chi, hardness, alpha, positions, *open_geometry(7), [1.0], FIELD[None])
    np.testing.assert_allclose(charges.numpy(), reference[0], atol=1e-10, rtol=0)
    np.testing.assert_allclose(dipoles.numpy(), reference[1], atol=1e-10, rtol=0)
    np.testing.assert_allclose(energy.item(), reference[2], atol=1e-10, rtol=0)
    assert np.abs(reference[1]).max() > 1e-2  # the dipoles matter


def salt_problem(seed=1):
    crystal = rattled_salt()
    n = len(crystal)
    chi, hardness, alpha, _ = random_problem(n, seed)
    geometry = (
        torch.tensor(crystal.positions), torch.tensor(crystal.cell.array)[None],
        torch.ones(1, 3, dtype=torch.bool), torch.zeros(n, dtype=torch.long),
    )
    return chi, hardness, alpha, geometry


@pytest.mark.parametrize("periodic", [False, True], ids=["open", "periodic"])
def test_zero_polarizability_is_plain_qeq(periodic):
    if periodic:
        chi, hardness, _, (positions, cell, pbc, batch) = salt_problem()
    else:
        chi, hardness, _, positions = random_problem(7, seed=2)
        positions = torch.tensor(positions)
        cell, pbc, batch = open_geometry(7)
    field = torch.tensor(FIELD)[None]
    total = torch.tensor([-1.0], dtype=torch.float64)
    charges, dipoles, energy = solve(chi, hardness, np.zeros(len(chi)), positions, cell, pbc, batch, total, field)
    chi, hardness = torch.tensor(chi), torch.tensor(hardness)
    shifted = chi - (positions * field).sum(1)
    sigma = torch.tensor(SIGMA, dtype=torch.float64)
    qeq = equilibrate_charges(shifted, hardness, positions, cell, pbc, batch, total, sigma, solver="dense")
    torch.testing.assert_close(charges, qeq, atol=1e-10, rtol=0)
    assert dipoles.abs().max() < 1e-12
    torch.testing.assert_close(energy, qeq_energy(qeq, chi, hardness, positions, cell, pbc, batch, sigma), atol=1e-10, rtol=0)


@pytest.mark.parametrize("periodic", [False, True], ids=["open", "periodic"])
def test_infinite_hardness_is_self_consistent_polarisation_of_the_frozen_charges(periodic):
    """χ = −J q⁰ and J → ∞ pin q at q⁰; the 1/J error is removed by Richardson extrapolation (J, 2J)."""
    if periodic:
        _, _, alpha, (positions, cell, pbc, batch) = salt_problem(seed=3)
    else:
        _, _, alpha, positions = random_problem(6, seed=3)
        positions = torch.tensor(positions)
        cell, pbc, batch = open_geometry(6)
    n = len(alpha)
    frozen = torch.tensor(np.random.default_rng(4).normal(scale=0.5, size=n))
    field = torch.tensor(FIELD)[None]
    sigma = torch.tensor(SIGMA, dtype=torch.float64)

    def joint(hardness):
        charges, dipoles, energy = solve(
            -hardness * frozen.numpy(), np.full(n, hardness), alpha, positions, cell, pbc, batch,
            frozen.sum()[None], field, rtol=1e-15,  # b ∝ J: the tolerance must resolve the dipole rows
        )
        return charges, dipoles, energy + 0.5 * hardness * (frozen**2).sum()  # remove the constant −½JΣq⁰²

    coarse, fine = joint(1e6), joint(2e6)
    charges, dipoles, energy = (2 * f - c for f, c in zip(fine, coarse))
    charge_field = electric_field(positions, frozen, cell=cell, pbc=pbc, batch=batch, smearing=sigma)
    reference_dipoles, induction = self_consistent_induction(
        torch.tensor(alpha), charge_field + field, positions, batch, 1, sigma, solver="dense", cell=cell,
        periodic=pbc.all(1),
    )
    electrostatic = coulomb_energy(positions, frozen, cell=cell, pbc=pbc, batch=batch, smearing=sigma)
    self_energy = 0.5 * K_E * math.sqrt(2.0 / math.pi) / SIGMA * (frozen**2).sum()
    torch.testing.assert_close(charges, frozen, atol=1e-10, rtol=0)
    torch.testing.assert_close(dipoles, reference_dipoles, atol=1e-9, rtol=0)
    torch.testing.assert_close(energy, electrostatic + self_energy + induction, atol=1e-8, rtol=0)
    assert reference_dipoles.abs().max() > 1e-2


@pytest.fixture(scope="module")
def joint_model():
    return make_model(seed=11, charge_model="qeq_dipoles", qeq_md_rtol=1e-12).eval()  # tight: exact-physics checks


def in_field(atoms, field):
    atoms = atoms.copy()
    atoms.info["external_field"] = np.asarray(field, dtype=float)
    return AtomsBatch.from_atoms(atoms)


@pytest.mark.parametrize("periodic", [False, True], ids=["molecule", "crystal"])
def test_polarisability_tensor_is_symmetric_psd_and_the_derivative_of_the_moment(periodic, joint_model):
    atoms = rattled_salt() if periodic else molecule("CH3CH2OH")
    atoms.info["charge"] = 1.0
    volume = abs(np.linalg.det(atoms.cell.array)) if periodic else 1.0
    out = joint_model(in_field(atoms, FIELD), compute_polarizability=True)
    tensor = out["polarizability"][0].numpy()
    np.testing.assert_allclose(tensor, tensor.T, atol=1e-9)
    assert np.linalg.eigvalsh(tensor).min() >= 0
    assert out["induced_dipoles"].abs().max() > 1e-3

    def moment(field):
        out = joint_model(in_field(atoms, field), compute_forces=False)
        return (out["polarization"][0].numpy() * volume) if periodic else out["dipole"][0].numpy()

    step = 1e-3  # M is linear in E_ext: central differences are exact up to the solver tolerance
    numerical = np.stack([(moment(FIELD + step * e) - moment(FIELD - step * e)) / (2 * step) for e in np.eye(3)], 1)
    np.testing.assert_allclose(tensor, numerical, atol=1e-7)


@pytest.mark.parametrize("periodic", [False, True], ids=["ion", "crystal"])
def test_forces_and_field_derivative_of_the_energy_match_finite_differences(periodic, joint_model):
    """F = −∂E/∂r and, at the stationary point, M = −∂E/∂E_ext."""
    atoms = rattled_salt() if periodic else molecule("H2O")
    atoms.info["charge"] = -1.0 if periodic else 1.0
    out = joint_model(in_field(atoms, FIELD))
    volume = abs(np.linalg.det(atoms.cell.array)) if periodic else 1.0
    moment = (out["polarization"][0] * volume if periodic else out["dipole"][0]).numpy()

    def energy(positions=None, field=FIELD):
        moved = atoms.copy()
        if positions is not None:
            moved.positions = positions
        return joint_model(in_field(moved, field), compute_forces=False)["energy"].item()

    step = 1e-4
    for atom, axis in [(0, 0), (1, 2), (len(atoms) - 1, 1)]:
        shifted = [atoms.positions.copy() for _ in range(2)]
        shifted[0][atom, axis] += step
        shifted[1][atom, axis] -= step
        numerical = -(energy(shifted[0]) - energy(shifted[1])) / (2 * step)
        np.testing.assert_allclose(out["forces"][atom, axis].item(), numerical, atol=1e-7)
    if not periodic:  # the periodic field energy uses the polarisation branch; the open one is exact
        for axis in range(3):
            e = np.eye(3)[axis] * 1e-3
            numerical = -(energy(field=FIELD + e) - energy(field=FIELD - e)) / 2e-3
            np.testing.assert_allclose(moment[axis], numerical, atol=1e-8)


def test_gradcheck_of_the_implicit_first_and_second_derivatives():
    chi, hardness, alpha, positions = random_problem(3, seed=5, alpha_fraction=0.5)
    cell, pbc, batch = open_geometry(3)
    inputs = tuple(torch.tensor(v, requires_grad=True) for v in (chi, hardness, alpha, positions, FIELD[None]))
    sigma = torch.tensor(SIGMA, dtype=torch.float64)

    def outputs(chi, hardness, alpha, positions, field):
        charges, dipoles, energy = equilibrate_charges_and_dipoles(
            chi, hardness, alpha, positions, cell, pbc, batch, torch.tensor([0.5], dtype=torch.float64), sigma,
            field, rtol=1e-14,
        )
        return charges, dipoles, energy

    assert torch.autograd.gradcheck(outputs, inputs, fast_mode=True)
    assert torch.autograd.gradgradcheck(outputs, inputs, fast_mode=True)


def test_joint_model_keeps_total_charge_flips_with_the_sign_gauge_and_round_trips(joint_model, tmp_path):
    ethanol = molecule("CH3CH2OH")
    data = AtomsBatch.from_atoms(ethanol)
    out = joint_model(data, compute_forces=False)
    assert abs(out["charges"].sum().item()) < 1e-10
    flipped = make_model(seed=11, charge_model="qeq_dipoles", qeq_md_rtol=1e-12).eval()
    flipped.long_range.charge_sign.fill_(-1.0)
    mirrored = flipped(data, compute_forces=False)
    torch.testing.assert_close(mirrored["charges"], -out["charges"], atol=1e-10, rtol=0)
    torch.testing.assert_close(mirrored["induced_dipoles"], -out["induced_dipoles"], atol=1e-10, rtol=0)
    torch.testing.assert_close(mirrored["energy"], out["energy"], atol=1e-10, rtol=0)
    path = tmp_path / "joint.pt"
    latent_lr.save(joint_model, path)
    torch.testing.assert_close(latent_lr.load(path)(data, compute_forces=False)["energy"], out["energy"])


def test_the_joint_model_runs_on_slabs_and_a_second_polarisability_model_is_a_clear_error(joint_model):
    slab = rattled_salt()
    slab.pbc = (True, True, False)
    slab.info["charge"] = 1.0
    out = joint_model(in_field(slab, FIELD))
    assert out["charges"].sum().item() == pytest.approx(1.0, abs=1e-9)
    assert torch.isfinite(out["forces"]).all() and out["induced_dipoles"][:, 2].abs().max() > 1e-3
    wire = rattled_salt()
    wire.pbc = (True, False, False)
    with pytest.raises(NotImplementedError, match="open, fully periodic and slab"):
        joint_model(AtomsBatch.from_atoms(wire), compute_forces=False)
    with pytest.raises(ValueError, match="qeq_dipoles.*polarizability='none'"):
        LongRangeConfig(charge_model="qeq_dipoles", polarizability="self_consistent")
    chi, hardness, alpha, positions = random_problem(3, seed=6)
    with pytest.raises(ValueError, match="polarisabilities must lie"):
        solve(chi, hardness, alpha * 10, positions, *open_geometry(3), [0.0], None)


def test_a_mixed_open_and_periodic_batch_equals_its_structures_solved_alone():
    chi_s, hardness_s, alpha_s, (positions_s, cell_s, _, _) = salt_problem(seed=7)
    chi_m, hardness_m, alpha_m, positions_m = random_problem(5, seed=8)
    n_s, n_m = len(chi_s), len(chi_m)
    cell = torch.cat([torch.zeros(1, 3, 3, dtype=torch.float64), cell_s])
    pbc = torch.tensor([[False] * 3, [True] * 3])
    batch = torch.cat([torch.zeros(n_m, dtype=torch.long), torch.ones(n_s, dtype=torch.long)])
    fields = torch.tensor(np.stack([FIELD, -2 * FIELD]))
    together = solve(
        np.concatenate([chi_m, chi_s]), np.concatenate([hardness_m, hardness_s]), np.concatenate([alpha_m, alpha_s]),
        torch.cat([torch.tensor(positions_m), positions_s]), cell, pbc, batch, [0.5, -1.0], fields,
    )
    alone_m = solve(chi_m, hardness_m, alpha_m, positions_m, *open_geometry(n_m), [0.5], fields[:1])
    alone_s = solve(
        chi_s, hardness_s, alpha_s, positions_s, cell_s, pbc[1:], torch.zeros(n_s, dtype=torch.long), [-1.0], fields[1:]
    )
    for joint, first, second in zip(together, alone_m, alone_s):
        torch.testing.assert_close(joint, torch.cat([first, second]), atol=1e-10, rtol=0)
