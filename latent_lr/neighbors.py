"""Radius graphs for backbones (vesin), as index data plus integer cell shifts."""

from __future__ import annotations

import numpy as np
import torch
import vesin
from ase import Atoms

from .data import AtomsBatch


def radius_graph(data: AtomsBatch, cutoff: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Directed edges within ``cutoff`` (Å), both directions, no self-edges at zero shift.

    Returns:
        edge_index: (2, E) long, rows (sender, receiver) in batch-global atom indices.
        unit_shifts: (E, 3) integer lattice translations (in the positions' dtype)
            such that ``r_receiver - r_sender + unit_shifts @ cell`` is the edge vector.
    """
    positions = data.positions.detach().cpu().double().numpy()
    cells = data.cell.detach().cpu().double().numpy()
    pbc = data.pbc.cpu().numpy()
    counts = data.n_atoms.tolist()
    senders, receivers, shifts = [], [], []
    start = 0
    for index, count in enumerate(counts):
        i, j, s = _neighbours(positions[start : start + count], cells[index], pbc[index], cutoff, "ijS")
        senders.append(i.astype(np.int64) + start)
        receivers.append(j.astype(np.int64) + start)
        shifts.append(s)
        start += count
    device, dtype = data.positions.device, data.positions.dtype
    edge_index = torch.from_numpy(np.stack([np.concatenate(senders), np.concatenate(receivers)]))
    unit_shifts = torch.from_numpy(np.concatenate(shifts)).to(dtype)
    return edge_index.to(device), unit_shifts.to(device)


def _neighbours(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float, quantities: str) -> list:
    """vesin's full neighbour list of one structure (positions (n, 3) Å, cell (3, 3) Å, pbc (3,))."""
    box = cell if pbc.any() else np.zeros((3, 3))
    neighbours = vesin.NeighborList(cutoff=cutoff, full_list=True)
    return neighbours.compute(positions, box, pbc.tolist(), quantities=quantities)


def edge_count(atoms: Atoms, cutoff: float) -> int:
    """Number of directed edges of one structure within ``cutoff`` (Å), as :func:`radius_graph` builds them."""
    (senders,) = _neighbours(atoms.positions.astype(np.float64), atoms.cell.array, np.asarray(atoms.pbc), cutoff, "i")
    return int(len(senders))


def edge_vectors(
    data: AtomsBatch, edge_index: torch.Tensor, unit_shifts: torch.Tensor
) -> torch.Tensor:
    """(E, 3) edge vectors, Å, differentiable in ``data.positions`` and ``data.cell``."""
    sender, receiver = edge_index
    shifts = torch.einsum("ea,eab->eb", unit_shifts, data.cell[data.batch[sender]])
    return data.positions[receiver] - data.positions[sender] + shifts
