"""Charged systems: the "none" baseline, the batched CG solver and charge equilibration.

References are independent of the code under test: numpy KKT solves with a
Coulomb matrix built from erf(r/(√2σ))/r, finite differences and linear algebra.
"""

import numpy as np
import pytest
import torch
from ase.build import molecule

import latent_lr
from latent_lr import AtomsBatch

SPECIES = [1, 6, 7, 8, 11, 17]


def make_model(seed=0, **options):
    torch.manual_seed(seed)
    host = latent_lr.RadialPotential(species=SPECIES, cutoff=3.5, hidden_dim=16).double()
    return latent_lr.wrap(host, **options)


def test_no_redistribution_ignores_the_total_charge():
    model = make_model(seed=4, charge_redistribution="none").eval()
    atoms = molecule("CH3CH2OH")
    neutral = model(AtomsBatch.from_atoms(atoms), compute_forces=False)["charges"]
    atoms.info["charge"] = 1.0
    charged = model(AtomsBatch.from_atoms(atoms), compute_forces=False)["charges"]
    torch.testing.assert_close(charged, neutral, atol=0, rtol=0)
    assert abs(neutral.sum().item()) > 1e-6  # raw charges: nothing forces them to sum to 0


def test_unknown_redistribution_is_a_clear_error():
    with pytest.raises(ValueError, match="redistribution must be one of"):
        make_model(charge_redistribution="fukui")


# ---------------------------------------------------------------- linear_solve


def spd_problem(sizes=(2, 3), seed=0):
    """Block-diagonal SPD H(M) = mask ⊙ (0.3 M Mᵀ + 2 I), one block per structure."""
    gen = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    mask = (batch[:, None] == batch[None, :]).double()
    M = torch.randn(n, n, dtype=torch.float64, generator=gen).requires_grad_()
    b = torch.randn(n, dtype=torch.float64, generator=gen).requires_grad_()
    total = torch.randn(len(sizes), dtype=torch.float64, generator=gen).requires_grad_()

    def matrix(M):
        return mask * (0.3 * M @ M.T + 2.0 * torch.eye(n, dtype=torch.float64))

    return batch, M, b, total, matrix


def test_constrained_cg_matches_numpy_kkt_and_unconstrained_matches_inverse():
    from latent_lr.linear_solve import solve_spd

    batch, M, b, total, matrix = spd_problem((3, 5, 4), seed=1)
    total = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    x = solve_spd(lambda v, M: matrix(M) @ v, b, (M,), batch=batch, total=total).detach().numpy()
    H = matrix(M).detach().numpy()
    C = np.zeros((3, len(b)))
    C[batch.numpy(), np.arange(len(b))] = 1.0
    kkt = np.block([[H, C.T], [C, np.zeros((3, 3))]])
    reference = np.linalg.solve(kkt, np.concatenate([b.detach().numpy(), total.numpy()]))[: len(b)]
    np.testing.assert_allclose(x, reference, atol=1e-10)
    free = solve_spd(lambda v, M: matrix(M) @ v, b, (M,), batch=batch).detach().numpy()
    np.testing.assert_allclose(free, np.linalg.solve(H, b.detach().numpy()), atol=1e-10)


@pytest.mark.parametrize("constrained", [True, False])
def test_cg_implicit_first_and_second_derivatives_match_finite_differences(constrained):
    from latent_lr.linear_solve import solve_spd

    batch, M, b, total, matrix = spd_problem()

    def solve(M, b, *total):
        return solve_spd(lambda v, M: matrix(M) @ v, b, (M,), batch=batch, total=total[0] if total else None)

    inputs = (M, b, total) if constrained else (M, b)
    assert torch.autograd.gradcheck(solve, inputs)
    assert torch.autograd.gradgradcheck(solve, inputs)


def test_cg_reports_non_convergence_and_non_positive_operators():
    from latent_lr.linear_solve import ConvergenceError, solve_spd

    batch, M, b, total, matrix = spd_problem((6,))
    with pytest.raises(ConvergenceError, match="did not converge in 2 iterations"):
        solve_spd(lambda v, M: matrix(M) @ v, b, (M,), max_iter=2)
    with pytest.warns(RuntimeWarning, match="did not converge"):
        solve_spd(lambda v, M: matrix(M) @ v, b, (M,), max_iter=2, on_failure="warn")
    with pytest.raises(ValueError, match="not positive definite"):
        solve_spd(lambda v: -v, b.detach())
    with pytest.raises(ValueError, match="total has shape"):
        solve_spd(lambda v: v, b.detach(), total=torch.zeros(1, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="no rows"):
        solve_spd(lambda v: v, b.detach(), total=torch.zeros(2, dtype=torch.float64))
