"""Fast iterative solves (issue 15, item 5): warm starts and the k-space preconditioner.

A warm start or a preconditioner may change how many CG iterations a solve
takes, never its result: results and implicit gradients must equal the cold,
Jacobi-preconditioned or dense solve's to the CG tolerance (and a numpy KKT
solve), the warm start must save iterations when the guess is the previous MD
step's solution, and the k-space preconditioner must be SPD and stop the
iteration count from growing like the box.
"""

from dataclasses import replace as dataclass_replace

import numpy as np
import pytest
import torch

from latent_lr.data import AtomsBatch
from latent_lr.electrostatics import EngineState
from latent_lr.electrostatics.induction import self_consistent_cap, self_consistent_induction
from latent_lr.electrostatics.linear_solve import SolveStatistics, solve_spd
from latent_lr.electrostatics.qeq import equilibrate_charges
from latent_lr.electrostatics.warm_start import SolutionMemory, structure_keys
from latent_lr.long_range import LongRangeModule

SIGMA = 1.0


def random_box(n_atoms: int, length: float, seed: int, min_distance: float = 1.6) -> torch.Tensor:
    """(n, 3) positions in a cubic box of side ``length`` Å with no two atoms closer than ``min_distance``."""
    rng = np.random.default_rng(seed)
    points: list[np.ndarray] = []
    while len(points) < n_atoms:
        trial = rng.uniform(0.0, length, 3)
        if all(np.linalg.norm((trial - p + length / 2) % length - length / 2) > min_distance for p in points):
            points.append(trial)
    return torch.tensor(np.array(points), dtype=torch.float64)


def test_solve_spd_warm_start_equals_cold_start_with_fewer_iterations_and_equal_gradients():
    n = 40
    gen = torch.Generator().manual_seed(3)
    factor = torch.randn(n, n, dtype=torch.float64, generator=gen)
    scale = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    rhs = torch.randn(n, dtype=torch.float64, generator=gen, requires_grad=True)
    total = torch.tensor([0.7], dtype=torch.float64, requires_grad=True)
    weights = torch.randn(n, dtype=torch.float64, generator=gen)

    def matvec(v, s):
        return s * (factor @ (factor.T @ v)) + 3.0 * v

    def solve(initial):
        statistics = SolveStatistics()
        x = solve_spd(matvec, rhs, (scale,), total=total, initial=initial, statistics=statistics)
        grads = torch.autograd.grad((weights * x).sum(), (scale, rhs, total))
        return x.detach(), grads, statistics.iterations

    cold, cold_grads, cold_iterations = solve(None)
    # an infeasible guess near the solution (sum off by 0.3): moved onto the constraint set first
    guess = cold + 1e-4 * torch.randn(n, dtype=torch.float64, generator=gen) + 0.3 / n
    warm, warm_grads, warm_iterations = solve(guess)
    matrix = 0.2 * factor @ factor.T + 3.0 * torch.eye(n, dtype=torch.float64)
    kkt = np.block([[matrix.numpy(), np.ones((n, 1))], [np.ones((1, n)), np.zeros((1, 1))]])
    reference = np.linalg.solve(kkt, np.concatenate([rhs.detach().numpy(), [0.7]]))[:n]
    np.testing.assert_allclose(cold.numpy(), reference, rtol=0, atol=1e-8)
    np.testing.assert_allclose(warm.numpy(), reference, rtol=0, atol=1e-8)
    assert abs(float(warm.sum()) - 0.7) < 1e-12
    for g_warm, g_cold in zip(warm_grads, cold_grads):
        torch.testing.assert_close(g_warm, g_cold, rtol=1e-7, atol=1e-9)
    assert warm_iterations[0] < cold_iterations[0] - 5, (warm_iterations, cold_iterations)
    # the adjoint solve of the backward pass does not use the guess: same count
    assert warm_iterations[1] == cold_iterations[1]


def test_bad_initial_guess_is_a_clear_error():
    with pytest.raises(ValueError, match="initial has shape"):
        solve_spd(lambda v: 2 * v, torch.ones(3, dtype=torch.float64), initial=torch.zeros(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="non-finite"):
        solve_spd(lambda v: 2 * v, torch.ones(3, dtype=torch.float64), initial=torch.full((3,), float("nan")))


def periodic_qeq_problem(n_atoms=48, length=9.0, seed=0):
    positions = random_box(n_atoms, length, seed)
    gen = torch.Generator().manual_seed(seed)
    chi = torch.randn(n_atoms, dtype=torch.float64, generator=gen)
    hardness = 1.0 + torch.rand(n_atoms, dtype=torch.float64, generator=gen)
    cell = length * torch.eye(3, dtype=torch.float64)[None]
    return positions, chi, hardness, cell


def qeq_solve(positions, chi, hardness, cell, initial):
    positions = positions.clone().requires_grad_()
    chi = chi.clone().requires_grad_()
    statistics = SolveStatistics()
    charges = equilibrate_charges(
        chi, hardness, positions, cell, torch.ones(1, 3, dtype=torch.bool), torch.zeros(len(chi), dtype=torch.long),
        torch.zeros(1, dtype=torch.float64), torch.tensor(SIGMA, dtype=torch.float64), accuracy=1e-8, solver="cg",
        initial=initial, statistics=statistics,
    )
    weights = torch.linspace(-1.0, 1.0, len(chi), dtype=torch.float64)
    grads = torch.autograd.grad((weights * charges).sum() + (charges**2).sum(), (positions, chi))
    return charges.detach(), grads, statistics.iterations


def test_periodic_qeq_warm_start_from_the_previous_step_equals_the_cold_start():
    positions, chi, hardness, cell = periodic_qeq_problem()
    previous, _, _ = qeq_solve(positions, chi, hardness, cell, None)
    gen = torch.Generator().manual_seed(9)
    step = positions + 0.002 * torch.randn(positions.shape, dtype=torch.float64, generator=gen)  # one MD step
    cold, cold_grads, cold_iterations = qeq_solve(step, chi, hardness, cell, None)
    warm, warm_grads, warm_iterations = qeq_solve(step, chi, hardness, cell, previous)
    torch.testing.assert_close(warm, cold, rtol=0, atol=1e-9)
    for g_warm, g_cold in zip(warm_grads, cold_grads):
        torch.testing.assert_close(g_warm, g_cold, rtol=1e-6, atol=1e-8)
    assert warm_iterations[0] <= cold_iterations[0] - 3, (warm_iterations, cold_iterations)


def test_self_consistent_dipole_warm_start_equals_the_cold_start():
    positions = random_box(30, 8.0, seed=2)
    gen = torch.Generator().manual_seed(2)
    alpha = 0.8 * self_consistent_cap(torch.tensor(SIGMA, dtype=torch.float64)) * torch.rand(30, dtype=torch.float64, generator=gen)
    field = torch.randn(30, 3, dtype=torch.float64, generator=gen)
    batch = torch.zeros(30, dtype=torch.long)

    def solve(coordinates, initial):
        coordinates = coordinates.clone().requires_grad_()
        statistics = SolveStatistics()
        dipoles, energy = self_consistent_induction(
            alpha, field, coordinates, batch, 1, torch.tensor(SIGMA, dtype=torch.float64),
            initial=initial, statistics=statistics,
        )
        (forces,) = torch.autograd.grad(energy.sum(), coordinates)
        return dipoles.detach(), energy.detach(), forces, statistics.iterations

    previous, _, _, _ = solve(positions, None)
    step = positions + 0.02 * torch.randn(positions.shape, dtype=torch.float64, generator=gen)
    cold = solve(step, None)
    warm = solve(step, previous)
    for a, b in zip(warm[:3], cold[:3]):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)
    assert warm[3][0] < cold[3][0], (warm[3], cold[3])


def water_like(n_molecules: int, seed: int) -> AtomsBatch:
    from ase import Atoms

    length = (n_molecules * 30.0) ** (1.0 / 3.0)  # ~liquid water density
    oxygens = random_box(n_molecules, length, seed, min_distance=2.5).numpy()
    rng = np.random.default_rng(seed)
    positions, numbers = [], []
    for oxygen in oxygens:
        first, second = rng.normal(size=(2, 3))
        positions += [oxygen, oxygen + first / np.linalg.norm(first), oxygen + second / np.linalg.norm(second)]
        numbers += [8, 1, 1]
    atoms = Atoms(numbers=numbers, positions=positions, cell=[length] * 3, pbc=True)
    return AtomsBatch.from_atoms([atoms]).to(dtype=torch.float64)


@pytest.mark.parametrize("mode", ["qeq", "self_consistent"])
def test_model_warm_starts_along_a_trajectory_keep_energy_and_forces(mode):
    options = dict(charge_model="qeq", qeq_solver="cg") if mode == "qeq" else dict(polarizability="self_consistent")
    kind = "qeq" if mode == "qeq" else "induction"
    data = water_like(16, seed=1)
    if mode == "self_consistent":  # open cluster
        data = AtomsBatch.from_atoms(
            [__import__("ase").Atoms(numbers=data.numbers.numpy(), positions=data.positions.numpy())]
        ).to(dtype=torch.float64)
    features = torch.randn(len(data.numbers), 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    warm_module = LongRangeModule(8, accuracy=1e-6, **options).double()
    torch.manual_seed(0)
    cold_module = LongRangeModule(8, accuracy=1e-6, solver_warm_start=False, **options).double()
    gen = torch.Generator().manual_seed(5)
    warm_state, cold_state = EngineState(), EngineState()
    positions = data.positions
    for step in range(3):
        positions = positions + 0.01 * torch.randn(positions.shape, dtype=torch.float64, generator=gen)
        results = []
        for module, state in ((warm_module, warm_state), (cold_module, cold_state)):
            coordinates = positions.clone().requires_grad_()
            out = module(features, data.with_geometry(coordinates, data.cell), engine_state=state)
            (gradient,) = torch.autograd.grad(out["energy"].sum(), coordinates)
            results.append((out["energy"].detach(), gradient, list(state.solutions.iterations[kind])))
        (e_warm, f_warm, it_warm), (e_cold, f_cold, it_cold) = results
        torch.testing.assert_close(e_warm, e_cold, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(f_warm, f_cold, rtol=1e-6, atol=1e-8)
        if step > 0:
            assert it_warm[0] < it_cold[0], (step, it_warm, it_cold)
    assert len(warm_state.solutions) == 1 and len(cold_state.solutions) == 0
    warm_state.clear_caches()
    assert warm_state.is_empty()


def test_solution_memory_keys_on_atomic_numbers_and_fills_unknown_structures_with_zeros():
    numbers = torch.tensor([8, 1, 1, 6, 1])
    batch = torch.tensor([0, 0, 0, 1, 1])
    keys = structure_keys(numbers, batch, 2)
    assert keys[0] != keys[1]
    memory = SolutionMemory(capacity=1)
    like = torch.zeros(5, dtype=torch.float64)
    assert memory.guess("qeq", keys, like) is None
    memory.remember("qeq", keys[:1], torch.tensor([0.5, -0.25, -0.25], dtype=torch.float64))
    guess = memory.guess("qeq", keys, like)
    assert guess is not None
    torch.testing.assert_close(guess, torch.tensor([0.5, -0.25, -0.25, 0.0, 0.0], dtype=torch.float64))
    assert memory.guess("induction", keys, like) is None  # kinds are separate
    memory.remember("qeq", keys[1:], torch.tensor([0.1, -0.1], dtype=torch.float64))
    assert len(memory) == 1  # capacity 1: the least recently used is dropped


# ---------------------------------------------------------------- k-space preconditioner


def qeq_charges(data, chi, hardness, solver, preconditioner="kspace"):
    statistics = SolveStatistics()
    charges = equilibrate_charges(
        chi, hardness, data.positions, data.cell, data.pbc, data.batch, data.total_charge,
        torch.tensor(SIGMA, dtype=torch.float64), accuracy=1e-6, solver=solver, statistics=statistics,
        preconditioner=preconditioner,
    )
    return charges, statistics.iterations


def test_kspace_preconditioner_is_symmetric_positive_definite_for_an_inhomogeneous_triclinic_cell():
    from latent_lr.electrostatics.kspace_preconditioner import kspace_preconditioner

    # a dense cluster in one corner of a skewed cell: far from the uniform medium the model assumes
    positions = random_box(40, 5.0, seed=4, min_distance=1.0)
    cell = torch.tensor([[[11.0, 0.0, 0.0], [3.0, 10.0, 0.0], [1.0, 2.0, 12.0]]], dtype=torch.float64)
    gen = torch.Generator().manual_seed(4)
    diagonal = 1.0 + 20.0 * torch.rand(40, dtype=torch.float64, generator=gen)
    apply = kspace_preconditioner(
        positions, cell, torch.ones(1, 3, dtype=torch.bool), torch.zeros(40, dtype=torch.long), diagonal,
        torch.tensor(SIGMA, dtype=torch.float64),
    )
    matrix = torch.stack([apply(column) for column in torch.eye(40, dtype=torch.float64)], dim=1)
    torch.testing.assert_close(matrix, matrix.T, rtol=0, atol=1e-12)
    eigenvalues = torch.linalg.eigvalsh(matrix)
    # bounds of the module docstring: (1 − max f) D⁻¹ ⪯ P⁻¹ ⪯ D⁻¹
    assert float(eigenvalues.min()) > 0
    assert float(eigenvalues.max()) <= float((1.0 / diagonal).max()) * (1 + 1e-12)


def test_kspace_preconditioned_qeq_equals_the_dense_solve_and_iterations_stop_growing_with_the_box():
    counts = {}
    for n_molecules in (30, 240):  # 90 and 720 atoms, box 9.7 and 19.3 Å
        data = water_like(n_molecules, seed=3)
        gen = torch.Generator().manual_seed(n_molecules)
        chi = torch.randn(len(data.numbers), dtype=torch.float64, generator=gen)
        hardness = 1.0 + torch.rand(len(data.numbers), dtype=torch.float64, generator=gen)
        kspace, kspace_iterations = qeq_charges(data, chi, hardness, "cg", "kspace")
        jacobi, jacobi_iterations = qeq_charges(data, chi, hardness, "cg", "jacobi")
        torch.testing.assert_close(kspace, jacobi, rtol=0, atol=1e-8)
        if n_molecules == 30:
            dense, _ = qeq_charges(data, chi, hardness, "dense")
            torch.testing.assert_close(kspace, dense, rtol=0, atol=1e-8)
        counts[n_molecules] = (kspace_iterations[0], jacobi_iterations[0])
    (small_kspace, small_jacobi), (large_kspace, large_jacobi) = counts[30], counts[240]
    assert large_kspace < 0.75 * large_jacobi, counts
    # doubling the box: Jacobi's count grows ~ L, the k-space one by far less
    assert large_kspace - small_kspace < 0.5 * (large_jacobi - small_jacobi), counts


def test_kspace_preconditioner_in_a_mixed_batch_equals_solving_each_structure_alone():
    from latent_lr.data import AtomsBatch as Batch

    boxes = [water_like(12, seed=s) for s in (5, 6)]
    cluster = water_like(8, seed=7)
    open_cluster = Batch(
        cluster.positions, cluster.numbers, torch.zeros(1, 3, 3, dtype=torch.float64),
        torch.zeros(1, 3, dtype=torch.bool), cluster.batch, cluster.total_charge,
    )
    parts = [boxes[0], open_cluster, boxes[1]]
    gen = torch.Generator().manual_seed(11)
    parameters = [
        (torch.randn(len(p.numbers), dtype=torch.float64, generator=gen),
         1.0 + torch.rand(len(p.numbers), dtype=torch.float64, generator=gen))
        for p in parts
    ]
    batch = torch.cat([torch.full((len(p.numbers),), i) for i, p in enumerate(parts)])
    together = Batch(
        torch.cat([p.positions for p in parts]), torch.cat([p.numbers for p in parts]),
        torch.cat([p.cell for p in parts]), torch.cat([p.pbc for p in parts]), batch,
        torch.tensor([0.0, 1.0, -1.0], dtype=torch.float64),
    )
    chi = torch.cat([c for c, _ in parameters])
    hardness = torch.cat([j for _, j in parameters])
    charged, _ = qeq_charges(together, chi, hardness, "cg", "kspace")
    reference = torch.cat([
        qeq_charges(dataclass_replace(p, total_charge=torch.tensor([q], dtype=torch.float64)), c, j, "cg", "jacobi")[0]
        for p, (c, j), q in zip(parts, parameters, (0.0, 1.0, -1.0))
    ])
    torch.testing.assert_close(charged, reference, rtol=0, atol=1e-8)
    sums = torch.zeros(3, dtype=torch.float64).index_add(0, batch, charged)
    torch.testing.assert_close(sums, torch.tensor([0.0, 1.0, -1.0], dtype=torch.float64), rtol=0, atol=1e-10)
