"""Pair lists for the direct (open-boundary) and real-space (periodic) sums.

Pair lists are index data: they are built without gradients and the distance
vectors are recomputed from them in torch, so that energies stay
differentiable with respect to positions and cell.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import vesin


@dataclass
class PairList:
    """Half pair list (each interacting pair once).

    Attributes:
        first: (P,) index of the first atom.
        second: (P,) index of the second atom.
        shifts: (P, 3) integer lattice translations (as floats, in the positions'
            dtype) such that r_ij = r_second - r_first + shifts @ cell.
        structure: (P,) structure index of the pair.
        shift_vectors: (P, 3) Cartesian lattice translations shifts @ cell, Å,
            for the cell values the list was built from, or None.  Used in
            place of the product when the cell needs no gradient.
    """

    first: torch.Tensor
    second: torch.Tensor
    shifts: torch.Tensor
    structure: torch.Tensor
    shift_vectors: Optional[torch.Tensor] = None

    def vectors(self, positions: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
        """Pair distance vectors (P, 3) in Å, differentiable in positions and cell (B, 3, 3).

        ``cell`` must hold the values the list was built from.
        """
        if self.shift_vectors is not None and not cell.requires_grad:
            return positions[self.second] - positions[self.first] + self.shift_vectors
        return pair_vectors(positions, self.first, self.second, self.shifts, cell, self.structure)


def pair_vectors(
    positions: torch.Tensor,
    first: torch.Tensor,
    second: torch.Tensor,
    shifts: torch.Tensor,
    cells: torch.Tensor,
    structure: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """r_second - r_first + shifts @ cell, (P, 3) in Å (TorchScript-able).

    Args:
        positions: (N, 3) positions, Å.
        first, second: (P,) atom indices.
        shifts: (P, 3) integer lattice translations, as floats.
        cells: one (3, 3) cell, (P, 3, 3) cells of each pair's structure, or
            with ``structure`` (B, 3, 3) cells of every structure, Å.
        structure: (P,) structure index of each pair, or None.
    """
    vectors = positions[second] - positions[first]
    if shifts.numel():
        if cells.dim() == 2:
            vectors = vectors + shifts @ cells
        else:
            # Three (P, 3) terms, lattice vectors gathered one by one: with the cell gradient
            # ~4x cheaper than gathering (P, 3, 3) cells and reducing their product.
            a, b, c = cells[:, 0], cells[:, 1], cells[:, 2]
            if structure is not None:
                a, b, c = a[structure], b[structure], c[structure]
            vectors = vectors + shifts[:, 0:1] * a + shifts[:, 1:2] * b + shifts[:, 2:3] * c
    return vectors


def all_pairs_within(
    batch: torch.Tensor, counts: torch.Tensor, selected: torch.Tensor, dtype: torch.dtype
) -> PairList:
    """Every pair i < j inside each selected structure, without a Python loop.

    Args:
        batch: (N,) sorted structure index per atom.
        counts: (B,) atoms per structure.
        selected: (B,) bool, the structures to include.
    """
    device = batch.device
    starts = torch.cumsum(counts, 0) - counts
    atom_selected = selected[batch]
    atoms = torch.nonzero(atom_selected).flatten()
    partners_per_atom = counts[batch[atoms]]
    first = torch.repeat_interleave(atoms, partners_per_atom)
    offsets = torch.cumsum(partners_per_atom, 0) - partners_per_atom
    local = torch.arange(first.numel(), device=device) - torch.repeat_interleave(
        offsets, partners_per_atom
    )
    second = starts[batch[first]] + local
    keep = first < second
    first, second = first[keep], second[keep]
    return PairList(
        first=first,
        second=second,
        shifts=torch.zeros(first.numel(), 3, dtype=dtype, device=device),
        structure=batch[first],
    )


#: Structures of at most this many atoms get their periodic pairs from the batched
#: torch search (:mod:`.image_pairs`), larger ones from vesin.  Measured on water-like
#: boxes at accuracy 1e-4 (1 thread, float64): the batched search's work grows as n²,
#: vesin's as n; per structure, the batched search was ~1.5x faster for 64 boxes of
#: 21-60 atoms, while vesin was faster from ~150 atoms on, and for a lone structure.
BATCHED_SEARCH_MAX_ATOMS = 128

#: The batched search is used when at least this many structures qualify (its fixed
#: cost, ~20 tensor operations, exceeds vesin's per-call cost for one or two).
BATCHED_SEARCH_MIN_STRUCTURES = 4


def periodic_pairs_within_cutoff(
    positions: torch.Tensor,
    cell: torch.Tensor,
    batch: torch.Tensor,
    counts: torch.Tensor,
    r_cuts: dict[int, float],
) -> PairList:
    """Half pair list, with periodic images, of the given fully periodic structures.

    Small structures are searched together in torch
    (:func:`.image_pairs.image_pairs_within_cutoff`), the others one by one
    with vesin; both give the pairs closer than the cut-off, each once.

    Args:
        positions: (N, 3) positions, Å.
        cell: (B, 3, 3) cells, Å.
        batch: (N,) sorted structure index.
        counts: (B,) atoms per structure.
        r_cuts: structure index -> real-space cut-off (Å) for the structures to include.
    """
    from .image_pairs import image_pairs_within_cutoff

    counts_list = counts.tolist()
    wanted = {index: r_cut for index, r_cut in r_cuts.items() if r_cut > 0.0}
    small = {index: r_cut for index, r_cut in wanted.items() if counts_list[index] <= BATCHED_SEARCH_MAX_ATOMS}
    if len(small) < BATCHED_SEARCH_MIN_STRUCTURES:
        small = {}
    lists = [vesin_pairs_within_cutoff(
        positions, cell, batch, counts, {i: r for i, r in wanted.items() if i not in small}
    )]
    if small:
        r_cut = positions.new_zeros(len(counts_list), dtype=torch.float64)
        r_cut[list(small)] = torch.tensor(list(small.values()), dtype=torch.float64, device=positions.device)
        pbc = torch.ones(len(counts_list), 3, dtype=torch.bool, device=positions.device)
        # Structures outside the search may have no cell (open ones, zero rows): a unit cell keeps the inverse finite.
        searched = r_cut > 0.0
        unit = torch.eye(3, dtype=cell.dtype, device=cell.device).expand_as(cell)
        search_cell = torch.where(searched[:, None, None].to(cell.device), cell, unit)
        lists.append(image_pairs_within_cutoff(positions, search_cell, pbc, batch, counts, r_cut))
    return concatenate_pair_lists(lists) if len(lists) > 1 else lists[0]


def concatenate_pair_lists(lists: list[PairList]) -> PairList:
    """One :class:`PairList` holding every pair of ``lists`` (each with shift vectors)."""
    vectors = [p.shift_vectors for p in lists if p.shift_vectors is not None]
    return PairList(
        first=torch.cat([p.first for p in lists]),
        second=torch.cat([p.second for p in lists]),
        shifts=torch.cat([p.shifts for p in lists]),
        structure=torch.cat([p.structure for p in lists]),
        shift_vectors=torch.cat(vectors) if len(vectors) == len(lists) else None,
    )


def vesin_pairs_within_cutoff(
    positions: torch.Tensor,
    cell: torch.Tensor,
    batch: torch.Tensor,
    counts: torch.Tensor,
    r_cuts: dict[int, float],
) -> PairList:
    """Half pair list, with periodic images, of the given structures, one vesin call each.

    Arguments as in :func:`periodic_pairs_within_cutoff`.
    """
    device, dtype = positions.device, positions.dtype
    starts = (torch.cumsum(counts, 0) - counts).tolist()
    counts_list = counts.tolist()
    pos_np = positions.detach().cpu().double().numpy()
    cell_np = cell.detach().cpu().double().numpy()
    firsts, seconds, shifts, shift_vectors, structures = [], [], [], [], []
    for index, r_cut in r_cuts.items():
        if r_cut <= 0.0:
            continue
        start, count = starts[index], counts_list[index]
        neighbours = vesin.NeighborList(cutoff=r_cut, full_list=False)
        i, j, s = neighbours.compute(
            pos_np[start : start + count], cell_np[index], True, quantities="ijS"
        )
        firsts.append(i.astype(np.int64) + start)
        seconds.append(j.astype(np.int64) + start)
        shifts.append(s)
        shift_vectors.append(s @ cell_np[index])
        structures.append(np.full(len(i), index, dtype=np.int64))
    if not firsts:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        no_shifts = torch.zeros(0, 3, dtype=dtype, device=device)
        return PairList(empty, empty, no_shifts, empty, no_shifts)
    return PairList(
        first=torch.from_numpy(np.concatenate(firsts)).to(device),
        second=torch.from_numpy(np.concatenate(seconds)).to(device),
        shifts=torch.from_numpy(np.concatenate(shifts)).to(device=device, dtype=dtype),
        structure=torch.from_numpy(np.concatenate(structures)).to(device),
        shift_vectors=torch.from_numpy(np.concatenate(shift_vectors)).to(device=device, dtype=dtype),
    )
