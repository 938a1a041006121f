"""The steps of LongRangeModel.forward, each alone.

References: finite differences of an analytic pair energy (forces) and
finite strains of it (stress) computed without autograd; the analytic
Jacobian of the strain map; explicit per-atom sums.
"""

import itertools

import numpy as np
import pytest
import torch

from latent_lr import AtomsBatch
from latent_lr.derivatives import forces_and_stress, stress_requested
from latent_lr.energy_terms import field_energy, reference_energy
from latent_lr.properties import cell_moment, polarizability_tensor
from latent_lr.strain import StrainedGeometry, apply_strain

DTYPE = torch.float64
WIDTH = 1.1  # Å, Gaussian pair potential width
IMAGES = 3  # images summed along each periodic axis (converged: e^(-(3·4.5)^2/2.42) ~ 1e-33)


def pair_energy(positions: np.ndarray, cell: np.ndarray, pbc: tuple[bool, bool, bool]) -> float:
    """E = Σ_{i<j, images} A exp(-r²/2w²) + k/2 Σ (r - r0)² smooth pair energy, eV (numpy, no autograd).

    Gaussian repulsion plus a harmonic spring times a Gaussian envelope, over the
    periodic images along the periodic axes only (fixed image set: smooth in
    positions and cell).
    """
    ranges = [range(-IMAGES, IMAGES + 1) if p else range(1) for p in pbc]
    energy = 0.0
    for shift in itertools.product(*ranges):
        offset = np.asarray(shift, dtype=float) @ cell
        for i in range(len(positions)):
            for j in range(len(positions)):
                if i == j and not any(shift):
                    continue
                r = np.linalg.norm(positions[j] + offset - positions[i])
                envelope = np.exp(-r**2 / (2 * WIDTH**2))
                energy += 0.5 * (2.0 * envelope + 0.3 * (r - 1.5) ** 2 * envelope)
    return energy


def pair_energy_torch(positions: torch.Tensor, cell: torch.Tensor, pbc: tuple[bool, bool, bool]) -> torch.Tensor:
    """The same energy as :func:`pair_energy`, differentiable, eV (0-d tensor)."""
    ranges = [range(-IMAGES, IMAGES + 1) if p else range(1) for p in pbc]
    shifts = torch.tensor(list(itertools.product(*ranges)), dtype=DTYPE)
    offsets = shifts @ cell
    vectors = positions[None, None, :, :] + offsets[:, None, None, :] - positions[None, :, None, :]
    n = positions.shape[0]
    self_pair = (shifts.abs().sum(dim=1) == 0)[:, None, None] & torch.eye(n, dtype=torch.bool)[None]
    safe = torch.where(self_pair[..., None], torch.ones_like(vectors), vectors)
    r = safe.norm(dim=-1)
    envelope = torch.exp(-r**2 / (2 * WIDTH**2))
    pair = 0.5 * (2.0 * envelope + 0.3 * (r - 1.5) ** 2 * envelope)
    return torch.where(self_pair, torch.zeros_like(pair), pair).sum()


def structures():
    """A crystal (triclinic), a slab (open along z) and an open cluster, with their pbc."""
    rng = np.random.default_rng(3)
    crystal_cell = np.array([[4.5, 0.0, 0.0], [0.7, 4.8, 0.0], [0.3, -0.4, 5.1]])
    slab_cell = np.array([[4.6, 0.0, 0.0], [0.9, 4.4, 0.0], [0.0, 0.0, 9.0]])
    return [
        (rng.uniform(0, 4, (4, 3)), crystal_cell, (True, True, True)),
        (rng.uniform(0, 3, (3, 3)) + [0, 0, 3], slab_cell, (True, True, False)),
        (rng.uniform(0, 2.5, (3, 3)), np.zeros((3, 3)), (False, False, False)),
    ]


def numerical_forces(positions, cell, pbc, h=1e-5):
    forces = np.zeros_like(positions)
    for i, a in itertools.product(range(len(positions)), range(3)):
        plus, minus = positions.copy(), positions.copy()
        plus[i, a] += h
        minus[i, a] -= h
        forces[i, a] = -(pair_energy(plus, cell, pbc) - pair_energy(minus, cell, pbc)) / (2 * h)
    return forces


def numerical_stress(positions, cell, pbc, h=1e-5):
    """(1/V) dE/dε_ab by central finite symmetric strains of positions and cell."""
    stress = np.zeros((3, 3))
    volume = abs(np.linalg.det(cell))
    for a, b in itertools.product(range(3), range(3)):
        energies = []
        for sign in (1, -1):
            strain = np.eye(3)
            strain[a, b] += sign * h / 2
            strain[b, a] += sign * h / 2
            energies.append(pair_energy(positions @ strain, cell @ strain, pbc))
        stress[a, b] = (energies[0] - energies[1]) / (2 * h * volume)
    return stress


def batched(items):
    positions = torch.tensor(np.concatenate([p for p, _, _ in items]), dtype=DTYPE)
    cell = torch.tensor(np.stack([c for _, c, _ in items]), dtype=DTYPE)
    pbc = torch.tensor([p for _, _, p in items])
    batch = torch.cat([torch.full((len(p),), k) for k, (p, _, _) in enumerate(items)])
    return positions, cell, pbc, batch


def test_forces_and_stress_of_an_analytic_pair_energy_match_finite_differences():
    items = structures()
    positions, cell, pbc, batch = batched(items)
    leaf = positions.clone().requires_grad_(True)
    strain = torch.zeros(len(items), 3, 3, dtype=DTYPE, requires_grad=True)
    strained_positions, strained_cell = apply_strain(leaf, cell, batch, strain)
    energy = torch.stack([
        pair_energy_torch(strained_positions[batch == k], strained_cell[k], items[k][2]) for k in range(len(items))
    ])
    periodic, slab = pbc.all(dim=1), (pbc == torch.tensor([True, True, False])).all(dim=1)
    out = forces_and_stress(energy, leaf, strain, cell, periodic, slab)
    for k, (p, c, flags) in enumerate(items):
        np.testing.assert_allclose(out["forces"][batch == k].numpy(), numerical_forces(p, c, flags), atol=1e-8)
    np.testing.assert_allclose(out["stress"][0].numpy(), numerical_stress(*items[0]), atol=1e-9)
    # Slab: in-plane components from finite in-plane strains (normal along z), the rest zero.
    slab_reference = numerical_stress(*items[1])
    slab_reference[2, :] = slab_reference[:, 2] = 0.0
    np.testing.assert_allclose(out["stress"][1].numpy(), slab_reference, atol=1e-9)
    assert abs(numerical_stress(*items[1])[:2, :2]).max() > 1e-4  # the slab's in-plane stress is not trivially zero
    np.testing.assert_array_equal(out["stress"][2].numpy(), np.zeros((3, 3)))


def test_forces_and_stress_optional_outputs_and_unused_inputs():
    positions = torch.zeros(2, 3, dtype=DTYPE, requires_grad=True)
    strain = torch.zeros(1, 3, 3, dtype=DTYPE, requires_grad=True)
    cell, flags = 5.0 * torch.eye(3, dtype=DTYPE)[None], torch.tensor([True])
    energy = (positions**2).sum()[None] + 1.0
    assert forces_and_stress(energy, None, None, cell, flags, ~flags) == {}
    out = forces_and_stress(energy, positions, strain, cell, flags, ~flags)
    assert set(out) == {"forces", "stress"}
    np.testing.assert_array_equal(out["stress"].numpy(), np.zeros((1, 3, 3)))  # E does not depend on ε
    assert not out["forces"].requires_grad


def test_stress_requested_default_and_zero_height_slab():
    cell = torch.stack([torch.eye(3, dtype=DTYPE), torch.diag(torch.tensor([3.0, 3.0, 0.0], dtype=DTYPE))])
    periodic, slab = torch.tensor([False, False]), torch.tensor([False, True])
    assert stress_requested(None, cell, periodic, slab) is False  # the slab has no volume
    assert stress_requested(None, cell, torch.tensor([True, False]), slab) is True
    assert stress_requested(False, cell, periodic, slab) is False
    with pytest.raises(ValueError, match="third cell vector is zero"):
        stress_requested(True, cell, periodic, slab)


def test_zero_strain_leaves_the_geometry_unchanged_and_its_jacobian_is_r_delta():
    positions, cell, pbc, batch = batched(structures())
    data = AtomsBatch(positions, torch.ones(len(batch), dtype=torch.long), cell, pbc, batch,
                      torch.zeros(3, dtype=DTYPE), torch.zeros(3, 3, dtype=DTYPE))
    strained = StrainedGeometry.of(data, positions_grad=True, strain_grad=True)
    assert strained.positions.is_leaf and strained.strain.is_leaf
    assert strained.positions.requires_grad and strained.strain.requires_grad
    torch.testing.assert_close(strained.geometry.positions, positions, rtol=0, atol=0)
    torch.testing.assert_close(strained.geometry.cell, cell, rtol=0, atol=0)
    assert strained.geometry.external_field is data.external_field
    # ∂r'_ib/∂ε_(s)ac = r_ia δ_bc δ_(s, structure of i); ∂h'_(s)kb/∂ε_(s)ac = h_(s)ka δ_bc.
    jac_r = torch.autograd.functional.jacobian(
        lambda e: apply_strain(positions, cell, batch, e)[0], torch.zeros(3, 3, 3, dtype=DTYPE)
    )
    jac_h = torch.autograd.functional.jacobian(
        lambda e: apply_strain(positions, cell, batch, e)[1], torch.zeros(3, 3, 3, dtype=DTYPE)
    )
    eye = np.eye(3)
    expected_r = np.zeros((len(batch), 3, 3, 3, 3))
    for i, s in enumerate(batch.tolist()):
        expected_r[i, :, s] = np.einsum("a,bc->bac", positions[i].numpy(), eye)
    expected_h = np.zeros((3, 3, 3, 3, 3, 3))
    for s in range(3):
        expected_h[s, :, :, s] = np.einsum("ka,bc->kbac", cell[s].numpy(), eye)
    np.testing.assert_allclose(jac_r.numpy(), expected_r, atol=1e-15)
    np.testing.assert_allclose(jac_h.numpy(), expected_h, atol=1e-15)
    no_grad = StrainedGeometry.of(data, positions_grad=False, strain_grad=False)
    assert not no_grad.positions.requires_grad and not no_grad.strain.requires_grad


def test_reference_energy_adds_the_sum_over_atoms_of_e_ref_z():
    table = torch.linspace(-3.0, 2.0, 119, dtype=DTYPE)
    numbers = torch.tensor([1, 8, 1, 11, 17, 6])
    batch = torch.tensor([0, 0, 0, 1, 1, 2])
    expected = [table[1] + table[8] + table[1], table[11] + table[17], table[6], 0.0]
    np.testing.assert_allclose(reference_energy(table, numbers, batch, 4).numpy(), np.array(expected, dtype=float))


def test_field_energy_is_minus_charge_dipole_dot_field():
    charges = torch.tensor([0.5, -0.2, -0.3, 1.0], dtype=DTYPE)
    positions = torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.0, 0.5], [2.0, 2.0, 0.0], [3.0, -1.0, 1.0]], dtype=DTYPE)
    batch = torch.tensor([0, 0, 0, 1])
    field = torch.tensor([[0.1, -0.2, 0.3], [0.0, 0.5, 0.0]], dtype=DTYPE)
    expected = [
        -sum(float(charges[i] * positions[i] @ field[0]) for i in range(3)),
        -float(charges[3] * positions[3] @ field[1]),
    ]
    np.testing.assert_allclose(field_energy(charges, positions, batch, field).numpy(), expected, rtol=1e-14)


def test_polarizability_tensor_of_a_linear_moment_is_its_matrix():
    field = torch.zeros(2, 3, dtype=DTYPE, requires_grad=True)
    alpha = torch.tensor([[[1.0, 0.2, 0.0], [0.2, 2.0, 0.1], [0.0, 0.1, 3.0]],
                          [[0.5, 0.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, 0.7]]], dtype=DTYPE)
    moment = torch.einsum("bij,bj->bi", alpha, field) + 0.3
    np.testing.assert_allclose(polarizability_tensor(moment, field).numpy(), alpha.numpy(), rtol=1e-15)
    constant = torch.ones(2, 3, dtype=DTYPE)
    np.testing.assert_array_equal(polarizability_tensor(constant, field).numpy(), np.zeros((2, 3, 3)))


def test_cell_moment_is_volume_times_polarisation_for_crystals_only():
    cell = torch.stack([torch.diag(torch.tensor([2.0, 3.0, 4.0], dtype=DTYPE)), torch.zeros(3, 3, dtype=DTYPE)])
    dipole = torch.tensor([[9.0, 9.0, 9.0], [1.0, 2.0, 3.0]], dtype=DTYPE)
    polarisation = torch.tensor([[0.1, 0.2, 0.3], [7.0, 7.0, 7.0]], dtype=DTYPE)
    moment = cell_moment(dipole, polarisation, cell, torch.tensor([True, False]))
    np.testing.assert_allclose(moment.numpy(), [[2.4, 4.8, 7.2], [1.0, 2.0, 3.0]], rtol=1e-14)
