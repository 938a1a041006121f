"""Iterative refinement with a cheap operator (issue 15, item 5): most CG products use H̃ ≈ H, the exact H
checks every correction, so the solution meets the tolerance of plain CG.

References the code under test did not compute: numpy KKT solves of the same SPD systems, and (Qeq and the
joint head at the MD tolerance) numpy solves of the engine's own dense Coulomb matrix and the tight
training-mode solve.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from latent_lr.electrostatics import EngineState
from latent_lr.electrostatics.linear_solve import SolveStatistics, solve_spd


class _Matrices:
    """matvec(v, A) = A v for a dense SPD A, with an exact frozen product and a cheap approximate one."""

    def __init__(self, approximate: np.ndarray | None):
        self.cheap = None if approximate is None else torch.as_tensor(approximate)
        self.exact_products = 0

    def __call__(self, v: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
        return matrix @ v

    def frozen(self, matrix: torch.Tensor):
        def apply(v: torch.Tensor) -> torch.Tensor:
            self.exact_products += 1
            return matrix @ v

        return apply

    def approximate(self, matrix: torch.Tensor):
        cheap = self.cheap
        return None if cheap is None else (lambda v: cheap @ v)


def spd_problem(n: int = 80, seed: int = 0):
    """Two structures of n/2 rows: a block-diagonal SPD matrix with spread spectrum, b and totals."""
    rng = np.random.default_rng(seed)
    blocks = []
    for _ in range(2):
        basis, _ = np.linalg.qr(rng.normal(size=(n // 2, n // 2)))
        blocks.append(basis @ np.diag(np.geomspace(1.0, 300.0, n // 2)) @ basis.T)
    matrix = np.zeros((n, n))
    matrix[: n // 2, : n // 2], matrix[n // 2 :, n // 2 :] = blocks
    batch = np.repeat([0, 1], n // 2)
    return matrix, rng.normal(size=n), np.array([0.3, -1.2]), batch


def kkt_solution(matrix, rhs, totals, batch):
    n, groups = len(rhs), len(totals)
    ones = np.zeros((n, groups))
    ones[np.arange(n), batch] = 1.0
    kkt = np.block([[matrix, ones], [ones.T, np.zeros((groups, groups))]])
    return np.linalg.solve(kkt, np.concatenate([rhs, totals]))[:n]


def refined(matrix, rhs, totals, batch, approximate, rtol=1e-9):
    operator = _Matrices(approximate)
    record = SolveStatistics()
    solution = solve_spd(
        operator, torch.as_tensor(rhs), (torch.as_tensor(matrix),), batch=torch.as_tensor(batch),
        total=torch.as_tensor(totals), diagonal=torch.as_tensor(np.diag(matrix).copy()), rtol=rtol,
        statistics=record,
    )
    return solution.numpy(), record, operator.exact_products


def test_refinement_meets_the_cg_tolerance_with_few_exact_products():
    matrix, rhs, totals, batch = spd_problem()
    rng = np.random.default_rng(1)
    noise = rng.normal(size=matrix.shape)
    noise = (noise + noise.T) * (batch[:, None] == batch[None, :])
    values, vectors = np.linalg.eigh(matrix)
    root = vectors @ np.diag(np.sqrt(values)) @ vectors.T
    cheap = root @ (np.eye(len(rhs)) + 0.02 * noise / np.linalg.norm(noise, 2)) @ root  # ‖I − H̃⁻¹H‖ ≈ 0.02
    reference = kkt_solution(matrix, rhs, totals, batch)
    plain, plain_record, plain_products = refined(matrix, rhs, totals, batch, None)
    solution, record, products = refined(matrix, rhs, totals, batch, cheap)
    scale = np.linalg.norm(reference)
    assert np.linalg.norm(plain - reference) < 1e-6 * scale
    assert np.linalg.norm(solution - reference) < 1e-6 * scale
    np.testing.assert_allclose(solution[batch == 0].sum(), totals[0], atol=1e-10)
    assert record.exact_products == [products] and plain_record.exact_products == []
    assert products <= 8 < plain_products, (products, plain_products)  # the cheap operator carries the iterations


def test_a_poor_cheap_operator_hands_over_to_exact_cg_and_still_converges():
    matrix, rhs, totals, batch = spd_problem(seed=2)
    reference = kkt_solution(matrix, rhs, totals, batch)
    solution, record, products = refined(matrix, rhs, totals, batch, 0.2 * matrix)  # corrections overshoot 5x
    assert np.linalg.norm(solution - reference) < 1e-6 * np.linalg.norm(reference)
    assert record.exact_products == [products] and products > 10


def water_problem(n_molecules: int):
    from test_md_qeq import block_problem

    return block_problem(n_molecules, True)


def test_md_tolerance_qeq_refines_with_a_coarser_mesh_and_matches_a_numpy_kkt_solve():
    from latent_lr.electrostatics.qeq import SINGLE_PRECISION_RTOL, coulomb_matrices, equilibrate_charges

    data, chi, hardness = water_problem(300)  # 900 atoms: the 3e-2 mesh is coarser than the 1e-4 one
    sigma = torch.tensor(1.0, dtype=torch.float64)
    matrix = coulomb_matrices(data.positions, data.cell, data.pbc, data.batch, sigma, accuracy=1e-4)[0].numpy()
    reference = kkt_solution(matrix + np.diag(hardness.numpy()), -chi.numpy(), np.zeros(1), np.zeros(len(chi), int))
    rtol = 10 * SINGLE_PRECISION_RTOL
    results = {}
    for label, tolerance in (("md", rtol), ("tight", 1e-10)):
        record = SolveStatistics()
        charges = equilibrate_charges(
            chi, hardness, data.positions, data.cell, data.pbc, data.batch, data.total_charge, sigma,
            accuracy=1e-4, solver="cg", rtol=tolerance, statistics=record, state=EngineState(),
        )
        results[label] = (charges.numpy(), record)
    charges, record = results["md"]
    assert len(record.exact_products) == 1 and 2 <= record.exact_products[0] < record.iterations[0]
    assert results["tight"][1].exact_products == []  # training tolerance: exact products only
    assert np.linalg.norm(charges - reference) < 50 * rtol * np.linalg.norm(reference)


@pytest.mark.parametrize("deferred", [True, False], ids=["deferred", "implicit"])
def test_md_tolerance_joint_solve_refines_and_agrees_with_the_tight_solve(deferred):
    from test_joint_fast import salt_box

    from latent_lr.electrostatics import joint_equilibration as joint
    from latent_lr.electrostatics.qeq import SINGLE_PRECISION_RTOL

    problem = salt_box(5)  # 1,000 atoms
    positions, cell, pbc, batch, chi, hardness, alpha = problem
    results = {}
    for rtol in (10 * SINGLE_PRECISION_RTOL, 1e-11):
        moving = positions.clone().requires_grad_()
        record = SolveStatistics()
        charges, dipoles, energy = joint.equilibrate_charges_and_dipoles(
            chi, hardness, alpha, moving, cell, pbc, batch, torch.zeros(1, dtype=torch.float64),
            torch.tensor(1.0, dtype=torch.float64), torch.zeros(1, 3, dtype=torch.float64), accuracy=1e-4, rtol=rtol,
            deferred=deferred, statistics=record, state=EngineState(),
        )
        (gradient,) = torch.autograd.grad(energy.sum(), moving)
        results[rtol] = (charges.detach(), dipoles.detach(), energy.detach(), -gradient, record)
    loose, tight = results[10 * SINGLE_PRECISION_RTOL], results[1e-11]
    assert len(loose[4].exact_products) >= 1 and loose[4].exact_products[0] >= 2
    assert tight[4].exact_products == []
    rtol = 10 * SINGLE_PRECISION_RTOL
    for got, want in zip(loose[:4], tight[:4]):
        assert float((got - want).norm()) < 50 * rtol * float(want.norm())


def test_ewald_cells_and_slabs_keep_plain_cg():
    """Refinement needs a PME cell whose coarse mesh is cheaper; small (Ewald) cells and batches with slabs
    solve by plain CG, to the same tolerance."""
    from latent_lr.electrostatics.coulomb import PME_MIN_ATOMS
    from latent_lr.electrostatics.qeq import SINGLE_PRECISION_RTOL, equilibrate_charges

    sigma = torch.tensor(1.0, dtype=torch.float64)
    for n_molecules, pbc in ((16, (True, True, True)), (200, (True, True, False))):
        data, chi, hardness = water_problem(n_molecules)
        assert (len(chi) < PME_MIN_ATOMS) == (n_molecules == 16)
        record = SolveStatistics()
        equilibrate_charges(
            chi, hardness, data.positions, data.cell, torch.tensor([pbc]), data.batch, data.total_charge, sigma,
            accuracy=1e-4, solver="cg", rtol=10 * SINGLE_PRECISION_RTOL, statistics=record,
        )
        assert record.exact_products == [] and record.iterations[0] > 1


def test_the_cheap_operator_is_built_only_when_a_correction_is_needed():
    """A start that already meets the tolerance (e.g. the exact path re-run from the forward solution) costs
    one exact residual and no cheap-operator set-up; a build that is unavailable falls back to exact CG."""
    from latent_lr.electrostatics.linear_solve import lazy_operator

    matrix, rhs, totals, batch = spd_problem(seed=3)
    reference = kkt_solution(matrix, rhs, totals, batch)
    builds = []

    class Lazy(_Matrices):
        def approximate(self, matrix_):
            def build():
                builds.append(1)
                return None if unavailable else (lambda v: matrix_ @ v)

            return lazy_operator(build)

    for unavailable, initial in ((False, reference), (False, None), (True, None)):
        operator, record = Lazy(None), SolveStatistics()
        solution = solve_spd(
            operator, torch.as_tensor(rhs), (torch.as_tensor(matrix),), batch=torch.as_tensor(batch),
            total=torch.as_tensor(totals), diagonal=torch.as_tensor(np.diag(matrix).copy()), rtol=1e-9,
            statistics=record, initial=None if initial is None else torch.as_tensor(initial),
        )
        assert np.linalg.norm(solution.numpy() - reference) < 1e-6 * np.linalg.norm(reference)
        if initial is not None:
            assert builds == [] and record.exact_products == [1]
    assert builds == [1, 1]  # one build per solve that needed a correction; the unavailable one still solved
