"""The batched torch pair search (electrostatics/image_pairs.py) against ASE's neighbour list.

The references are ASE's ``neighbor_list`` (an independent cell-list code) for the
pair sets, and the engine's vesin path for energies and forces.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.neighborlist import neighbor_list

import latent_lr
from latent_lr.electrostatics import image_pairs, pairs
from latent_lr.electrostatics.image_pairs import image_pairs_within_cutoff


def canonical(first, second, shifts) -> set:
    """Unordered pairs (i, j, n) with (j, i, -n) mapped onto one of them."""
    out = set()
    for i, j, n in zip(np.asarray(first).tolist(), np.asarray(second).tolist(), np.rint(np.asarray(shifts)).astype(int).tolist()):
        n = tuple(n)
        minus = tuple(-x for x in n)
        if i > j or (i == j and n < minus):
            i, j, n = j, i, minus
        out.add((i, j, n))
    return out


def ase_pairs(positions, cell, pbc, cutoff) -> set:
    i, j, shifts = neighbor_list("ijS", Atoms(positions=positions, cell=cell, pbc=pbc), cutoff)
    return canonical(i, j, shifts)


def random_structure(rng, n_atoms, pbc):
    """A random triclinic cell (2-8 Å) with atoms inside and outside it; open rows zeroed half the time."""
    cell = rng.normal(size=(3, 3)) * 0.5 + np.eye(3) * rng.uniform(2.0, 8.0)
    positions = rng.uniform(-0.4, 1.4, size=(n_atoms, 3)) @ cell
    if rng.random() < 0.5:
        cell = np.where(np.asarray(pbc)[:, None], cell, 0.0)
    return positions, cell


PBC_CASES = [(True, True, True), (True, True, False), (True, False, True), (False, True, False),
             (False, False, False)]


@pytest.mark.parametrize("pbc", PBC_CASES)
def test_pair_set_equals_ase_on_random_triclinic_cells(pbc):
    """One batched call over 12 structures gives each structure's ASE pair set exactly.

    Cut-offs of 1-10 Å in cells of 2-8 Å include cells smaller than the cut-off
    (several images of one atom within reach, an atom's own images).
    """
    rng = np.random.default_rng(sum(pbc) + 7 * pbc[0] + 3 * pbc[1])
    structures = [random_structure(rng, int(rng.integers(1, 20)), pbc) for _ in range(12)]
    cutoffs = rng.uniform(1.0, 10.0, len(structures))
    cutoffs[3] = 0.0  # excluded structure
    counts = [len(p) for p, _ in structures]
    starts = np.cumsum([0] + counts[:-1])
    found = image_pairs_within_cutoff(
        torch.tensor(np.concatenate([p for p, _ in structures])),
        torch.tensor(np.stack([c for _, c in structures])),
        torch.tensor(pbc).expand(len(structures), 3),
        torch.repeat_interleave(torch.arange(len(structures)), torch.tensor(counts)),
        torch.tensor(counts),
        torch.tensor(cutoffs),
    )
    total = 0
    for index, ((positions, cell), cutoff) in enumerate(zip(structures, cutoffs)):
        mine = found.structure == index
        local = canonical(found.first[mine] - starts[index], found.second[mine] - starts[index], found.shifts[mine])
        assert int(mine.sum()) == len(local), "a pair appears twice"
        expected = ase_pairs(positions, cell, pbc, cutoff) if cutoff > 0 else set()
        assert local == expected, f"structure {index}: {len(local)} pairs, ASE {len(expected)}"
        total += len(expected)
    assert total > 100
    # shift vectors are the integer shifts times the cell
    cells = torch.tensor(np.stack([c for _, c in structures]))
    assert torch.allclose(found.shift_vectors, torch.einsum("pa,pab->pb", found.shifts, cells[found.structure]))


def test_many_images_of_one_atom_in_a_tiny_cell():
    """One atom in a 1.5 Å cubic cell within 4.0 Å: all 2 + 1 + ... images of itself, once each."""
    found = image_pairs_within_cutoff(
        torch.zeros(1, 3, dtype=torch.float64), 1.5 * torch.eye(3, dtype=torch.float64)[None],
        torch.ones(1, 3, dtype=torch.bool), torch.zeros(1, dtype=torch.long), torch.tensor([1]),
        torch.tensor([4.0], dtype=torch.float64),
    )
    grid = np.stack(np.meshgrid(*[np.arange(-3, 4)] * 3, indexing="ij"), -1).reshape(-1, 3)
    within = (np.linalg.norm(1.5 * grid, axis=1) < 4.0).sum() - 1  # all images but itself
    assert found.first.numel() == within // 2
    assert canonical(found.first, found.second, found.shifts) == ase_pairs(np.zeros((1, 3)), 1.5 * np.eye(3), True, 4.0)


def small_boxes(n_structures=10, seed=0):
    """Rattled NaCl-like charges in small random triclinic cells (neutral)."""
    rng = np.random.default_rng(seed)
    positions, charges, cells, counts = [], [], [], []
    for _ in range(n_structures):
        n = 2 * int(rng.integers(2, 12))
        cell = np.diag(rng.uniform(5.0, 8.0, 3)) + rng.normal(size=(3, 3)) * 0.6
        positions.append(rng.uniform(0.0, 1.0, size=(n, 3)) @ cell)
        charges.append(np.tile([1.0, -1.0], n // 2) * rng.uniform(0.5, 1.5))
        cells.append(cell)
        counts.append(n)
    batch = torch.repeat_interleave(torch.arange(n_structures), torch.tensor(counts))
    return (torch.tensor(np.concatenate(positions)), torch.tensor(np.concatenate(charges)),
            torch.tensor(np.stack(cells)), batch)


@pytest.mark.parametrize("smearing", [0.0, 0.8])
def test_energies_forces_stress_equal_the_vesin_path(monkeypatch, smearing):
    """coulomb_energy of a batch through the torch search equals the per-structure vesin search."""
    positions, charges, cells, batch = small_boxes()
    calls = []
    original = image_pairs.image_pairs_within_cutoff
    monkeypatch.setattr(image_pairs, "image_pairs_within_cutoff", lambda *a: calls.append(1) or original(*a))

    def evaluate():
        pos = positions.clone().requires_grad_(True)
        cell = cells.clone().requires_grad_(True)
        energy = latent_lr.coulomb_energy(pos, charges, cell=cell, pbc=True, batch=batch,
                                          accuracy=1e-6, smearing=smearing, method="ewald")
        forces, cell_gradient = torch.autograd.grad(energy.sum(), (pos, cell))
        return energy.detach(), -forces, cell_gradient

    batched = evaluate()
    assert calls, "the batched search was not used"
    monkeypatch.setattr(pairs, "BATCHED_SEARCH_MIN_STRUCTURES", 10**9)
    calls.clear()
    one_by_one = evaluate()
    assert not calls
    for ours, reference in zip(batched, one_by_one):
        assert torch.allclose(ours, reference, rtol=1e-12, atol=1e-12 * float(reference.abs().max()))
