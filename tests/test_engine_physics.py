"""The electrostatics engine against literature constants, pymatgen, closed forms and
finite differences.  Every reference here is computed without latent_lr."""

import math

import numpy as np
import pytest
import torch
from ase.build import bulk
from scipy.special import erf

import latent_lr
from latent_lr import COULOMB_CONSTANT as KE
from latent_lr import coulomb_energy

# Madelung constants referred to the nearest cation-anion distance, per formula unit:
# E = -M k_e |z+ z-| / r_nn.  NaCl, CsCl, zincblende: Glasser & Zucker (1980), Sakamoto
# (1958); fluorite: Sherman, Chem. Rev. 11, 93 (1932), quoted to 6 digits.
MADELUNG = [
    ("rocksalt", "NaCl", 1.747564594633, False, 1e-6),
    ("rocksalt", "NaCl", 1.747564594633, True, 1e-6),
    ("cesiumchloride", "CsCl", 1.762674773070, False, 1e-6),
    ("zincblende", "ZnS", 1.638055053388, False, 1e-6),
    ("zincblende", "ZnS", 1.638055053388, True, 1e-6),
    ("fluorite", "CaF2", 2.51939, False, 3e-6),
]


def nearest_distance(atoms, charges):
    d = atoms.get_all_distances(mic=True)
    return d[np.not_equal.outer(np.sign(charges), np.sign(charges))].min()


@pytest.mark.parametrize("kind,formula,reference,cubic,tolerance", MADELUNG)
@pytest.mark.parametrize("a", [4.2, 5.64, 7.1])
def test_madelung_constants(kind, formula, reference, cubic, tolerance, a):
    atoms = bulk(formula, kind, a=a, cubic=cubic)
    cation = atoms.numbers == atoms.numbers[0]
    z_cation = 2.0 if formula == "CaF2" else 1.0
    charges = np.where(cation, z_cation, -1.0)
    energy = coulomb_energy(
        torch.tensor(atoms.positions), torch.tensor(charges), cell=torch.tensor(atoms.cell.array),
        pbc=True, accuracy=1e-8,
    ).item()
    formula_units = cation.sum()
    madelung = -energy / formula_units * nearest_distance(atoms, charges) / (KE * z_cation)
    assert madelung == pytest.approx(reference, rel=tolerance)


def random_cell(rng, n_atoms, neutral=True):
    while True:
        cell = np.diag(rng.uniform(7, 10, 3)) + np.triu(rng.uniform(-2.5, 2.5, (3, 3)), 1)
        cell = cell @ np.linalg.qr(rng.normal(size=(3, 3)))[0]
        positions = rng.uniform(size=(n_atoms, 3)) @ cell
        import ase

        atoms = ase.Atoms(positions=positions, cell=cell, pbc=True)
        if atoms.get_all_distances(mic=True)[np.triu_indices(n_atoms, 1)].min() > 1.0:
            break
    charges = rng.normal(size=n_atoms)
    if neutral:
        charges -= charges.mean()
    return positions, charges, cell


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_triclinic_cells_agree_with_pymatgen(seed):
    from pymatgen.analysis.ewald import EwaldSummation
    from pymatgen.core import Lattice, Structure

    rng = np.random.default_rng(seed)
    positions, charges, cell = random_cell(rng, 12)
    structure = Structure(Lattice(cell), ["H"] * 12, positions, coords_are_cartesian=True, site_properties={"charge": charges})
    reference = EwaldSummation(structure, acc_factor=14.0, compute_forces=True)
    pos = torch.tensor(positions, requires_grad=True)
    energy = coulomb_energy(pos, torch.tensor(charges), cell=torch.tensor(cell), pbc=True, accuracy=1e-10)
    (gradient,) = torch.autograd.grad(energy.sum(), pos)
    assert energy.item() == pytest.approx(reference.total_energy, rel=1e-7, abs=1e-8)
    np.testing.assert_allclose(-gradient.numpy(), reference.forces, atol=1e-6)


def pair_sum(positions, charges, sigma):
    energy = 0.0
    for i in range(len(charges)):
        for j in range(i + 1, len(charges)):
            r = np.linalg.norm(positions[i] - positions[j])
            kernel = erf(r / (math.sqrt(2) * sigma)) / r if sigma > 0 else 1 / r
            energy += KE * charges[i] * charges[j] * kernel
    return energy


@pytest.mark.parametrize("sigma", [0.0, 0.5, 1.0])
def test_open_boundary_equals_plain_pair_sum(sigma):
    rng = np.random.default_rng(4)
    positions, charges = rng.normal(size=(15, 3)) * 3, rng.normal(size=15)
    energy = coulomb_energy(torch.tensor(positions), torch.tensor(charges), smearing=sigma)
    assert energy.item() == pytest.approx(pair_sum(positions, charges, sigma), rel=1e-12)


@pytest.mark.parametrize("sigma", [0.0, 1.0])
def test_isolated_atom_has_zero_energy(sigma):
    energy = coulomb_energy(torch.zeros(1, 3, dtype=torch.float64), torch.ones(1, dtype=torch.float64), smearing=sigma)
    assert energy.item() == 0.0


@pytest.mark.parametrize("sigma", [0.0, 1.0])
def test_growing_box_converges_to_open_boundary_with_tinfoil_dipole_term(sigma):
    rng = np.random.default_rng(5)
    positions, charges = rng.normal(size=(8, 3)), rng.normal(size=8)
    charges -= charges.mean()
    dipole = charges @ positions
    open_energy = pair_sum(positions, charges, sigma)
    for length in (30.0, 60.0, 120.0):
        periodic = coulomb_energy(torch.tensor(positions), torch.tensor(charges), cell=torch.eye(3, dtype=torch.float64) * length, pbc=True, smearing=sigma, accuracy=1e-10).item()
        # Tin-foil 3D periodic sum = vacuum sum - (2π/3V)|μ|² k_e + O(L^-5) (de Leeuw, Perram & Smith 1980).
        leading = -2 * math.pi / (3 * length**3) * KE * dipole @ dipole
        assert periodic - open_energy == pytest.approx(leading, rel=30 / length**2)


def test_net_charge_jellium_matches_simple_cubic_wigner_constant():
    # One point charge in a cubic box with neutralising background:
    # E = -k_e q² ξ / (2L), ξ = 2.837297479 (Nijboer & de Wette 1957; Hummer, Pratt & Garcia 1996).
    for length in (5.0, 11.0):
        energy = coulomb_energy(torch.zeros(1, 3, dtype=torch.float64), torch.ones(1, dtype=torch.float64), cell=torch.eye(3, dtype=torch.float64) * length, pbc=True, accuracy=1e-10).item()
        assert energy == pytest.approx(-KE * 2.837297479 / (2 * length), rel=1e-8)


@pytest.mark.parametrize("periodic", [False, True])
@pytest.mark.parametrize("sigma", [0.0, 1.0])
def test_forces_stress_and_charge_gradients_match_finite_differences(periodic, sigma):
    rng = np.random.default_rng(6)
    positions, charges, cell = random_cell(rng, 8, neutral=False)
    cell_t = torch.tensor(cell)

    def energy(pos, q, strain=None):
        c = cell_t
        if strain is not None:
            pos, c = pos + pos @ strain, c + c @ strain
        return coulomb_energy(pos, q, cell=c, pbc=periodic, smearing=sigma, accuracy=1e-12).sum()

    pos = torch.tensor(positions, requires_grad=True)
    q = torch.tensor(charges, requires_grad=True)
    strain = torch.zeros(3, 3, dtype=torch.float64, requires_grad=True)
    grad_pos, grad_q, grad_strain = torch.autograd.grad(energy(pos, q, strain), [pos, q, strain])
    h = 1e-5
    for index in [(0, 0), (3, 2), (7, 1)]:
        plus, minus = positions.copy(), positions.copy()
        plus[index] += h
        minus[index] -= h
        numerical = (energy(torch.tensor(plus), q) - energy(torch.tensor(minus), q)).item() / (2 * h)
        assert grad_pos[index].item() == pytest.approx(numerical, abs=1e-6)
    for i in (0, 5):
        dq = torch.zeros(8, dtype=torch.float64)
        dq[i] = h
        numerical = (energy(pos, q + dq) - energy(pos, q - dq)).item() / (2 * h)
        assert grad_q[i].item() == pytest.approx(numerical, abs=1e-6)
    if periodic:
        for a, b in [(0, 0), (1, 2), (2, 0)]:
            e = torch.zeros(3, 3, dtype=torch.float64)
            e[a, b] = h
            numerical = (energy(pos, q, e) - energy(pos, q, -e)).item() / (2 * h)
            assert grad_strain[a, b].item() == pytest.approx(numerical, abs=1e-5)


def test_double_backward_forces_with_respect_to_charges():
    rng = np.random.default_rng(7)
    positions, charges, cell = random_cell(rng, 6)
    cell_t = torch.tensor(cell)

    def forces(q, create_graph):
        pos = torch.tensor(positions, requires_grad=True)
        e = coulomb_energy(pos, q, cell=cell_t, pbc=True, smearing=1.0, accuracy=1e-12)
        return -torch.autograd.grad(e.sum(), pos, create_graph=create_graph)[0]

    q = torch.tensor(charges, requires_grad=True)
    (gradient,) = torch.autograd.grad(forces(q, True)[2, 1], q)
    h = 1e-5
    dq = torch.zeros(6, dtype=torch.float64)
    dq[4] = h
    numerical = (forces(q.detach() + dq, False)[2, 1] - forces(q.detach() - dq, False)[2, 1]).item() / (2 * h)
    assert gradient[4].item() == pytest.approx(numerical, abs=1e-6)


def test_symmetries_translation_rotation_permutation_supercell_accuracy():
    atoms = bulk("NaCl", "rocksalt", a=5.64) * (2, 1, 1)
    atoms.rattle(0.15, seed=2)
    charges = torch.tensor(np.where(atoms.numbers == 11, 1.0, -1.0))
    pos, cell = torch.tensor(atoms.positions), torch.tensor(atoms.cell.array)

    def e(p, c, q=charges, accuracy=1e-10):
        return coulomb_energy(p, q, cell=c, pbc=True, smearing=0.7, accuracy=accuracy).item()

    reference = e(pos, cell)
    assert e(pos + torch.tensor([0.3, -1.2, 7.0]), cell) == pytest.approx(reference, rel=1e-10)
    rotation = torch.tensor(np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))[0])
    assert e(pos @ rotation.T, cell @ rotation.T) == pytest.approx(reference, rel=1e-10)
    order = torch.randperm(len(charges), generator=torch.Generator().manual_seed(0))
    assert e(pos[order], cell, charges[order]) == pytest.approx(reference, rel=1e-10)
    supercell = atoms * (1, 2, 1)
    q2 = torch.tensor(np.where(supercell.numbers == 11, 1.0, -1.0))
    assert e(torch.tensor(supercell.positions), torch.tensor(supercell.cell.array), q2) == pytest.approx(2 * reference, rel=1e-9)
    assert e(pos, cell, accuracy=1e-6) == pytest.approx(reference, rel=1e-6)


def test_batched_call_equals_separate_calls_and_float32_works():
    rng = np.random.default_rng(8)
    p1, q1 = rng.normal(size=(5, 3)) * 2, rng.normal(size=5)
    p2, q2, c2 = random_cell(rng, 9)
    p3, q3, c3 = random_cell(rng, 4)
    cells = np.stack([np.zeros((3, 3)), c2, c3])
    batch = torch.tensor([0] * 5 + [1] * 9 + [2] * 4)
    pbc = torch.tensor([[False] * 3, [True] * 3, [True] * 3])
    for dtype, tol in [(torch.float64, 1e-10), (torch.float32, 1e-4)]:
        t = lambda x: torch.tensor(x, dtype=dtype)  # noqa: E731
        batched = coulomb_energy(t(np.vstack([p1, p2, p3])), t(np.concatenate([q1, q2, q3])), cell=t(cells), pbc=pbc, batch=batch, smearing=1.0)
        separate = [
            coulomb_energy(t(p1), t(q1), smearing=1.0),
            coulomb_energy(t(p2), t(q2), cell=t(c2), pbc=True, smearing=1.0),
            coulomb_energy(t(p3), t(q3), cell=t(c3), pbc=True, smearing=1.0),
        ]
        assert batched.dtype == dtype
        torch.testing.assert_close(batched, torch.cat(separate), rtol=tol, atol=tol)
    reference = coulomb_energy(torch.tensor(p2), torch.tensor(q2), cell=torch.tensor(c2), pbc=True).item()
    single = coulomb_energy(torch.tensor(p2).float(), torch.tensor(q2).float(), cell=torch.tensor(c2).float(), pbc=True).item()
    assert single == pytest.approx(reference, rel=1e-5)
