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


def periodic_pairs_within_cutoff(
    positions: torch.Tensor,
    cell: torch.Tensor,
    batch: torch.Tensor,
    counts: torch.Tensor,
    r_cuts: dict[int, float],
) -> PairList:
    """Half pair list, with periodic images, of the given structures (vesin).

    Args:
        positions: (N, 3) positions, Å.
        cell: (B, 3, 3) cells, Å.
        batch: (N,) sorted structure index.
        counts: (B,) atoms per structure.
        r_cuts: structure index -> real-space cut-off (Å) for the structures to include.
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
        return PairList(empty, empty, torch.zeros(0, 3, dtype=dtype, device=device), empty)
    return PairList(
        first=torch.from_numpy(np.concatenate(firsts)).to(device),
        second=torch.from_numpy(np.concatenate(seconds)).to(device),
        shifts=torch.from_numpy(np.concatenate(shifts)).to(device=device, dtype=dtype),
        structure=torch.from_numpy(np.concatenate(structures)).to(device),
        shift_vectors=torch.from_numpy(np.concatenate(shift_vectors)).to(device=device, dtype=dtype),
    )
