"""Charged systems: the "none" baseline, the batched CG solver and charge equilibration.

References are independent of the code under test: numpy KKT solves with a
Coulomb matrix built from erf(r/(√2σ))/r, finite differences and linear algebra.
"""

import numpy as np
import pytest
import torch
from ase.build import molecule

import latent_lr
from latent_lr import LongRangeConfig
from latent_lr import AtomsBatch
from test_model_radial import make_model, rattled_salt  # the tiny radial test backbone


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
    from latent_lr.electrostatics.linear_solve import solve_spd

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
    from latent_lr.electrostatics.linear_solve import solve_spd

    batch, M, b, total, matrix = spd_problem()

    def solve(M, b, *total):
        return solve_spd(lambda v, M: matrix(M) @ v, b, (M,), batch=batch, total=total[0] if total else None)

    inputs = (M, b, total) if constrained else (M, b)
    assert torch.autograd.gradcheck(solve, inputs)
    assert torch.autograd.gradgradcheck(solve, inputs)


def test_constrained_cg_ignores_the_multiplier_direction():
    """A right-hand side along 1 is absorbed by the multiplier: x = 0 (regression: round-off blew up)."""
    from latent_lr.electrostatics.linear_solve import solve_spd

    batch, M, b, total, matrix = spd_problem((3, 4))
    ones = torch.full_like(b, 3.7).detach()
    diagonal = torch.linspace(1.0, 3.0, len(b), dtype=torch.float64)
    x = solve_spd(lambda v, M: matrix(M) @ v, ones, (M.detach(),), batch=batch, total=torch.zeros(2, dtype=torch.float64), diagonal=diagonal)
    assert x.abs().max() < 1e-12


def test_cg_reports_non_convergence_and_non_positive_operators():
    from latent_lr.electrostatics.linear_solve import ConvergenceError, solve_spd

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


# ---------------------------------------------------------------- charge equilibration

K_E = 14.399645  # eV·Å/e², the Coulomb constant, restated so the reference is independent


def numpy_qeq(positions, chi, hardness, total, sigma):
    """Independent open-boundary Qeq: KKT solve with K_ij = k_e erf(r/(√2σ))/r, K_ii = k_e √(2/π)/σ."""
    from scipy.special import erf

    r = np.linalg.norm(positions[:, None] - positions[None], axis=-1)
    safe = np.where(r > 0, r, 1.0)
    K = K_E * np.where(r > 0, erf(r / (np.sqrt(2) * sigma)) / safe, np.sqrt(2 / np.pi) / sigma)
    n = len(positions)
    kkt = np.block([[K + np.diag(hardness), np.ones((n, 1))], [np.ones((1, n)), np.zeros((1, 1))]])
    q = np.linalg.solve(kkt, np.concatenate([-chi, [total]]))[:n]
    energy = chi @ q + 0.5 * q @ (K + np.diag(hardness)) @ q
    return q, energy


def random_parameters(n, seed):
    gen = torch.Generator().manual_seed(seed)
    chi = torch.randn(n, dtype=torch.float64, generator=gen)
    hardness = 0.5 + torch.rand(n, dtype=torch.float64, generator=gen)
    return chi, hardness


def qeq_inputs(structures, charges, seed=0):
    for atoms, charge in zip(structures, charges):
        atoms.info["charge"] = charge
    data = AtomsBatch.from_atoms(structures)
    chi, hardness = random_parameters(len(data.batch), seed)
    return data, chi, hardness


def solve(data, chi, hardness, solver, sigma=1.0, positions=None):
    from latent_lr.electrostatics.qeq import equilibrate_charges, qeq_energy

    positions = data.positions if positions is None else positions
    sigma = torch.tensor(sigma, dtype=torch.float64)
    geometry = (positions, data.cell, data.pbc, data.batch)
    q = equilibrate_charges(chi, hardness, *geometry, data.total_charge, sigma, solver=solver)
    return q, qeq_energy(q, chi, hardness, *geometry, sigma)


def test_open_boundary_qeq_matches_an_independent_numpy_kkt_solve_for_every_solver():
    structures = [molecule("CH3CH2OH"), molecule("H2O"), molecule("C6H6")]
    data, chi, hardness = qeq_inputs(structures, [1.0, -0.5, 0.0], seed=2)
    results = {solver: solve(data, chi, hardness, solver, sigma=0.8) for solver in ("dense", "cg", "auto")}
    start = 0
    for index, atoms in enumerate(structures):
        rows = slice(start, start + len(atoms))
        start += len(atoms)
        q_ref, e_ref = numpy_qeq(atoms.positions, chi[rows].numpy(), hardness[rows].numpy(), atoms.info["charge"], 0.8)
        for solver, (q, energy) in results.items():
            np.testing.assert_allclose(q[rows].numpy(), q_ref, atol=1e-9, err_msg=solver)
            assert energy[index].item() == pytest.approx(e_ref, abs=1e-9)
    torch.testing.assert_close(results["cg"][0], results["dense"][0], atol=1e-9, rtol=0)


def test_periodic_qeq_cg_equals_dense_and_supercell_tiles_the_cell():
    crystal = rattled_salt()
    data, chi, hardness = qeq_inputs([crystal, molecule("H2O")], [0.5, 0.0], seed=3)
    q_dense, e_dense = solve(data, chi, hardness, "dense")
    q_cg, e_cg = solve(data, chi, hardness, "cg")
    torch.testing.assert_close(q_cg, q_dense, atol=1e-8, rtol=0)
    torch.testing.assert_close(e_cg, e_dense, atol=1e-8, rtol=0)
    assert q_dense.abs().max() > 1e-2
    # A 2x1x1 supercell with the same parameters on every image has the tiled charges
    # and twice the energy (net charge doubles too: the background scales with it).
    n = len(crystal)
    big = crystal.repeat((2, 1, 1))
    big.info["charge"] = 1.0
    tiled = AtomsBatch.from_atoms(big)
    q_big, e_big = solve(tiled, chi[:n].repeat(2), hardness[:n].repeat(2), "cg")
    single = AtomsBatch.from_atoms(crystal)
    q_one, e_one = solve(single, chi[:n], hardness[:n], "dense")
    torch.testing.assert_close(q_big, q_one.repeat(2), atol=1e-8, rtol=0)
    assert e_big.item() == pytest.approx(2 * e_one.item(), abs=1e-7)


def test_molecule_in_a_large_periodic_box_approaches_the_open_boundary_charges():
    atoms = molecule("CH3CH2OH")
    data, chi, hardness = qeq_inputs([atoms], [0.0], seed=4)
    boxed = atoms.copy()
    boxed.set_cell(np.eye(3) * 30.0)
    boxed.pbc = True
    q_open, _ = solve(data, chi, hardness, "dense")
    q_box, _ = solve(AtomsBatch.from_atoms(boxed), chi, hardness, "cg")
    q_ref, _ = numpy_qeq(atoms.positions, chi.numpy(), hardness.numpy(), 0.0, 1.0)
    np.testing.assert_allclose(q_box.numpy(), q_ref, atol=2e-3)
    assert np.abs(q_box.numpy() - q_ref).max() > 1e-9  # images do act


@pytest.mark.parametrize("solver", ["dense", "cg"])
@pytest.mark.parametrize("periodic", [False, True])
def test_qeq_first_and_second_derivatives_match_finite_differences(solver, periodic):
    if periodic:
        from ase import Atoms

        atoms = Atoms("NaClH", positions=[[0.1, 0.2, 0.0], [2.3, 0.1, 0.4], [0.9, 2.1, 1.8]], cell=np.diag([4.0, 4.5, 5.0]), pbc=True)
    else:
        atoms = molecule("H2O")
    data, chi, hardness = qeq_inputs([atoms], [0.4], seed=5)
    positions = data.positions.clone().requires_grad_()
    chi.requires_grad_()
    hardness.requires_grad_()

    def outputs(chi, hardness, positions):
        q, energy = solve(data, chi, hardness, solver, positions=positions)
        return q, energy

    assert torch.autograd.gradcheck(outputs, (chi, hardness, positions))
    assert torch.autograd.gradgradcheck(outputs, (chi, hardness, positions))


@pytest.fixture(scope="module")
def qeq_model():
    return make_model(seed=6, charge_model="qeq").eval()


@pytest.mark.parametrize("solver", ["dense", "cg", "auto"])
def test_qeq_model_reproduces_any_total_charge(solver):
    model = make_model(seed=7, charge_model="qeq", qeq_solver=solver).eval()
    structures = [molecule("CH3CH2OH"), rattled_salt(), molecule("H2O")]
    for atoms, charge in zip(structures, [1.0, -2.5, 0.3]):
        atoms.info["charge"] = charge
    data = AtomsBatch.from_atoms(structures)
    out = model(data, compute_forces=False)
    totals = torch.zeros(3, dtype=torch.float64).index_add(0, data.batch, out["charges"])
    torch.testing.assert_close(totals, torch.tensor([1.0, -2.5, 0.3], dtype=torch.float64), atol=1e-10, rtol=0)


@pytest.mark.parametrize("solver", ["dense", "cg"])
@pytest.mark.parametrize("periodic", [False, True], ids=["ion", "crystal"])
def test_qeq_model_forces_match_finite_differences(solver, periodic):
    from ase.calculators.fd import calculate_numerical_forces

    model = make_model(seed=8, charge_model="qeq", qeq_solver=solver).eval()
    atoms = rattled_salt() if periodic else molecule("CH3CH2OH")
    atoms.info["charge"] = 1.0
    atoms.calc = latent_lr.Calculator(model)
    forces = atoms.get_forces()
    np.testing.assert_allclose(forces, calculate_numerical_forces(atoms, 1e-4), atol=1e-7)
    out = model(AtomsBatch.from_atoms(atoms), compute_forces=False)
    assert abs(out["long_range_energy"].item()) > 1e-3


@pytest.mark.parametrize("solver", ["dense", "cg"])
def test_force_loss_gradient_wrt_qeq_parameters_matches_finite_differences(solver):
    """The mixed second derivative ∂/∂θ ∂E/∂r that force training needs."""
    model = make_model(seed=9, charge_model="qeq", qeq_solver=solver).train()
    atoms = molecule("CH3CH2OH")
    atoms.info["charge"] = -1.0
    data = AtomsBatch.from_atoms(atoms)
    head = model.long_range.charge_head
    parameters = {  # name: (tensor, entry); a uniform χ shift would do nothing (absorbed by μ)
        "chi(H)": (head.electronegativity_baseline.weight, (1, 0)),
        "J(O)": (head.hardness_baseline.weight, (8, 0)),
        "chi MLP": (head.electronegativity_net[-1].weight, (0, 3)),
    }

    def loss():
        return (model(data)["forces"] ** 2).sum()

    value = loss()
    grads = torch.autograd.grad(value, [tensor for tensor, _ in parameters.values()])
    for (name, (parameter, index)), grad in zip(parameters.items(), grads):
        step = 1e-5
        values = []
        for shift in (step, -2 * step, step):
            with torch.no_grad():
                parameter[index] += shift
            values.append(loss().item())
        plus, minus = values[0], values[1]
        numerical = (plus - minus) / (2 * step)
        assert abs(grad[index].item()) > 1e-6, name
        assert grad[index].item() == pytest.approx(numerical, rel=1e-5, abs=1e-9), name


def test_qeq_charges_respond_linearly_to_a_field_and_match_numpy(qeq_model):
    atoms = molecule("CH3CH2OH")
    field = np.array([0.02, -0.01, 0.03])

    def charges_in(f):
        atoms.info["external_field"] = f
        return qeq_model(AtomsBatch.from_atoms(atoms), compute_forces=False)["charges"].numpy()

    q0, q1, q2 = charges_in(np.zeros(3)), charges_in(field), charges_in(2 * field)
    response = q1 - q0
    assert np.abs(response).max() > 1e-4
    np.testing.assert_allclose(q2 - q0, 2 * response, atol=1e-10)
    np.testing.assert_allclose(response.sum(), 0.0, atol=1e-12)
    # Independent reference: χ → χ − r·E in a numpy KKT solve.
    data = AtomsBatch.from_atoms(atoms)
    features = qeq_model.backbone(data)[1]
    chi, hardness = qeq_model.long_range.charge_head.parameters_per_atom(features, data.numbers)
    chi, hardness = chi.detach().numpy(), hardness.detach().numpy()
    ref0, _ = numpy_qeq(atoms.positions, chi, hardness, 0.0, 1.0)
    ref1, _ = numpy_qeq(atoms.positions, chi - atoms.positions @ field, hardness, 0.0, 1.0)
    np.testing.assert_allclose(q0, ref0, atol=1e-9)
    np.testing.assert_allclose(response, ref1 - ref0, atol=1e-9)


def test_qeq_forces_in_a_field_match_finite_differences(qeq_model):
    """The total energy (Qeq + field term) is stationary in q, so forces stay exact in a field."""
    from ase.calculators.fd import calculate_numerical_forces

    atoms = molecule("CH3CH2OH")
    atoms.info["external_field"] = np.array([0.05, 0.02, -0.04])
    atoms.info["charge"] = 1.0
    atoms.calc = latent_lr.Calculator(qeq_model)
    np.testing.assert_allclose(atoms.get_forces(), calculate_numerical_forces(atoms, 1e-4), atol=1e-7)


def test_qeq_model_save_load_round_trip(qeq_model, tmp_path):
    path = tmp_path / "qeq.pt"
    latent_lr.save(qeq_model, path)
    loaded = latent_lr.load(path).eval()
    assert loaded.long_range.config.charge_model == "qeq"
    data = AtomsBatch.from_atoms([molecule("CH3CH2OH"), rattled_salt()])
    a, b = qeq_model(data), loaded(data)
    assert torch.equal(a["energy"], b["energy"]) and torch.equal(a["charges"], b["charges"])


def test_bad_charge_model_options_are_clear_errors():
    with pytest.raises(ValueError, match="charge_model must be"):
        make_model(charge_model="eem")
    with pytest.raises(ValueError, match="qeq_solver must be one of"):
        make_model(charge_model="qeq", qeq_solver="lu")


def test_cli_charge_flags_reach_the_model(tmp_path):
    from latent_lr.cli import main
    from latent_lr.qeq import QeqChargeHead
    from latent_lr.synthetic import write_dataset

    dataset = write_dataset(tmp_path / "data", n_train=12, n_test=4, seed=2)
    out = tmp_path / "run"
    main([
        "train", "--train", str(dataset["train"]), "--epochs", "1", "--out", str(out), "--backbone", "radial",
        "--host-options", '{"cutoff": 4.0, "hidden_dim": 8}', "--no-progress", "--batch-size", "6",
        "--long-range-options", '{"smearing": 0.9, "charge_model": "latent"}', "--charge-model", "qeq", "--qeq-solver", "cg",
    ])
    model = latent_lr.load(out / "best_model.pt")
    assert isinstance(model.long_range.charge_head, QeqChargeHead)
    assert model.long_range.config.qeq_solver == "cg" and model.long_range.config.smearing == 0.9


def test_cli_accepts_no_redistribution_and_rejects_unknown_values():
    import argparse

    from latent_lr.cli import _add_training_arguments, _config_from

    parser = argparse.ArgumentParser()
    _add_training_arguments(parser, with_long_range=True)
    config = _config_from(parser.parse_args(["--charge-redistribution", "none"]))
    assert config.long_range_options == LongRangeConfig(charge_redistribution="none")
    with pytest.raises(SystemExit):
        parser.parse_args(["--charge-model", "eem"])


def test_auto_splits_a_mixed_batch_between_dense_and_cg(monkeypatch):
    import latent_lr.electrostatics.qeq

    monkeypatch.setattr(latent_lr.electrostatics.qeq, "DENSE_MAX_ATOMS", 5)
    structures = [molecule("CH3CH2OH"), molecule("H2O"), rattled_salt(), molecule("NH3")]
    data, chi, hardness = qeq_inputs(structures, [1.0, 0.0, -1.0, 0.5], seed=11)
    positions = data.positions.clone().requires_grad_()
    results = {}
    for solver in ("auto", "dense"):
        q, energy = solve(data, chi, hardness, solver, positions=positions)
        (gradient,) = torch.autograd.grad((energy.sum() + (q**3).sum()), positions)
        results[solver] = (q.detach(), energy.detach(), gradient)
    for a, b in zip(results["auto"], results["dense"]):
        torch.testing.assert_close(a, b, atol=1e-8, rtol=0)


@pytest.mark.parametrize("solver", ["dense", "cg"])
def test_qeq_crystal_stress_and_field_forces_match_finite_differences(solver):
    from ase.calculators.fd import calculate_numerical_forces, calculate_numerical_stress

    model = make_model(seed=12, charge_model="qeq", qeq_solver=solver).eval()
    atoms = rattled_salt()
    atoms.calc = latent_lr.Calculator(model)
    np.testing.assert_allclose(atoms.get_stress(), calculate_numerical_stress(atoms, 1e-5), atol=1e-8)
    atoms.info["external_field"] = np.array([0.03, -0.02, 0.05])
    atoms.calc = latent_lr.Calculator(model)
    np.testing.assert_allclose(atoms.get_forces(), calculate_numerical_forces(atoms, 1e-4), atol=1e-7)


def test_qeq_becs_obey_the_sum_rule_and_match_the_dipole_derivative(qeq_model):
    atoms = molecule("CH3CH2OH")
    atoms.info["charge"] = 1.0
    out = qeq_model(AtomsBatch.from_atoms(atoms), compute_bec=True)
    np.testing.assert_allclose(out["bec"].sum(0).numpy(), np.eye(3), atol=1e-10)
    step = 1e-5
    dipoles = []
    for sign in (1, -1):
        shifted = atoms.copy()
        shifted.positions[2, 0] += sign * step
        dipoles.append(qeq_model(AtomsBatch.from_atoms(shifted), compute_forces=False)["dipole"][0].numpy())
    numerical = (dipoles[0] - dipoles[1]) / (2 * step)
    np.testing.assert_allclose(out["bec"][2, :, 0].numpy(), numerical, atol=1e-8)
    assert np.abs(out["bec"][2].numpy() - out["charges"][2].item() * np.eye(3)).max() > 1e-3  # charge flow


def test_redistribution_with_qeq_is_a_clear_error():
    with pytest.raises(ValueError, match="applies to charge_model='latent' only"):
        make_model(charge_model="qeq", charge_redistribution="none")


def test_qeq_on_a_charged_slab_keeps_its_charge_and_exact_forces():
    from ase.calculators.fd import calculate_numerical_forces

    slab = rattled_salt()
    slab.pbc = [True, True, False]
    slab.cell[2] = [0.0, 0.0, 20.0]
    slab.center(axis=2)
    slab.info["charge"] = 0.5
    model = make_model(seed=3, charge_model="qeq").eval()
    out = model(AtomsBatch.from_atoms(slab), compute_forces=False)
    assert out["charges"].sum().item() == pytest.approx(0.5, abs=1e-10)
    slab.calc = latent_lr.Calculator(model)
    np.testing.assert_allclose(slab.get_forces(), calculate_numerical_forces(slab, 1e-4), atol=1e-7)


@pytest.mark.parametrize("solver", ["dense", "cg"])
def test_single_atom_ions_are_solved_alone_and_in_a_batch(solver):
    from ase import Atoms

    ion = Atoms("Na", positions=[[0.0, 0.0, 0.0]])
    data, chi, hardness = qeq_inputs([ion], [1.0], seed=1)
    q, energy = solve(data, chi, hardness, solver)
    self_hardness = K_E * np.sqrt(2 / np.pi)  # σ = 1 Å
    assert q.item() == pytest.approx(1.0, abs=1e-12)
    assert energy.item() == pytest.approx(chi.item() + 0.5 * (hardness.item() + self_hardness), abs=1e-10)
    model = make_model(seed=3, charge_model="qeq", qeq_solver=solver).train()
    ion.info["charge"] = 1.0
    out = model(AtomsBatch.from_atoms([ion, molecule("H2O")]))
    assert out["charges"][0].item() == pytest.approx(1.0, abs=1e-12)
    assert out["forces"][0].abs().max().item() < 1e-12


def test_qeq_polarizability_at_zero_field_includes_charge_flow(qeq_model):
    """∂μ/∂E at E = 0 must see the field shift of χ even though the field's value is zero."""
    atoms = molecule("H2O")  # in the yz plane: charge flow polarises it along y and z
    tensor = qeq_model(AtomsBatch.from_atoms(atoms), compute_polarizability=True)["polarizability"][0].detach()
    step, columns = 1e-3, []
    for axis in range(3):
        moments = []
        for sign in (1, -1):
            field = np.zeros(3)
            field[axis] = sign * step
            atoms.info["external_field"] = field
            moments.append(qeq_model(AtomsBatch.from_atoms(atoms), compute_forces=False)["dipole"][0].detach())
        columns.append((moments[0] - moments[1]) / (2 * step))
    numerical = torch.stack(columns, dim=1)
    assert float(numerical.abs().max()) > 1e-2
    torch.testing.assert_close(tensor, numerical, atol=1e-8, rtol=1e-6)
