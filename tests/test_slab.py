"""Slabs, pbc = (True, True, False): Yeh–Berkowitz + Ballenegger–Arnold–Cerdà correction.

Independent reference: the Heyes–Barber–Clarke 2D Ewald sum (Parry, Surf. Sci.
49, 433 (1975); Heyes, Barber & Clarke, J. Chem. Soc. Faraday Trans. 2 73,
1485 (1977)), written below in numpy, with in-plane images only.  It is
checked to be independent of its own splitting parameter, including for a slab
with net charge (the limit the corrected 3D sum converges to).
"""

import numpy as np
import pytest
import torch
from scipy.special import erf, erfc, erfcx

from latent_lr import coulomb_energy
from latent_lr.electrostatics.coulomb import METHODS
from latent_lr.units import COULOMB_CONSTANT as KE

SLAB = torch.tensor([True, True, False])
A_VEC, B_VEC = np.array([7.0, 0.0, 0.0]), np.array([1.5, 6.5, 0.0])


def ewald_2d_matrix(positions, alpha, sigma=0.0):
    """(N, N) eV/e² matrix A of the 2D-periodic energy ½ qᵀAq in the plane of A_VEC, B_VEC (xy), open along z.

    Gaussian self-energies excluded (point-charge limit sigma = 0); A does not depend on the charges.
    """
    area = abs(np.cross(A_VEC, B_VEC)[2])
    n = len(positions)
    d = positions[None] - positions[:, None]
    rho, z = d[..., :2], d[..., 2]
    r_cut, n_img = 8.0 / alpha, 12
    real = np.zeros((n, n))
    for i in range(-n_img, n_img + 1):
        for j in range(-n_img, n_img + 1):
            r = np.linalg.norm(d + i * A_VEC + j * B_VEC, axis=-1)
            if i == 0 and j == 0:
                np.fill_diagonal(r, np.inf)
            kernel = erfc(alpha * r) / r
            if sigma > 0:
                kernel -= erfc(r / (np.sqrt(2) * sigma)) / r
            real += np.where(r < max(r_cut, 10 * sigma), kernel, 0.0)
    reciprocal_cell = 2 * np.pi * np.linalg.inv(np.array([A_VEC[:2], B_VEC[:2]])).T
    za, reciprocal = np.abs(z), np.zeros((n, n))
    for i in range(-25, 26):
        for j in range(-25, 26):
            g = i * reciprocal_cell[0] + j * reciprocal_cell[1]
            h = np.linalg.norm(g)
            if (i, j) == (0, 0) or h > 16 * alpha:
                continue
            x = h / (2 * alpha)
            # e^{h|z|} erfc(x + α|z|) in overflow-free form, plus e^{-h|z|} erfc(x - α|z|).
            terms = np.exp(-x * x - (alpha * za) ** 2) * erfcx(x + alpha * za) + np.exp(-h * za) * erfc(x - alpha * za)
            reciprocal += np.pi / area * np.cos(rho @ g) / h * terms
    plane = -2 * np.pi / area * (z * erf(alpha * z) + np.exp(-((alpha * z) ** 2)) / (alpha * np.sqrt(np.pi)))
    return KE * (real + reciprocal + plane - 2 * alpha / np.sqrt(np.pi) * np.eye(n))


def ewald_2d(positions, charges, alpha, sigma=0.0):
    """2D-periodic energy (eV) of charges (N,) e at positions (N, 3) Å (:func:`ewald_2d_matrix`)."""
    return 0.5 * charges @ ewald_2d_matrix(positions, alpha, sigma) @ charges


def random_slab(net_charge=0.0, n_atoms=8, seed=1):
    rng = np.random.default_rng(seed)
    while True:
        fractional = rng.uniform(size=(n_atoms, 2))
        positions = np.c_[fractional @ np.array([A_VEC[:2], B_VEC[:2]]), rng.uniform(0.0, 5.0, n_atoms)]
        d = positions[None] - positions[:, None]
        distances = [np.linalg.norm(d + i * A_VEC + j * B_VEC, axis=-1) for i in (-1, 0, 1) for j in (-1, 0, 1)]
        distances[4] += 10 * np.eye(n_atoms)
        if np.min(distances) > 1.2:
            break
    charges = rng.normal(size=n_atoms)
    return positions, charges - charges.mean() + net_charge / n_atoms


def slab_energy(positions, charges, height=6.0, sigma=0.0, accuracy=1e-8, pbc=SLAB, cell=None):
    cell = np.array([A_VEC, B_VEC, [0.0, 0.0, height]]) if cell is None else cell
    return coulomb_energy(
        torch.as_tensor(positions), torch.as_tensor(charges), cell=torch.as_tensor(cell),
        pbc=pbc, smearing=sigma, accuracy=accuracy,
    )


@pytest.mark.parametrize("net_charge", [0.0, 1.0])
def test_reference_does_not_depend_on_its_splitting_parameter(net_charge):
    positions, charges = random_slab(net_charge)
    assert ewald_2d(positions, charges, 0.4) == pytest.approx(ewald_2d(positions, charges, 0.65), rel=1e-11)


@pytest.mark.parametrize("sigma", [0.0, 0.8])
@pytest.mark.parametrize("net_charge", [0.0, 1.0])
def test_slab_energy_matches_2d_ewald_at_modest_vacuum(net_charge, sigma):
    positions, charges = random_slab(net_charge)
    reference = ewald_2d(positions, charges, 0.5, sigma)
    for accuracy, tolerance in [(1e-8, 1e-9), (1e-4, 1e-4)]:
        energy = slab_energy(positions, charges, sigma=sigma, accuracy=accuracy).item()
        assert energy == pytest.approx(reference, rel=tolerance)


@pytest.mark.parametrize("net_charge", [0.0, 1.0])
def test_plain_3d_sum_with_the_same_vacuum_is_far_off(net_charge):
    positions, charges = random_slab(net_charge)
    reference = ewald_2d(positions, charges, 0.5)
    for height in (20.0, 60.0):
        plain = slab_energy(positions, charges, height=height, pbc=True).item()
        corrected = slab_energy(positions, charges, height=height).item()
        assert abs(plain - reference) > 1e6 * abs(corrected - reference)


def test_energy_does_not_depend_on_the_given_height_or_translations():
    positions, charges = random_slab(1.0)
    energy = slab_energy(positions, charges).item()
    # A zero third vector (ASE's 2D cells) uses the atoms' extent as the height.
    assert slab_energy(positions, charges, height=0.0).item() == pytest.approx(energy, rel=1e-9)
    assert slab_energy(positions, charges, height=300.0).item() == pytest.approx(energy, rel=1e-9)
    for shift in ([2.3, -4.1, 0.0], [0.0, 0.0, 37.0], [0.3, 0.2, -11.0]):
        assert slab_energy(positions + shift, charges).item() == pytest.approx(energy, rel=1e-11)


def test_forces_at_modest_vacuum_match_the_large_vacuum_limit():
    positions, charges = random_slab(1.0)
    forces = []
    for height in (6.0, 300.0):
        pos = torch.tensor(positions, requires_grad=True)
        (gradient,) = torch.autograd.grad(slab_energy(pos, charges, height=height).sum(), pos)
        forces.append(-gradient.numpy())
    assert np.abs(forces[0] - forces[1]).max() < 1e-8 * np.abs(forces[1]).max()


def test_rotated_slab_with_the_open_axis_along_the_third_vector():
    positions, charges = random_slab(0.5)
    rotation = np.linalg.qr(np.random.default_rng(3).normal(size=(3, 3)))[0]
    cell = np.array([A_VEC, B_VEC, [0.0, 0.0, 6.0]])
    rotated = slab_energy(positions @ rotation, charges, cell=cell @ rotation).item()
    assert rotated == pytest.approx(slab_energy(positions, charges).item(), rel=1e-10)


@pytest.mark.parametrize("sigma", [0.0, 0.8])
def test_forces_and_in_plane_stress_match_finite_differences(sigma):
    positions, charges = random_slab(1.0)
    cell = torch.tensor(np.array([A_VEC, B_VEC, [0.0, 0.0, 6.0]]))
    pos = torch.tensor(positions, requires_grad=True)
    strain = torch.zeros(3, 3, dtype=torch.float64, requires_grad=True)
    stretch = torch.eye(3, dtype=torch.float64) + strain

    def energy(p, c):
        return coulomb_energy(p, torch.tensor(charges), cell=c, pbc=SLAB, smearing=sigma, accuracy=1e-12).sum()

    grad_pos, grad_strain = torch.autograd.grad(energy(pos @ stretch, cell @ stretch), (pos, strain))
    h = 1e-5
    for atom, axis in [(0, 0), (3, 2), (5, 1)]:
        step = torch.zeros_like(pos)
        step[atom, axis] = h
        fd = (energy(pos.detach() + step, cell) - energy(pos.detach() - step, cell)) / (2 * h)
        assert grad_pos[atom, axis].item() == pytest.approx(fd.item(), rel=1e-6, abs=1e-8)
    for i, j in [(0, 0), (0, 1), (1, 1)]:
        step = torch.zeros(3, 3, dtype=torch.float64)
        step[i, j] = h
        fd = (
            energy(pos.detach() @ (torch.eye(3, dtype=torch.float64) + step), cell @ (torch.eye(3, dtype=torch.float64) + step))
            - energy(pos.detach() @ (torch.eye(3, dtype=torch.float64) - step), cell @ (torch.eye(3, dtype=torch.float64) - step))
        ) / (2 * h)
        assert grad_strain[i, j].item() == pytest.approx(fd.item(), rel=1e-6, abs=1e-8)


def test_slab_in_a_batch_with_bulk_and_molecule_equals_separate_calls():
    positions, charges = random_slab(0.0)
    rng = np.random.default_rng(7)
    bulk, bulk_charges = rng.uniform(0, 8, (6, 3)), np.array([1.0, -1, 1, -1, 0.5, -0.5])
    cells = torch.tensor(np.array([[A_VEC, B_VEC, [0, 0, 6.0]], np.eye(3) * 8.0, np.zeros((3, 3))]))
    molecule = np.array([[0.0, 0, 0], [1.5, 0, 0]])
    batched = coulomb_energy(
        torch.tensor(np.vstack([positions, bulk, molecule])),
        torch.tensor(np.concatenate([charges, bulk_charges, [0.4, -0.4]])),
        cell=cells,
        pbc=torch.tensor([[True, True, False], [True] * 3, [False] * 3]),
        batch=torch.tensor([0] * 8 + [1] * 6 + [2] * 2),
        accuracy=1e-8,
    )
    separate = [
        slab_energy(positions, charges).item(),
        coulomb_energy(torch.tensor(bulk), torch.tensor(bulk_charges), cell=cells[1], pbc=True, accuracy=1e-8).item(),
        -KE * 0.16 / 1.5,
    ]
    np.testing.assert_allclose(batched.numpy(), separate, rtol=1e-10)


def test_tilted_third_vector_and_misplaced_open_axis_are_rejected():
    positions, charges = random_slab(0.0)
    with pytest.raises(ValueError, match="not perpendicular"):
        slab_energy(positions, charges, cell=np.array([A_VEC, B_VEC, [1.0, 0.0, 6.0]]))
    with pytest.raises(ValueError, match="pbc = \\(True, True, False\\)"):
        slab_energy(positions, charges, pbc=torch.tensor([True, False, True]))
    with pytest.raises(ValueError, match="degenerate periodic plane"):
        slab_energy(positions, charges, cell=np.array([A_VEC, 2 * A_VEC, [0.0, 0.0, 6.0]]))


@pytest.mark.parametrize("method", [m for m in ("ewald", "pme") if m in METHODS])
def test_every_periodic_method_applies_the_correction(method):
    positions, charges = random_slab(1.0)
    reference = ewald_2d(positions, charges, 0.5)
    energy = coulomb_energy(
        torch.tensor(positions), torch.tensor(charges), cell=torch.tensor(np.array([A_VEC, B_VEC, [0, 0, 6.0]])),
        pbc=SLAB, accuracy=1e-6, method=method,
    ).item()
    assert energy == pytest.approx(reference, rel=1e-6)


def test_two_slabs_in_one_batch_equal_separate_calls_against_2d_ewald():
    """More than one slab per call (it once failed in the plane check's broadcasting)."""
    neutral, charged = random_slab(0.0, seed=2), random_slab(1.0, seed=3)
    cell = np.array([A_VEC, B_VEC, [0.0, 0.0, 6.0]])
    batched = coulomb_energy(
        torch.tensor(np.vstack([neutral[0], charged[0]])), torch.tensor(np.concatenate([neutral[1], charged[1]])),
        cell=torch.tensor(np.stack([cell, cell])), pbc=torch.tensor([[True, True, False]] * 2),
        batch=torch.tensor([0] * 8 + [1] * 8), accuracy=1e-8,
    )
    reference = [ewald_2d(*neutral, alpha=0.6), ewald_2d(*charged, alpha=0.6)]
    np.testing.assert_allclose(batched.numpy(), reference, rtol=1e-9)
