"""Fast joint charge–dipole solves (issue 15, items 1 and 5): one operator build per call, the k-space
preconditioner on the charge block, warm starts.  None may change the result beyond the CG tolerance:
every fast variant is compared with the cold Jacobi solve, and the build count with the four builds
(forward CG, residual, energy, adjoint CG) of a call without reuse."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import bulk

from latent_lr.electrostatics import joint_equilibration as joint
from latent_lr.electrostatics.dipole_tensor import catastrophe_free_polarizability
from latent_lr.electrostatics.linear_solve import SolveStatistics

SIGMA = torch.tensor(1.0, dtype=torch.float64)


def salt_box(repeat: int, seed: int = 0):
    """A rattled NaCl supercell: positions (N, 3), cell (1, 3, 3), pbc, batch, and χ, J, α of its atoms."""
    crystal = bulk("NaCl", "rocksalt", a=5.64, cubic=True).repeat(repeat)
    crystal.rattle(0.1, seed=3)
    n = len(crystal)
    rng = np.random.default_rng(seed)
    bound = float(catastrophe_free_polarizability(SIGMA))
    as_tensor = (lambda v: torch.as_tensor(v, dtype=torch.float64))
    return (
        as_tensor(crystal.positions), as_tensor(crystal.cell.array)[None], torch.ones(1, 3, dtype=torch.bool),
        torch.zeros(n, dtype=torch.long), as_tensor(rng.normal(size=n)), as_tensor(rng.uniform(1.0, 3.0, n)),
        as_tensor(rng.uniform(0.1, 0.8, n) * bound),
    )


def energy_and_forces(positions, cell, pbc, batch, chi, hardness, alpha, rtol=1e-12, **options):
    positions = positions.clone().requires_grad_()
    charges, dipoles, energy = joint.equilibrate_charges_and_dipoles(
        chi, hardness, alpha, positions, cell, pbc, batch, torch.zeros(1, dtype=torch.float64), SIGMA,
        torch.tensor([[0.02, -0.01, 0.03]], dtype=torch.float64), accuracy=1e-6, rtol=rtol, **options,
    )
    (gradient,) = torch.autograd.grad(energy.sum(), positions)
    return charges.detach(), dipoles.detach(), energy.detach(), -gradient


@pytest.mark.parametrize("options", [dict(preconditioner="kspace"), dict(initial="perturbed")], ids=["kspace", "warm"])
def test_fast_solves_equal_the_cold_jacobi_solve(options):
    problem = salt_box(1)
    reference = energy_and_forces(*problem, preconditioner="jacobi")
    if options.get("initial") == "perturbed":  # a stale guess: a neighbouring geometry's solution, plus noise
        generator = torch.Generator().manual_seed(1)
        guess = torch.cat([reference[0][:, None], reference[1]], 1)
        options = dict(initial=guess + 0.05 * torch.randn(guess.shape, generator=generator, dtype=torch.float64),
                       preconditioner="jacobi")
    fast = energy_and_forces(*problem, **options)
    for got, want in zip(fast, reference):
        torch.testing.assert_close(got, want, atol=1e-9, rtol=0)


def test_warm_start_from_the_previous_step_and_kspace_cut_iterations():
    positions, *rest = salt_box(3)
    counts = {}
    for name, options in {"jacobi": dict(preconditioner="jacobi"), "kspace": dict(preconditioner="kspace")}.items():
        record = SolveStatistics()
        charges, dipoles, _, _ = energy_and_forces(positions, *rest, rtol=1e-8, statistics=record, **options)
        counts[name] = record.iterations[0]
    generator = torch.Generator().manual_seed(2)
    moved = positions + 0.005 * torch.randn(positions.shape, generator=generator, dtype=torch.float64)
    record = SolveStatistics()
    energy_and_forces(moved, *rest, rtol=1e-8, statistics=record, initial=torch.cat([charges[:, None], dipoles], 1))
    counts["warm"] = record.iterations[0]
    assert counts["kspace"] < counts["jacobi"], counts
    assert counts["warm"] < 0.8 * counts["kspace"], counts


def test_energy_and_forces_build_the_dipole_operator_and_the_coulomb_graph_once(monkeypatch):
    builds = {"dipoles": 0, "coulomb": 0}
    dipoles, frozen = joint._JointOperator.dipoles, joint._Geometry.frozen

    def counted_dipoles(self, *args):
        builds["dipoles"] += 1
        return dipoles(self, *args)

    def counted_frozen(self, *args):
        builds["coulomb"] += 1
        return frozen(self, *args)

    monkeypatch.setattr(joint._JointOperator, "dipoles", counted_dipoles)
    monkeypatch.setattr(joint._Geometry, "frozen", counted_frozen)
    record = SolveStatistics()
    energy_and_forces(*salt_box(1), statistics=record)
    assert len(record.iterations) == 2  # a forward and an adjoint CG solve ran
    assert builds == {"dipoles": 1, "coulomb": 1}


def test_an_unknown_preconditioner_and_a_misshaped_warm_start_are_clear_errors():
    problem = salt_box(1)
    with pytest.raises(ValueError, match="preconditioner must be one of"):
        energy_and_forces(*problem, preconditioner="multigrid")
    with pytest.raises(ValueError, match=r"initial must be \(N, 4\)"):
        energy_and_forces(*problem, initial=torch.zeros(3, 4, dtype=torch.float64))


def coupling(positions, cell, accuracy, method):
    n = positions.shape[0]
    operator = joint.dipole_operator(
        positions, cell, torch.tensor([True]), torch.zeros(n, dtype=torch.long), SIGMA, accuracy, method=method
    )
    return joint._ChargeDipoleCoupling(operator, positions, cell)


@pytest.mark.parametrize("accuracy", [1e-4, 1e-6])
def test_pme_charge_dipole_coupling_equals_the_ewald_one_and_is_its_own_transpose(accuracy):
    positions, cell, *_ = salt_box(2)
    rng = np.random.default_rng(4)
    charges, dipoles = torch.tensor(rng.normal(size=len(positions))), torch.tensor(rng.normal(size=(len(positions), 3)))
    reference, mesh = coupling(positions, cell, 1e-12, "ewald"), coupling(positions, cell, accuracy, "pme")
    assert len(mesh.operator.meshes) == 1 and not mesh.operator.groups
    for got, want in ((mesh.field(charges), reference.field(charges)), (mesh.potential(dipoles), reference.potential(dipoles))):
        error = float((got - want).norm() / want.norm())
        assert 0 < error < 10 * accuracy, error
    # pᵀ(G q) = (Gᵀp)ᵀq exactly: the mesh potential is the transpose of the mesh field
    torch.testing.assert_close((dipoles * mesh.field(charges)).sum(), (mesh.potential(dipoles) * charges).sum(),
                               rtol=1e-12, atol=0)


def test_pme_joint_operator_is_symmetric_positive_definite_and_the_solution_matches_ewald():
    positions, cell, pbc, batch, chi, hardness, alpha = salt_box(1)
    n = len(positions)
    scale = alpha.sqrt()
    operator = joint._JointOperator(pbc, batch, 1, 1e-6, method="pme")
    apply = operator.frozen(positions, cell, SIGMA, hardness, scale)
    assert len(operator.dipoles(positions, cell, SIGMA).meshes) == 1
    units = torch.eye(4 * n, dtype=torch.float64).reshape(4 * n, n, 4)
    matrix = torch.stack([apply(u).reshape(-1) for u in units])
    torch.testing.assert_close(matrix, matrix.T, rtol=0, atol=1e-10)
    assert float(torch.linalg.eigvalsh(matrix).min()) > 0
    ewald = energy_and_forces(positions, cell, pbc, batch, chi, hardness, alpha, method="ewald")
    pme = energy_and_forces(positions, cell, pbc, batch, chi, hardness, alpha, method="pme")
    for got, want in zip(pme, ewald):
        assert float((got - want).abs().max() / want.abs().max()) < 1e-4
        assert not torch.equal(got, want)


@pytest.mark.parametrize("md_rtol", [None, 1e-6])
def test_eval_mode_solves_at_the_md_tolerance_and_agrees_with_training_mode(md_rtol, monkeypatch):
    """MD/inference use the Qeq head's eval tolerance (accuracy/10 or qeq_md_rtol); training keeps the tight default."""
    from test_model_radial import make_model, rattled_salt

    import latent_lr.qeq_dipoles as head_module
    from latent_lr import AtomsBatch

    used = []
    solve = head_module.equilibrate_charges_and_dipoles

    def recording(*args, **kwargs):
        used.append(kwargs.get("rtol"))
        return solve(*args, **kwargs)

    monkeypatch.setattr(head_module, "equilibrate_charges_and_dipoles", recording)
    model = make_model(seed=3, charge_model="qeq_dipoles", qeq_md_rtol=md_rtol)
    crystal = rattled_salt()
    crystal.info["charge"] = 1.0
    batch = AtomsBatch.from_atoms(crystal)
    tight = model.train()(batch)
    loose = model.eval()(batch)
    expected = md_rtol if md_rtol is not None else 0.1 * model.long_range.config.accuracy
    assert used == [None, expected]
    scale = float(tight["forces"].detach().abs().max())
    assert float((loose["forces"] - tight["forces"]).abs().max()) < 50 * expected * scale
    assert abs(float(loose["energy"] - tight["energy"])) < 1e-6 * abs(float(tight["energy"]))
