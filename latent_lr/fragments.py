"""Fragments: the separate molecules of each structure, as connected components of a covalent bond graph.

Atoms i, j are bonded when |r_ij| < f · (r_i + r_j), r the covalent radii of :mod:`ase.data`
(Å) and f = ``bond_factor``; periodic images count (minimum-image-free: every image within
the cut-off is an edge).  The labels are integers without gradients; they change only where
a bond length crosses its threshold, so anything built on them is piecewise smooth in the
positions, with a possible jump where two fragments join or one splits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from ase.data import covalent_radii
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from .data import AtomsBatch
from .neighbors import _neighbours


@dataclass(frozen=True)
class Fragments:
    """Fragment labels of a batch.

    Attributes:
        index: (N,) long, fragment of each atom (0 … F−1, over the whole batch).
        structure: (F,) long, structure of each fragment.
    """

    index: torch.Tensor
    structure: torch.Tensor

    @classmethod
    def whole_structures(cls, batch: torch.Tensor, n_structures: int) -> "Fragments":
        """One fragment per structure (batch (N,) structure index of each atom)."""
        return cls(batch, torch.arange(n_structures, device=batch.device))


def find_fragments(data: AtomsBatch, bond_factor: float) -> Fragments:
    """The :class:`Fragments` of ``data``: connected components of the bond graph |r_ij| < f (r_i + r_j)."""
    positions = data.positions.detach().cpu().double().numpy()
    cells = data.cell.detach().cpu().double().numpy()
    pbc = data.pbc.cpu().numpy()
    numbers = data.numbers.cpu().numpy()
    index, structure, start, offset = [], [], 0, 0
    for s, count in enumerate(data.n_atoms.tolist()):
        radii = covalent_radii[numbers[start : start + count]]
        i, j, d = _neighbours(positions[start : start + count], cells[s], pbc[s], bond_factor * 2 * float(radii.max()), "ijd")
        bonded = d < bond_factor * (radii[i] + radii[j])
        graph = coo_matrix((np.ones(int(bonded.sum())), (i[bonded], j[bonded])), shape=(count, count))
        n_fragments, labels = connected_components(graph, directed=False)
        index.append(labels.astype(np.int64) + offset)
        structure.append(np.full(n_fragments, s, dtype=np.int64))
        start, offset = start + count, offset + n_fragments
    device = data.positions.device
    return Fragments(torch.from_numpy(np.concatenate(index)).to(device), torch.from_numpy(np.concatenate(structure)).to(device))
