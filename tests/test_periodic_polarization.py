"""Self-consistent latent polarisation in periodic cells (tin-foil Ewald sum of the dipole tensor).

References: the autograd Hessian of the engine's Coulomb energy with unit
charges (off-diagonal blocks of T, and the self-image blocks through a
two-charge limit), the analytic Lorentz self-image field 4πk_e/(3V) of a cubic
lattice, the open-boundary solution (molecule in a growing box, 1/L³), finite
differences of energies and moments, and the dense solve.
"""

import math

import numpy as np
import pytest
import torch
from ase.build import molecule
from ase.calculators.fd import calculate_numerical_forces, calculate_numerical_stress

import latent_lr
from latent_lr import AtomsBatch, coulomb_energy
from latent_lr.electrostatics.dipole_ewald import dipole_operator
from latent_lr.electrostatics.dipole_tensor import catastrophe_free_polarizability, damped_dipole_tensor
from latent_lr.polarizability import SAFE_FRACTION

from test_polarizability import FIELD, in_field, make_model, rattled_salt

K_E = latent_lr.COULOMB_CONSTANT
SIGMA = 0.8
CELL = torch.tensor([[4.0, 0.3, 0.0], [0.0, 4.5, 0.2], [0.1, 0.0, 5.0]], dtype=torch.float64)


def periodic_operator(positions, cell, accuracy, sigma=SIGMA):
    n = positions.shape[0]
    return dipole_operator(
        positions, cell[None], torch.tensor([True]), torch.zeros(n, dtype=torch.long),
        torch.tensor(sigma, dtype=torch.float64), accuracy,
    )


def unit_charge_hessian(positions, cell, accuracy):
    """(n, 3, n, 3) ∂²E/∂r_i∂r_j of the engine's Ewald energy with unit charges."""
    ones = torch.ones(positions.shape[0], dtype=torch.float64)
    energy = lambda x: coulomb_energy(  # noqa: E731
        x, ones, cell=cell, pbc=True, smearing=SIGMA, accuracy=accuracy, method="ewald"
    ).sum()
    return torch.autograd.functional.hessian(energy, positions)


@pytest.mark.parametrize("accuracy", [1e-6, 1e-10])
def test_off_diagonal_blocks_are_minus_the_hessian_of_the_coulomb_energy(accuracy):
    """E = ½ Σ' q_i q_j k_e ψ(r_ij + L): ∂²E/∂r_i∂r_j = -q_i q_j T_ij for i ≠ j (all images)."""
    rng = np.random.default_rng(0)
    positions = torch.tensor(rng.uniform(0.0, 4.0, size=(6, 3)))
    operator = periodic_operator(positions, CELL, accuracy)
    tensor = operator.dense(6).reshape(6, 3, 6, 3)
    hessian = unit_charge_hessian(positions, CELL, accuracy)
    off = ~torch.eye(6, dtype=torch.bool)
    difference = (tensor + hessian).permute(0, 2, 1, 3)[off].abs().max().item()
    print(f"\naccuracy {accuracy:g}: max |T_ij + H_ij| = {difference:.1e} (max |T| = {tensor.abs().max():.2f})")
    assert difference < 1e-12  # the same Ewald parameters and switches: equal to round-off
    torch.testing.assert_close(tensor, tensor.permute(2, 3, 0, 1), atol=1e-13, rtol=0)  # symmetric
    # matrix-free product = dense matrix
    p = torch.tensor(rng.normal(size=(6, 3)))
    torch.testing.assert_close(operator.apply(p), (operator.dense(6) @ p.reshape(-1)).reshape(6, 3), atol=1e-12, rtol=0)


def test_self_image_blocks_are_the_two_charge_limit_of_the_hessian():
    """T_ii = k_e Σ_{L≠0} ∇∇ψ(L): the (1, 2) Hessian block of unit charges at r and r + d, minus
    the L = 0 term k_e∇∇ψ(d), tends to T_ii as d → 0 (even in d; Richardson extrapolation)."""
    accuracy = 1e-10
    origin = torch.tensor([0.3, 1.0, 2.0], dtype=torch.float64)
    self_block = periodic_operator(origin[None], CELL, accuracy).dense(1)
    sigma = torch.tensor(SIGMA, dtype=torch.float64)

    def images(d):
        hessian = unit_charge_hessian(torch.stack([origin, origin + d]), CELL, accuracy)
        return -hessian[0, :, 1, :] - damped_dipole_tensor(d[None], sigma)[0]

    direction = torch.tensor([0.6, -0.5, 0.62], dtype=torch.float64)
    h = 0.05
    extrapolated = (4.0 * images(h * direction) - images(2 * h * direction)) / 3.0
    difference = (extrapolated - self_block).abs().max().item()
    print(f"\nself-image block vs Richardson limit of the Hessian: {difference:.1e} (|T_ii| = {self_block.abs().max():.2f})")
    assert difference < 2e-6  # measured 3.6e-7, an O(h⁴) error
    assert self_block.abs().max() > 0.3


@pytest.mark.parametrize("length", [6.0, 10.0])
def test_self_image_field_of_a_cubic_lattice_is_the_lorentz_field(length):
    """Tin-foil, cubic: the field at a dipole from its own images is 4π k_e p/(3V) (σ ≪ L)."""
    cell = torch.eye(3, dtype=torch.float64) * length
    block = periodic_operator(torch.tensor([[0.5, 1.0, 2.0]], dtype=torch.float64), cell, 1e-10).dense(1)
    expected = 4.0 * math.pi * K_E / (3.0 * length**3) * torch.eye(3, dtype=torch.float64)
    torch.testing.assert_close(block, expected, atol=1e-9 * expected.max().item(), rtol=0)


def test_periodic_operator_is_below_the_catastrophe_bound():
    """I - α T ⪰ (1 - 0.9) I at the cap α = 0.9/c for a dense, small periodic cell; 3x the cap fails."""
    rng = np.random.default_rng(2)
    cell = torch.tensor([[3.0, 0.2, 0.0], [0.0, 3.2, 0.1], [0.3, 0.0, 2.9]], dtype=torch.float64)
    positions = torch.tensor(rng.uniform(0.0, 3.0, size=(8, 3)))
    tensor = periodic_operator(positions, cell, 1e-6).dense(8)
    alpha = SAFE_FRACTION * catastrophe_free_polarizability(torch.tensor(SIGMA, dtype=torch.float64))
    eye = torch.eye(24, dtype=torch.float64)
    smallest = torch.linalg.eigvalsh(eye - alpha * tensor).min().item()
    print(f"\nperiodic: smallest eigenvalue of I - α_cap T = {smallest:.4f} (bound 0.1)")
    assert smallest >= 0.1 - 1e-9
    assert torch.linalg.eigvalsh(eye - 3.0 * alpha * tensor).min().item() < 0


# --- the model ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def sc_model():
    return make_model("self_consistent")


def boxed(atoms, length):
    atoms = atoms.copy()
    atoms.set_cell(np.eye(3) * length)
    atoms.center()
    atoms.pbc = True
    return atoms


def test_molecule_in_a_growing_box_approaches_the_open_solution(sc_model):
    """Images act through the Lorentz field ~ M/L³ (tin-foil), so Δp = p_box - p_open falls as 1/L³."""
    ethanol = molecule("CH3CH2OH")
    open_dipoles = sc_model(in_field(ethanol, FIELD), compute_forces=False)["induced_dipoles"].numpy()
    deviation = {}
    for length in (20.0, 40.0):
        out = sc_model(in_field(boxed(ethanol, length), FIELD), compute_forces=False)
        deviation[length] = np.abs(out["induced_dipoles"].numpy() - open_dipoles).max()
    print(f"\nmax |p_box - p_open|: L=20 Å {deviation[20.0]:.2e}, L=40 Å {deviation[40.0]:.2e} e·Å "
          f"(max |p| {np.abs(open_dipoles).max():.3f}); ratio {deviation[20.0] / deviation[40.0]:.2f} (1/L³: 8)")
    assert deviation[40.0] < 1e-3 * np.abs(open_dipoles).max()  # measured 3.6e-5 / 0.059 = 6e-4
    assert 6.5 < deviation[20.0] / deviation[40.0] < 9.0  # measured 8.46 (L³ Δp: 2.43 vs 2.30)


@pytest.mark.parametrize("structure", ["salt", "boxed-water"])
def test_periodic_forces_and_stress_are_minus_gradients_in_a_field(structure, sc_model):
    if structure == "salt":
        atoms = rattled_salt()
    else:
        atoms = boxed(molecule("H2O"), 7.0)
        atoms.rattle(0.05, seed=1)
    atoms.calc = latent_lr.Calculator(sc_model, external_field=FIELD)
    forces = atoms.get_forces()
    numerical = calculate_numerical_forces(atoms, 1e-4)
    stress, numerical_stress = atoms.get_stress(), calculate_numerical_stress(atoms, 1e-5)
    print(f"\n{structure}: max |F - F_FD| = {np.abs(forces - numerical).max():.1e} eV/Å, "
          f"max |σ - σ_FD| = {np.abs(stress - numerical_stress).max():.1e} eV/Å³")
    np.testing.assert_allclose(forces, numerical, atol=1e-7)
    np.testing.assert_allclose(stress, numerical_stress, atol=1e-8)


def test_periodic_polarisability_tensor_is_symmetric_psd_and_the_derivative_of_the_moment(sc_model):
    crystal = rattled_salt()
    volume = abs(np.linalg.det(crystal.cell.array))
    tensor = sc_model(in_field(crystal, FIELD), compute_polarizability=True)["polarizability"][0].numpy()
    np.testing.assert_allclose(tensor, tensor.T, atol=1e-10)
    assert np.linalg.eigvalsh(tensor).min() >= -1e-10
    assert np.trace(tensor) > 1e-3

    def moment(field):
        return sc_model(in_field(crystal, field), compute_forces=False)["polarization"][0].numpy() * volume

    step = 1e-3
    numerical = np.stack([(moment(FIELD + step * e) - moment(FIELD - step * e)) / (2 * step) for e in np.eye(3)], 1)
    print(f"\nperiodic SC: max |∂M/∂E - FD| = {np.abs(tensor - numerical).max():.1e}")
    np.testing.assert_allclose(tensor, numerical, atol=1e-9)


def test_cg_equals_dense_on_a_mixed_batch_and_batching_changes_nothing(sc_model):
    dense = make_model("self_consistent", polarizability_solver="dense")
    dense.load_state_dict(sc_model.state_dict())
    structures = [rattled_salt(), molecule("CH3CH2OH"), boxed(molecule("H2O"), 7.0)]
    for atoms in structures:
        atoms.info["external_field"] = FIELD
    data = AtomsBatch.from_atoms(structures)
    a = sc_model(data, compute_polarizability=True, compute_stress=True)
    b = dense(data, compute_polarizability=True, compute_stress=True)
    difference = (a["induced_dipoles"] - b["induced_dipoles"]).abs().max().item()
    print(f"\nmixed batch, CG vs dense: max |Δp| = {difference:.1e} e·Å")
    for key in ("induced_dipoles", "energy", "forces", "polarizability", "stress"):
        torch.testing.assert_close(a[key], b[key], atol=1e-9, rtol=0)
    # p solves p = α(E⁰ + T p), and differs from the one-step dipoles
    alpha, field, p = b["polarizabilities"], b["electric_field"], b["induced_dipoles"]
    assert (p - alpha[:, None] * field).abs().max().item() > 1e-4
    # one structure at a time gives the same
    start = 0
    for index, atoms in enumerate(structures):
        alone = sc_model(AtomsBatch.from_atoms(atoms))
        stop = start + len(atoms)
        torch.testing.assert_close(alone["induced_dipoles"], a["induced_dipoles"][start:stop], atol=1e-10, rtol=0)
        torch.testing.assert_close(alone["energy"][0], a["energy"][index], atol=1e-10, rtol=0)
        start = stop


def test_training_on_periodic_forces_through_cg_equals_dense():
    """Parameter gradients of a force loss on a crystal: CG (implicit derivatives) = dense solve."""
    gradients = {}
    for solver in ("cg", "dense"):
        model = make_model("self_consistent", seed=3, polarizability_solver=solver).train()
        model(in_field(rattled_salt(), FIELD))["forces"].pow(2).sum().backward()
        gradients[solver] = torch.cat([p.grad.flatten() for p in model.long_range.polarizability_head.parameters()])
    assert gradients["dense"].abs().max() > 0
    torch.testing.assert_close(gradients["cg"], gradients["dense"], atol=1e-9, rtol=1e-7)
