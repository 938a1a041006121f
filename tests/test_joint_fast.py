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

    def counted_frozen(self, *args, **options):
        builds["coulomb"] += 1
        return frozen(self, *args, **options)

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


def deferred_outputs(problem, deferred, total_charge, field, rtol=1e-12):
    """Energy, forces, a charge–dipole vector–Jacobian product, dE/dQ, dE/dE_ext and a Hessian–vector
    product along a fixed displacement, from one path (default or deferred)."""
    positions, cell, pbc, batch, chi, hardness, alpha = problem
    positions = positions.clone().requires_grad_()
    total = total_charge.clone().requires_grad_()
    field = field.clone().requires_grad_()
    record = SolveStatistics()
    options = dict(accuracy=1e-6, rtol=rtol, deferred=deferred, statistics=record)
    charges, dipoles, energy = joint.equilibrate_charges_and_dipoles(
        chi, hardness, alpha, positions, cell, pbc, batch, total, SIGMA, field, **options
    )
    first_order = torch.autograd.grad(energy.sum(), (positions, total, field), retain_graph=True)
    if deferred and not bool(field.any()):  # Hellmann–Feynman: the forward solve only, no adjoint
        assert len(record.iterations) == 1, record.iterations
    gradient, total_gradient, field_gradient = torch.autograd.grad(energy.sum(), (positions, total, field), create_graph=True)
    for exact, first in zip((gradient, total_gradient, field_gradient), first_order):
        torch.testing.assert_close(first, exact.detach(), atol=1e-8, rtol=1e-8)
    direction = torch.linspace(-1.0, 1.0, positions.numel(), dtype=torch.float64).reshape(positions.shape)
    (hessian_direction,) = torch.autograd.grad((gradient * direction).sum(), positions, retain_graph=True)
    weights = torch.linspace(0.5, 1.5, 4 * len(chi), dtype=torch.float64).reshape(-1, 4)
    packed = torch.cat([charges[:, None], dipoles], 1)
    (vjp,) = torch.autograd.grad((weights * packed).sum(), positions)
    return energy.detach(), -gradient.detach(), vjp, total_gradient.detach(), field_gradient.detach(), hessian_direction


@pytest.mark.parametrize("geometry,applied", [("periodic", 0.0), ("periodic", 1.0), ("open", 1.0)])
def test_deferred_joint_derivatives_equal_the_exact_implicit_path_and_finite_differences(geometry, applied):
    """MD mode (``deferred=True``): Hellmann–Feynman forces, dE/dQ from the multiplier, exact Born-charge-like
    products and Hessians through the re-run solve, all equal to the eager implicit path; forces also
    equal a central finite difference of the deferred energy."""
    positions, cell, pbc, batch, chi, hardness, alpha = salt_box(1)
    if geometry == "open":
        pbc = torch.zeros(1, 3, dtype=torch.bool)
    problem = (positions, cell, pbc, batch, chi, hardness, alpha)
    total = torch.tensor([0.7], dtype=torch.float64)
    field = applied * torch.tensor([[0.02, -0.01, 0.03]], dtype=torch.float64)
    reference = deferred_outputs(problem, False, total, field)
    fast = deferred_outputs(problem, True, total, field)
    for got, want in zip(fast, reference):
        torch.testing.assert_close(got, want, atol=1e-8, rtol=1e-8)
    step, atom = 1e-4, 3
    energies = []
    for sign in (1.0, -1.0):
        moved = positions.clone()
        moved[atom, 1] += sign * step
        _, _, energy = joint.equilibrate_charges_and_dipoles(
            chi, hardness, alpha, moved, cell, pbc, batch, total, SIGMA, field, accuracy=1e-6, rtol=1e-12,
            deferred=True,
        )
        energies.append(float(energy.sum()))
    finite_difference = -(energies[0] - energies[1]) / (2 * step)
    assert abs(finite_difference - float(fast[1][atom, 1])) < 1e-6 * max(1.0, abs(finite_difference))


@pytest.mark.parametrize("chunk", [64, 1024])
def test_one_density_mesh_product_equals_the_separate_charge_and_dipole_meshes(monkeypatch, chunk):
    """The frozen joint product on PME cells sums charges and dipoles on one mesh (one FFT pair, the
    Coulomb operator's mesh part left out); it must equal the product with separate meshes, and its float32
    form (MD tolerances) must stay within single-precision round-off.  The separable form spreads and gathers
    ``chunk`` atoms at a time (330 atoms: several passes, or one)."""
    from latent_lr.demo import water_like_box
    from latent_lr.electrostatics import dipole_mesh
    from latent_lr.electrostatics import EngineState
    from latent_lr.electrostatics.coulomb import PME_MIN_ATOMS

    positions, _, cell = water_like_box(110, 0)
    n = positions.shape[0]
    assert n >= PME_MIN_ATOMS
    positions, cell = positions.double(), cell.double()[None]
    pbc, batch = torch.ones(1, 3, dtype=torch.bool), torch.zeros(n, dtype=torch.long)
    rng = np.random.default_rng(0)
    hardness = torch.as_tensor(rng.uniform(1.0, 3.0, n))
    scale = torch.as_tensor(rng.uniform(0.1, 0.8, n) * float(catastrophe_free_polarizability(SIGMA))).sqrt()
    v = torch.as_tensor(rng.normal(size=(n, 4)))

    def product(precision=None, folded=True, separable=False, accuracy=1e-5):
        operator = joint._JointOperator(pbc, batch, 1, accuracy, EngineState())
        operator.charges.product_precision = precision
        # refinement_pays picks the separable form (few exact products); forced either way here
        monkeypatch.setattr(joint._Geometry, "refinement_pays", lambda *args: separable)
        monkeypatch.setattr(dipole_mesh, "SUPPORT_CHUNK_ATOMS", chunk)
        if not folded:
            monkeypatch.setattr(joint._JointOperator, "_folded_meshes", lambda *args: None)
        else:
            meshes = operator._folded_meshes(operator.dipoles(positions, cell, SIGMA), cell, SIGMA)
            kind = joint.SeparableJointMesh if separable else joint.FrozenJointMesh
            assert meshes is not None and all(type(mesh) is kind for mesh in meshes)
        apply = operator.frozen(positions, cell, SIGMA, hardness, scale)
        result = apply(v)
        kept = result.clone()
        # a second product (reused buffers) is linear in v and leaves the first result untouched
        combined, expected = apply(v.flip(0) - 2.0 * v), apply(v.flip(0)) - 2.0 * kept
        assert float((combined - expected).norm() / expected.norm()) < (1e-6 if precision else 1e-12)
        assert torch.equal(result, kept)
        monkeypatch.undo()
        return result

    separate, one_mesh, single = product(folded=False), product(), product(torch.float32)
    torch.testing.assert_close(one_mesh, separate, rtol=1e-10, atol=1e-10)
    error = float((single - separate).norm() / separate.norm())
    assert 1e-10 < error < 1e-5, error
    torch.testing.assert_close(product(separable=True), separate, rtol=1e-10, atol=1e-10)
    coarse = product(folded=False, accuracy=3e-2)  # order-4 splines: the fused multiply-add spreading
    from latent_lr.electrostatics.dipole_mesh import SMALL_STENCIL

    assert SMALL_STENCIL >= 4**3
    torch.testing.assert_close(product(accuracy=3e-2), coarse, rtol=1e-10, atol=1e-10)
    error = float((product(torch.float32, separable=True) - separate).norm() / separate.norm())
    assert 1e-10 < error < 1e-5, error


def test_mesh_dipole_energy_equals_the_products_and_their_position_derivative():
    """DipoleMesh.dipole_energy (separable spreading, one energy) against the field/potential products it
    replaces in the energy, −pᵀG_rec q − ½pᵀT_rec p = −½(pᵀF + qᵀΦ), in value and in its position gradient."""
    from latent_lr.demo import water_like_box
    from latent_lr.electrostatics.dipole_ewald import dipole_operator

    positions, _, cell = water_like_box(110, 1)
    n = positions.shape[0]
    cell = cell.double()[None]
    rng = np.random.default_rng(3)
    q, p = torch.as_tensor(rng.normal(size=n)), torch.as_tensor(0.1 * rng.normal(size=(n, 3)))
    results = []
    for energy_of in ("products", "dipole_energy"):
        x = positions.double().clone().requires_grad_()
        operator = dipole_operator(
            x, cell, torch.ones(1, dtype=torch.bool), torch.zeros(n, dtype=torch.long), SIGMA, 1e-5, method="pme"
        )
        (mesh,) = operator.meshes
        if energy_of == "products":
            field, potential = mesh.joint_products(q, p)
            energy = -0.5 * ((p * field).sum() + (q * potential).sum())
        else:
            energy = mesh.dipole_energy(q, p)
        (gradient,) = torch.autograd.grad(energy, x)
        results.append((energy.detach(), gradient))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-9, atol=1e-10)


def test_one_mesh_energy_of_charges_and_dipoles_equals_the_engine_energy_plus_the_dipole_increment(monkeypatch):
    """Where the engine's Coulomb mesh is the dipoles' one, ½yᵀHy takes one mesh energy of the total density
    and the engine's energy without its mesh part; it must equal E_coul (with its mesh) plus
    DipoleMesh.dipole_energy in value and in the position, charge and cell gradients."""
    from latent_lr.demo import water_like_box
    from latent_lr.electrostatics import EngineState
    from latent_lr.electrostatics.coulomb import PME_MIN_ATOMS

    positions, _, cell = water_like_box(110, 2)
    n = positions.shape[0]
    assert n >= PME_MIN_ATOMS
    rng = np.random.default_rng(6)
    hardness = torch.as_tensor(rng.uniform(1.0, 3.0, n))
    scale = torch.as_tensor(rng.uniform(0.1, 0.8, n) * float(catastrophe_free_polarizability(SIGMA))).sqrt()
    y = torch.as_tensor(rng.normal(size=(n, 4)))
    pbc, batch = torch.ones(1, 3, dtype=torch.bool), torch.zeros(n, dtype=torch.long)
    results = {}
    for shared in (True, False):
        x = positions.double().clone().requires_grad_()
        box = cell.double()[None].clone().requires_grad_()
        charges = y.clone().requires_grad_()
        operator = joint._JointOperator(pbc, batch, 1, 1e-5, EngineState())
        assert operator._shares_meshes(operator.dipoles(x, box, SIGMA), box, SIGMA)
        if not shared:
            monkeypatch.setattr(joint._JointOperator, "_shares_meshes", lambda *args: False)
        energy = operator.half_quadratic(charges, x, box, SIGMA, hardness, scale).sum()
        results[shared] = (energy.detach(), *torch.autograd.grad(energy, (x, charges, box)))
        monkeypatch.undo()
    for got, want in zip(results[True], results[False]):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_dense_product_of_open_batches_equals_the_pair_product(monkeypatch):
    """Open batches (MD of molecules, inference) apply H in CG by one batched dense product assembled from
    the same pair kernels, tensors and fields; it must equal the pair-by-pair product."""
    from latent_lr.demo import water_like_box
    from latent_lr.electrostatics import EngineState

    parts = [water_like_box(n, seed)[0].double() for n, seed in ((7, 0), (4, 1))]
    positions = torch.cat(parts)
    batch = torch.cat([torch.full((len(p),), i, dtype=torch.long) for i, p in enumerate(parts)])
    n = len(batch)
    cell, pbc = torch.eye(3, dtype=torch.float64).repeat(2, 1, 1), torch.zeros(2, 3, dtype=torch.bool)
    rng = np.random.default_rng(4)
    hardness = torch.as_tensor(rng.uniform(1.0, 3.0, n))
    scale = torch.as_tensor(rng.uniform(0.1, 0.8, n) * float(catastrophe_free_polarizability(SIGMA))).sqrt()
    v = torch.as_tensor(rng.normal(size=(n, 4)))

    def product(limit):
        monkeypatch.setattr(joint, "DENSE_OPEN_ENTRIES", limit)
        operator = joint._JointOperator(pbc, batch, 2, 1e-6, EngineState())
        return operator.frozen(positions, cell, SIGMA, hardness, scale)(v)

    torch.testing.assert_close(product(2**25), product(0), rtol=1e-12, atol=1e-12)
