"""Joint charge–dipole near-field blocks and preconditioner reuse along a trajectory (issue 15, item 5).

References: the dense Hessian of E(q, p) built in numpy (test_joint_equilibration.numpy_joint_matrix), the
stateless solve with a freshly built preconditioner, and symmetry / positive definiteness checked by eigenvalues.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_joint_equilibration import numpy_joint_matrix

from latent_lr.demo import water_like_box
from latent_lr.electrostatics import EngineState
from latent_lr.electrostatics import preconditioner_memory as memory
from latent_lr.electrostatics.block_preconditioner import joint_near_field_preconditioner
from latent_lr.electrostatics.dipole_tensor import catastrophe_free_polarizability
from latent_lr.electrostatics.joint_equilibration import equilibrate_charges_and_dipoles
from latent_lr.electrostatics.kspace_preconditioner import kspace_preconditioner
from latent_lr.electrostatics.linear_solve import SolveStatistics
from latent_lr.electrostatics.qeq import equilibrate_charges, gaussian_self_hardness

SIGMA = torch.tensor(0.8, dtype=torch.float64)


def parameters(n: int, seed: int = 0):
    """χ (eV/e), J (eV/e²) and α (e·Å²/V, 10–80 % of the catastrophe bound) of n atoms."""
    generator = torch.Generator().manual_seed(seed)
    bound = float(catastrophe_free_polarizability(SIGMA))
    chi = torch.randn(n, dtype=torch.float64, generator=generator)
    hardness = 1.0 + 2.0 * torch.rand(n, dtype=torch.float64, generator=generator)
    alpha = (0.1 + 0.7 * torch.rand(n, dtype=torch.float64, generator=generator)) * bound
    return chi, hardness, alpha


def joint_diagonal(hardness: torch.Tensor) -> torch.Tensor:
    charge = hardness + gaussian_self_hardness(SIGMA)
    return torch.cat([charge[:, None], torch.ones(len(hardness), 3, dtype=torch.float64)], 1)


def as_matrix(apply, n: int) -> torch.Tensor:
    """(4n, 4n) matrix of an operator on (n, 4) rows, rows and columns atom-major."""
    columns = [apply(e.reshape(n, 4)).reshape(-1) for e in torch.eye(4 * n, dtype=torch.float64)]
    return torch.stack(columns, 1)


def test_the_blocks_of_one_molecule_invert_its_exact_joint_operator():
    """One open water molecule is one block: P⁻¹ is then the inverse of the scaled Hessian S̃ M S̃ itself."""
    positions = torch.tensor([[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0]], dtype=torch.float64)
    _, hardness, alpha = parameters(3)
    apply = joint_near_field_preconditioner(
        positions, torch.zeros(1, 3, 3, dtype=torch.float64), torch.zeros(1, 3, dtype=torch.bool),
        torch.zeros(3, dtype=torch.long), joint_diagonal(hardness), alpha.sqrt(), float(SIGMA),
    )
    assert apply is not None
    dense = numpy_joint_matrix(hardness.numpy(), alpha.numpy(), positions.numpy(), float(SIGMA))  # (q..., p...)
    order = np.array([[i] + [3 + 3 * i + c for c in range(3)] for i in range(3)]).reshape(-1)  # atom-major
    scaling = np.concatenate([np.ones(3), np.repeat(np.sqrt(alpha.numpy()), 3)])[order]
    scaled = scaling[:, None] * dense[np.ix_(order, order)] * scaling[None, :]  # H in (q, x = p/√α)
    np.testing.assert_allclose(as_matrix(apply, 3).numpy(), np.linalg.inv(scaled), rtol=1e-9, atol=1e-12)


def water(n_molecules: int):
    positions, _, cell = water_like_box(n_molecules, seed=2)
    n = positions.shape[0]
    return positions.to(torch.float64), cell.to(torch.float64)[None], torch.ones(1, 3, dtype=torch.bool), \
        torch.zeros(n, dtype=torch.long)


def test_periodic_joint_blocks_are_symmetric_positive_definite():
    positions, cell, pbc, batch = water(8)
    _, hardness, alpha = parameters(len(positions))
    diagonal = joint_diagonal(hardness)
    charge_inverse = kspace_preconditioner(positions, cell, pbc, batch, diagonal[:, 0], SIGMA)

    def inner(r: torch.Tensor) -> torch.Tensor:
        return torch.cat([charge_inverse(r[:, 0])[:, None], r[:, 1:]], 1)

    apply = joint_near_field_preconditioner(positions, cell, pbc, batch, diagonal, alpha.sqrt(), float(SIGMA), inner)
    assert apply is not None
    matrix = as_matrix(apply, len(positions))
    torch.testing.assert_close(matrix, matrix.T, rtol=0, atol=1e-12)
    assert float(torch.linalg.eigvalsh(matrix).min()) > 0


def joint_solve(positions, cell, pbc, batch, preconditioner: str, state=None, rtol=1e-10):
    chi, hardness, alpha = parameters(len(positions))
    statistics = SolveStatistics()
    charges, dipoles, energy = equilibrate_charges_and_dipoles(
        chi, hardness, alpha, positions, cell, pbc, batch, torch.zeros(1, dtype=torch.float64), SIGMA,
        accuracy=1e-6, rtol=rtol, preconditioner=preconditioner, statistics=statistics, state=state,
    )
    return charges, dipoles, energy, statistics.iterations[0]


@pytest.mark.parametrize("periodic", [True, False], ids=["periodic", "open"])
def test_joint_blocks_keep_the_solution_and_cut_cg_iterations(periodic):
    positions, cell, pbc, batch = water(27)
    if not periodic:
        cell, pbc = torch.zeros_like(cell), torch.zeros_like(pbc)
    baseline = "kspace" if periodic else "jacobi"
    *reference, reference_iterations = joint_solve(positions, cell, pbc, batch, baseline)
    *blocked, iterations = joint_solve(positions, cell, pbc, batch, "blocks")
    for got, want in zip(blocked, reference):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-8)
    assert iterations < 0.8 * reference_iterations, (iterations, reference_iterations)


def displaced(positions: torch.Tensor, amount: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    step = torch.randn(positions.shape, dtype=torch.float64, generator=generator)
    return positions + amount * step / step.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("solve", ["joint", "qeq"])
def test_md_steps_reuse_the_preconditioner_without_changing_the_solution(solve):
    positions, cell, pbc, batch = water(27)
    chi, hardness, _ = parameters(len(positions))
    state = EngineState()

    def run(x, cell_=cell, with_state=True):
        use = state if with_state else None
        if solve == "joint":
            return joint_solve(x, cell_, pbc, batch, "blocks", state=use)[:3]
        charges = equilibrate_charges(chi, hardness, x, cell_, pbc, batch, torch.zeros(1, dtype=torch.float64),
                                      SIGMA, accuracy=1e-6, rtol=1e-10, state=use)
        return (charges,)

    run(positions)
    assert state.preconditioners.builds == 1
    for step in range(1, 4):  # small MD-like steps: reused, and the result is the fresh solve's
        moved = displaced(positions, 0.02 * step, seed=step)
        for got, want in zip(run(moved), run(moved, with_state=False)):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-8)
    assert state.preconditioners.builds == 1
    run(displaced(positions, 2 * memory.REUSE_DISPLACEMENT, seed=9))  # an atom moved too far: rebuilt
    assert state.preconditioners.builds == 2
    run(positions, cell_=cell * 1.01)  # another cell: rebuilt
    assert state.preconditioners.builds == 3
    state.clear_caches()
    assert state.is_empty()


def test_a_kept_preconditioner_is_rebuilt_after_its_last_allowed_call():
    kept = memory.PreconditionerMemory()
    positions, cell, pbc, batch = water(1)
    diagonal = torch.ones(len(positions), dtype=torch.float64)
    builds = [kept.preconditioner("test", positions, cell, pbc, batch, diagonal, 1.0, lambda: None)
              for _ in range(memory.REUSE_CALLS + 1)]
    assert builds == [None] * (memory.REUSE_CALLS + 1) and kept.builds == 2
    kept.preconditioner("test", positions, cell, pbc, batch, diagonal * 1.5, 1.0, lambda: None)  # hardness changed
    assert kept.builds == 3


def test_a_preconditioner_coupling_the_constrained_column_keeps_cg_exact():
    """(q, x) rows with Σq fixed per structure and a dense P⁻¹ that mixes q with x (as the joint blocks do):
    CG must still solve the KKT system of the charge constraint alone (numpy reference)."""
    from latent_lr.electrostatics.linear_solve import solve_spd

    rng = np.random.default_rng(5)
    n_atoms, width = 12, 4
    batch = np.repeat([0, 1], n_atoms // 2)
    size = n_atoms * width
    same = np.repeat(batch, width)[:, None] == np.repeat(batch, width)[None, :]
    basis, _ = np.linalg.qr(rng.normal(size=(size, size)))
    matrix = (basis @ np.diag(np.geomspace(1.0, 200.0, size)) @ basis.T) * same  # block-diagonal SPD
    noise = rng.normal(size=(size, size))
    approximate = matrix + 0.3 * (noise @ noise.T / size) * same
    inverse = torch.as_tensor(np.linalg.inv(approximate))  # SPD, couples every component of a structure
    rhs, totals = rng.normal(size=(n_atoms, width)), np.array([0.7, -0.4])
    constraint = np.zeros((size, 2))
    constraint[np.arange(0, size, width), batch] = 1.0  # Σ_i q_i per structure
    kkt = np.block([[matrix, constraint], [constraint.T, np.zeros((2, 2))]])
    reference = np.linalg.solve(kkt, np.concatenate([rhs.reshape(-1), totals]))[:size].reshape(n_atoms, width)
    statistics = SolveStatistics()
    solution = solve_spd(
        lambda v, m: (m @ v.reshape(-1)).reshape(v.shape), torch.as_tensor(rhs), (torch.as_tensor(matrix),),
        batch=torch.as_tensor(batch), total=torch.as_tensor(np.stack([totals, 0 * totals, 0 * totals, 0 * totals], 1)),
        rtol=1e-12, constrained=torch.tensor([True, False, False, False]), statistics=statistics,
        preconditioner=lambda r: (inverse @ r.reshape(-1)).reshape(r.shape),
    )
    np.testing.assert_allclose(solution.numpy(), reference, rtol=0, atol=1e-9)
    assert statistics.iterations[0] < 20, statistics.iterations  # a good P⁻¹: few iterations (Jacobi: ~48)
