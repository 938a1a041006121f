"""Position-independent Ewald set-up is reused for the same cell and recomputed for a new one."""

import numpy as np
import pytest
import torch

from latent_lr import coulomb_energy
from latent_lr.electrostatics import reciprocal, setup_cache

CELL = np.array([[8.0, 0.0, 0.0], [1.0, 7.5, 0.0], [0.5, -0.7, 9.0]])


@pytest.fixture
def counted(monkeypatch):
    """Number of k-index sets generated so far, starting from an empty cache."""
    setup_cache.clear_setup_cache()
    calls = []
    original = reciprocal.half_space_k_indices

    def counting(cell, k_cut):
        calls.append(k_cut)
        return original(cell, k_cut)

    monkeypatch.setattr(reciprocal, "half_space_k_indices", counting)
    yield calls
    setup_cache.clear_setup_cache()


def energy_forces_stress(positions, charges, cell, **options):
    pos = torch.tensor(positions, requires_grad=True)
    cell_t = torch.tensor(cell, requires_grad=True)
    energy = coulomb_energy(pos, torch.tensor(charges), cell=cell_t, pbc=True, **options)
    forces, cell_gradient = torch.autograd.grad(energy.sum(), (pos, cell_t))
    return energy.item(), -forces.numpy(), cell_gradient.numpy()


def test_second_call_hits_the_cache_and_gives_identical_results(counted):
    rng = np.random.default_rng(0)
    positions, charges = rng.uniform(size=(10, 3)) @ CELL, rng.normal(size=10)
    first = energy_forces_stress(positions, charges, CELL, smearing=0.5)
    assert len(counted) == 1
    # New positions (an MD step) at the same cell: still a hit.
    moved = positions + rng.normal(scale=0.1, size=positions.shape)
    energy_forces_stress(moved, charges, CELL, smearing=0.5)
    second = energy_forces_stress(positions, charges, CELL, smearing=0.5)
    assert len(counted) == 1
    assert first[0] == second[0]
    np.testing.assert_array_equal(first[1], second[1])
    np.testing.assert_array_equal(first[2], second[2])
    # The cached set-up gives the same numbers as a cold start.
    setup_cache.clear_setup_cache()
    cold = energy_forces_stress(positions, charges, CELL, smearing=0.5)
    assert cold[0] == first[0]
    np.testing.assert_array_equal(cold[2], first[2])


def test_any_change_of_cell_atoms_accuracy_or_smearing_misses(counted):
    rng = np.random.default_rng(1)
    positions, charges = rng.uniform(size=(10, 3)) @ CELL, rng.normal(size=10)
    energy_forces_stress(positions, charges, CELL)
    strained = CELL.copy()
    strained[1, 0] += 1e-12
    energy_forces_stress(positions, charges, strained)
    energy_forces_stress(positions, charges, CELL, accuracy=1e-5)
    energy_forces_stress(positions, charges, CELL, smearing=0.3)
    energy_forces_stress(positions[:9], charges[:9], CELL)
    assert len(counted) == 5
    # A batch of two copies of the same cell needs one set-up, already cached.
    coulomb_energy(
        torch.tensor(np.vstack([positions, positions])), torch.tensor(np.concatenate([charges, charges])),
        cell=torch.tensor(np.stack([CELL, CELL])), pbc=True, batch=torch.tensor([0] * 10 + [1] * 10),
    )
    assert len(counted) == 5


def test_cache_is_bounded(counted):
    charges = np.array([1.0, -1.0])
    for step in range(setup_cache.CACHE_SIZE + 5):
        cell = CELL * (1.0 + 1e-3 * step)
        coulomb_energy(torch.tensor(np.array([[0.0, 0, 0], [1.5, 1.5, 1.5]])), torch.tensor(charges), cell=torch.tensor(cell), pbc=True)
    assert setup_cache.cached_setups() == setup_cache.CACHE_SIZE
