"""Qeq during MD (issue 15, item 5): explicit Coulomb operator, deferred derivatives, extrapolated warm starts.

References the code under test did not compute: the engine's own energy (K must
reproduce E = ½ qᵀKq and its autograd gradient), finite differences of the
energy (forces, charge and total-charge derivatives), the eager implicit path
of training mode (same values and second derivatives), exact polynomials
(extrapolation weights), and energy conservation of velocity Verlet.
"""

import math

import numpy as np
import pytest
import torch

from latent_lr.data import AtomsBatch
from latent_lr.demo import water_like_box
from latent_lr.electrostatics import EngineState
from latent_lr.electrostatics.coulomb import coulomb_energy
from latent_lr.electrostatics.coulomb_operator import coulomb_operator
from latent_lr.electrostatics.warm_start import SolutionMemory, extrapolation_weights, structure_keys
from latent_lr.long_range import LongRangeModule

FEATURES = 8


def water(n_molecules: int, periodic: bool = True, seed: int = 0) -> AtomsBatch:
    from ase import Atoms

    positions, _, cell = water_like_box(n_molecules, seed)
    atoms = Atoms(["O", "H", "H"] * n_molecules, positions=positions.numpy(), cell=cell.numpy(), pbc=periodic)
    return AtomsBatch.from_atoms([atoms]).to(dtype=torch.float64)


def engine_gradient(data: AtomsBatch, charges: torch.Tensor, state: EngineState) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = charges.clone().requires_grad_()
    energy = coulomb_energy(
        data.positions, leaf, cell=data.cell, pbc=data.pbc, batch=data.batch, smearing=1.0, accuracy=1e-4, state=state
    )
    (gradient,) = torch.autograd.grad(energy.sum(), leaf)
    return energy.detach(), gradient


@pytest.mark.parametrize("periodic", [True, False], ids=["pme", "open"])
def test_coulomb_operator_is_the_engines_charge_hessian(periodic):
    data = water(100 if periodic else 30, periodic)  # 300 atoms: PME
    state = EngineState()
    gen = torch.Generator().manual_seed(0)
    u, v = (torch.randn(len(data.numbers), dtype=torch.float64, generator=gen) for _ in range(2))
    energy, gradient = engine_gradient(data, v, state)
    operator = coulomb_operator(data.positions, data.cell, data.pbc, data.batch, 1.0, 1e-4, state)
    assert operator is not None
    kv = operator(v)
    torch.testing.assert_close(kv, gradient, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(0.5 * (v * kv).sum(), energy.sum(), rtol=1e-11, atol=1e-11)  # E = ½ vᵀKv
    torch.testing.assert_close((u * kv).sum(), (v * operator(u)).sum(), rtol=1e-11, atol=1e-11)  # symmetric


def test_coulomb_operator_in_a_mixed_batch_and_where_it_does_not_apply():
    from ase import Atoms

    box = water(100)
    positions, _, _ = water_like_box(10, 3)
    cluster = Atoms(["O", "H", "H"] * 10, positions=positions.numpy())
    periodic_atoms = Atoms(box.numbers.numpy(), positions=box.positions.numpy(), cell=box.cell[0].numpy(), pbc=True)
    data = AtomsBatch.from_atoms([cluster, periodic_atoms]).to(dtype=torch.float64)
    state = EngineState()
    v = torch.randn(len(data.numbers), dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    _, gradient = engine_gradient(data, v, state)
    operator = coulomb_operator(data.positions, data.cell, data.pbc, data.batch, 1.0, 1e-4, state)
    assert operator is not None
    torch.testing.assert_close(operator(v), gradient, rtol=1e-11, atol=1e-11)
    small = water(8)  # 24 atoms: Ewald, not covered
    assert coulomb_operator(small.positions, small.cell, small.pbc, small.batch, 1.0, 1e-4) is None
    slab_pbc = torch.tensor([[True, True, False]])
    assert coulomb_operator(box.positions, box.cell, slab_pbc, box.batch, 1.0, 1e-4) is None


def qeq_module(**options) -> LongRangeModule:
    torch.manual_seed(0)
    return LongRangeModule(FEATURES, accuracy=1e-6, charge_model="qeq", qeq_solver="cg", **options).double()


def features_for(data: AtomsBatch) -> torch.Tensor:
    return torch.randn(len(data.numbers), FEATURES, dtype=torch.float64, generator=torch.Generator().manual_seed(2))


def energy_forces_and_charge_derivative(module, data, features, weights, field=None):
    positions = data.positions.clone().requires_grad_()
    geometry = data.with_geometry(positions, data.cell)
    geometry.external_field = field
    out = module(features, geometry, engine_state=EngineState())
    (energy_gradient,) = torch.autograd.grad(out["energy"].sum(), positions, retain_graph=True)
    (charge_gradient,) = torch.autograd.grad((weights * out["charges"]).sum(), positions)
    return out["energy"].detach(), -energy_gradient, charge_gradient


@pytest.mark.parametrize("case", ["periodic", "open", "field"])
def test_eval_mode_deferred_derivatives_equal_training_modes_and_finite_differences(case):
    data = water(100 if case == "periodic" else 20, periodic=case == "periodic")
    features = features_for(data)
    weights = torch.randn(len(data.numbers), dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    field = torch.tensor([[0.0, 0.05, -0.02]], dtype=torch.float64) if case == "field" else None
    module = qeq_module(qeq_md_rtol=1e-12)
    eager = energy_forces_and_charge_derivative(module.train(), data, features, weights, field)
    deferred = energy_forces_and_charge_derivative(module.eval(), data, features, weights, field)
    for a, b in zip(eager, deferred):
        torch.testing.assert_close(b, a, rtol=1e-8, atol=1e-9)
    # Finite differences of the eval-mode energy and charges along one atom's x coordinate.
    h, atom = 1e-4, 4

    def at(shift):
        moved = data.positions.clone()
        moved[atom, 0] += shift
        geometry = data.with_geometry(moved, data.cell)
        geometry.external_field = field
        with torch.no_grad():
            out = module(features, geometry, engine_state=EngineState())
        return float(out["energy"].sum()), float((weights * out["charges"]).sum())

    (e_plus, c_plus), (e_minus, c_minus) = at(h), at(-h)
    assert abs(-(e_plus - e_minus) / (2 * h) - float(deferred[1][atom, 0])) < 1e-6
    assert abs((c_plus - c_minus) / (2 * h) - float(deferred[2][atom, 0])) < 1e-6


def test_eval_mode_second_derivatives_and_total_charge_gradient_are_exact():
    data = water(10, periodic=False)
    features = features_for(data)
    module = qeq_module(qeq_md_rtol=1e-12)

    def force_loss_gradients(train: bool):
        module.train(train)
        positions = data.positions.clone().requires_grad_()
        out = module(features, data.with_geometry(positions, data.cell), engine_state=EngineState())
        (gradient,) = torch.autograd.grad(out["energy"].sum(), positions, create_graph=True)
        loss = (gradient**2).sum() + out["energy"].sum()
        return torch.autograd.grad(loss, [p for p in module.parameters()], allow_unused=True)

    for a, b in zip(force_loss_gradients(True), force_loss_gradients(False)):
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-7, atol=1e-10)

    module.eval()

    def energy_at(total: torch.Tensor) -> torch.Tensor:
        geometry = data.with_geometry(data.positions, data.cell)
        geometry.total_charge = total
        return module(features, geometry, engine_state=EngineState())["energy"].sum()

    total = torch.tensor([0.3], dtype=torch.float64, requires_grad=True)
    (derivative,) = torch.autograd.grad(energy_at(total), total)  # −μ, Hellmann–Feynman
    h = 1e-4
    with torch.no_grad():
        numeric = (energy_at(total + h) - energy_at(total - h)) / (2 * h)
    assert abs(float(derivative) - float(numeric)) < 1e-7


def test_extrapolation_weights_reproduce_polynomials_of_their_degree():
    gen = np.random.default_rng(0)
    for degree in range(4):
        weights = extrapolation_weights(degree)
        coefficients = gen.normal(size=degree + 1)
        values = [np.polyval(coefficients, -float(j)) for j in range(degree + 1)]  # x(0), x(−1), ...
        assert abs(sum(w * x for w, x in zip(weights, values)) - np.polyval(coefficients, 1.0)) < 1e-10
    with pytest.raises(ValueError, match="extrapolation degree"):
        extrapolation_weights(4)


def test_solution_memory_extrapolates_one_entry_per_step():
    numbers, batch = torch.tensor([8, 1, 1]), torch.zeros(3, dtype=torch.long)
    keys = structure_keys(numbers, batch, 1)
    memory, like = SolutionMemory(), torch.zeros(3, dtype=torch.float64)
    positions = torch.zeros(3, 3, dtype=torch.float64)
    for step in range(3):  # x(t) = 1 + t + t² per entry
        memory.remember("qeq", keys, torch.full((3,), 1.0 + step + step**2, dtype=torch.float64), positions + step)
    torch.testing.assert_close(memory.guess("qeq", keys, like, extrapolation=2), torch.full((3,), 13.0, dtype=torch.float64))
    torch.testing.assert_close(memory.guess("qeq", keys, like, extrapolation=0), torch.full((3,), 7.0, dtype=torch.float64))
    # a second solve at the same positions replaces that step instead of adding one
    memory.remember("qeq", keys, torch.full((3,), 7.5, dtype=torch.float64), positions + 2)
    torch.testing.assert_close(memory.guess("qeq", keys, like, extrapolation=1), torch.full((3,), 2 * 7.5 - 3.0, dtype=torch.float64))


def test_md_with_extrapolated_warm_starts_and_the_eval_tolerance_conserves_energy():
    """Velocity Verlet on Qeq + harmonic tethers (open cluster, explicit operator): the eval-mode tolerance
    (accuracy / 10) and extrapolated warm starts keep the total energy as well as a tight solve does."""
    data = water(12, periodic=False, seed=4)
    features = features_for(data)
    masses = torch.tensor([16.0, 1.0, 1.0], dtype=torch.float64).repeat(12)[:, None] * 10.0
    tether = 2.0  # eV/Å²
    steps, dt = 60, 1.0  # fs
    acceleration_unit = 9.6485e-3  # eV/(Å amu) in Å/fs²

    def run(**options):
        module = qeq_module(**options).eval()
        state = EngineState()

        def forces(x):
            leaf = x.clone().requires_grad_()
            out = module(features, data.with_geometry(leaf, data.cell), engine_state=state)
            energy = out["energy"].sum() + 0.5 * tether * ((leaf - data.positions) ** 2).sum()
            (gradient,) = torch.autograd.grad(energy, leaf)
            return float(energy.detach()), -gradient, state.solutions.iterations["qeq"][0]

        x = data.positions.clone()
        v = 0.005 * torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
        potential, force, _ = forces(x)
        totals, iterations = [], []
        for _ in range(steps):
            v = v + 0.5 * dt * acceleration_unit * force / masses
            x = x + dt * v
            potential, force, count = forces(x)
            v = v + 0.5 * dt * acceleration_unit * force / masses
            totals.append(potential + 0.5 * float((masses * v**2).sum()) / acceleration_unit)
            iterations.append(count)
        totals_array = np.array(totals)
        kinetic_scale = 0.5 * float((masses * v**2).sum()) / acceleration_unit
        return totals_array - totals_array[0], iterations, kinetic_scale

    loose, loose_iterations, _ = run(solver_extrapolation=2)
    tight, tight_iterations, _ = run(qeq_md_rtol=1e-12, solver_extrapolation=0)
    sloppy, _, _ = run(qeq_md_rtol=1e-2, solver_extrapolation=2)
    verlet_error = np.abs(tight).max()  # the integrator's own energy fluctuation

    assert np.abs(loose - tight).max() < 1e-3 * verlet_error
    assert np.abs(sloppy - tight).max() > 1e-3 * verlet_error  # the bound can fail: a 1e-2 tolerance breaks it
    assert np.mean(loose_iterations[5:]) < 0.6 * np.mean(tight_iterations[5:]), (loose_iterations, tight_iterations)


def block_problem(n_molecules: int, periodic: bool):
    data = water(n_molecules, periodic, seed=1)
    gen = torch.Generator().manual_seed(4)
    n = len(data.numbers)
    chi = torch.randn(n, dtype=torch.float64, generator=gen)
    hardness = 1.0 + torch.rand(n, dtype=torch.float64, generator=gen)
    return data, chi, hardness


@pytest.mark.parametrize("periodic", [True, False], ids=["periodic", "open"])
def test_near_field_block_preconditioner_is_symmetric_positive_definite(periodic):
    from latent_lr.electrostatics.block_preconditioner import near_field_preconditioner
    from latent_lr.electrostatics.kspace_preconditioner import kspace_preconditioner
    from latent_lr.electrostatics.qeq import gaussian_self_hardness

    data, _, hardness = block_problem(12, periodic)
    sigma = torch.tensor(1.0, dtype=torch.float64)
    diagonal = hardness + gaussian_self_hardness(sigma)
    inner = kspace_preconditioner(data.positions, data.cell, data.pbc, data.batch, diagonal, sigma) if periodic else None
    apply = near_field_preconditioner(data.positions, data.cell, data.pbc, data.batch, diagonal, 1.0, inner)
    assert apply is not None
    matrix = torch.stack([apply(e) for e in torch.eye(len(diagonal), dtype=torch.float64)], 1)
    torch.testing.assert_close(matrix, matrix.T, rtol=0, atol=1e-14)
    assert float(torch.linalg.eigvalsh(matrix).min()) > 0
    if not periodic:  # block Jacobi: the inverse of atom 0's block, its bonded cluster's exact Gaussian-charge matrix
        from latent_lr.units import COULOMB_CONSTANT

        x = data.positions.numpy()
        distance = np.linalg.norm(x[:, None] - x[None], axis=-1)
        members, frontier = {0}, [0]
        while frontier:  # atoms joined to atom 0 by bonds shorter than 1.25 Å
            atom = frontier.pop()
            for other in np.flatnonzero(distance[atom] < 1.25):
                if int(other) not in members:
                    members.add(int(other))
                    frontier.append(int(other))
        index = sorted(members)
        assert len(index) >= 3
        r = distance[np.ix_(index, index)] + np.eye(len(index))
        block = COULOMB_CONSTANT * np.vectorize(math.erf)(r / math.sqrt(2.0)) / r * (1 - np.eye(len(index)))
        block = block + np.diag(diagonal.numpy()[index])
        np.testing.assert_allclose(matrix.numpy()[np.ix_(index, index)], np.linalg.inv(block), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("periodic", [True, False], ids=["periodic", "open"])
def test_block_preconditioned_qeq_equals_a_numpy_kkt_solve_in_fewer_iterations(periodic):
    from latent_lr.electrostatics.linear_solve import SolveStatistics
    from latent_lr.electrostatics.qeq import coulomb_matrices, equilibrate_charges

    data, chi, hardness = block_problem(16, periodic)
    sigma = torch.tensor(1.0, dtype=torch.float64)
    total = torch.tensor([0.5], dtype=torch.float64)
    matrix = coulomb_matrices(data.positions, data.cell, data.pbc, data.batch, sigma, accuracy=1e-10)[0].numpy()
    n = len(chi)
    kkt = np.block([[matrix + np.diag(hardness.numpy()), np.ones((n, 1))], [np.ones((1, n)), np.zeros((1, 1))]])
    reference = np.linalg.solve(kkt, np.concatenate([-chi.numpy(), [0.5]]))[:n]
    charges = equilibrate_charges(
        chi, hardness, data.positions, data.cell, data.pbc, data.batch, total, sigma, accuracy=1e-10, solver="cg",
        preconditioner="blocks",
    )
    np.testing.assert_allclose(charges.numpy(), reference, rtol=0, atol=1e-8)
    data, chi, hardness = block_problem(64, periodic)  # 192 atoms: enough molecules for the blocks to matter
    iterations = {}
    for preconditioner in ("kspace", "blocks"):
        record = SolveStatistics()
        equilibrate_charges(
            chi, hardness, data.positions, data.cell, data.pbc, data.batch, data.total_charge, sigma, accuracy=1e-6,
            solver="cg", statistics=record, preconditioner=preconditioner,
        )
        iterations[preconditioner] = record.iterations[0]
    assert iterations["blocks"] < 0.85 * iterations["kspace"], iterations


def test_block_preconditioned_iterations_do_not_grow_with_the_box():
    from latent_lr.electrostatics.linear_solve import SolveStatistics
    from latent_lr.electrostatics.qeq import equilibrate_charges

    counts = []
    for n_molecules in (16, 64, 200):  # 48–600 atoms, L 7.8–18.1 Å (Ewald and PME)
        data, chi, hardness = block_problem(n_molecules, True)
        record = SolveStatistics()
        equilibrate_charges(
            chi, hardness, data.positions, data.cell, data.pbc, data.batch, data.total_charge,
            torch.tensor(1.0, dtype=torch.float64), accuracy=1e-4, solver="cg", statistics=record,
        )
        counts.append(record.iterations[0])
    assert max(counts) <= counts[0] + 6, counts  # Jacobi: 35 → 82 over these boxes


def test_md_options_are_checked_and_reach_the_cli():
    import argparse

    from latent_lr.cli import _add_long_range_arguments, _long_range_flags
    from latent_lr.config import LongRangeConfig

    with pytest.raises(ValueError, match="solver_extrapolation"):
        LongRangeConfig(solver_extrapolation=4)
    with pytest.raises(ValueError, match="qeq_md_rtol"):
        LongRangeConfig(qeq_md_rtol=0.0)
    parser = argparse.ArgumentParser()
    _add_long_range_arguments(parser)
    flags = _long_range_flags(parser.parse_args(["--qeq-md-rtol", "1e-5", "--solver-extrapolation", "1"]))
    config = LongRangeConfig.from_dict(flags)
    assert config.qeq_md_rtol == 1e-5 and config.solver_extrapolation == 1


def test_single_precision_products_of_loose_solves_keep_the_float64_solution():
    """MD-tolerance solves apply the PME mesh part in float32; the operator stays within ~1e-6 of the float64
    engine's charge Hessian, and a Qeq solve at rtol 1e-5 matches a numpy KKT solve to that tolerance."""
    from latent_lr.electrostatics.kspace_preconditioner import kspace_preconditioner
    from latent_lr.electrostatics.linear_solve import SolveStatistics
    from latent_lr.electrostatics.qeq import SINGLE_PRECISION_RTOL, coulomb_matrices, equilibrate_charges

    data, chi, hardness = block_problem(100, True)  # 300 atoms: PME
    state = EngineState()
    v = torch.randn(len(chi), dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    _, gradient = engine_gradient(data, v, state)
    single = coulomb_operator(data.positions, data.cell, data.pbc, data.batch, 1.0, 1e-4, state, torch.float32)
    assert single is not None
    kv = single(v)
    assert kv.dtype == torch.float64
    error = float((kv - gradient).norm() / gradient.norm())
    assert 1e-9 < error < 1e-5, error  # float32 round-off is there, and small
    sigma = torch.tensor(1.0, dtype=torch.float64)
    inverse = kspace_preconditioner(data.positions, data.cell, data.pbc, data.batch, hardness + 11.5, sigma)
    inverse32 = kspace_preconditioner(
        data.positions, data.cell, data.pbc, data.batch, hardness + 11.5, sigma, precision=torch.float32
    )
    torch.testing.assert_close(inverse32(v), inverse(v), rtol=1e-5, atol=1e-7)

    matrix = coulomb_matrices(data.positions, data.cell, data.pbc, data.batch, sigma, accuracy=1e-4)[0].numpy()
    n = len(chi)
    kkt = np.block([[matrix + np.diag(hardness.numpy()), np.ones((n, 1))], [np.ones((1, n)), np.zeros((1, 1))]])
    reference = np.linalg.solve(kkt, np.concatenate([-chi.numpy(), [0.0]]))[:n]
    record = SolveStatistics()
    rtol = 10 * SINGLE_PRECISION_RTOL
    charges = equilibrate_charges(
        chi, hardness, data.positions, data.cell, data.pbc, data.batch, data.total_charge, sigma, accuracy=1e-4,
        solver="cg", rtol=rtol, statistics=record,
    )
    assert record.iterations[0] > 1
    assert np.linalg.norm(charges.numpy() - reference) < 50 * rtol * np.linalg.norm(reference)
