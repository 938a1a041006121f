"""Radius graphs for backbones (vesin), as index data plus integer cell shifts."""

from __future__ import annotations

import numpy as np
import torch
import vesin

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
        block = positions[start : start + count]
        box = cells[index] if pbc[index].any() else np.zeros((3, 3))
        neighbours = vesin.NeighborList(cutoff=cutoff, full_list=True)
        i, j, s = neighbours.compute(block, box, pbc[index].tolist(), quantities="ijS")
        senders.append(i.astype(np.int64) + start)
        receivers.append(j.astype(np.int64) + start)
        shifts.append(s)
        start += count
    device, dtype = data.positions.device, data.positions.dtype
    edge_index = torch.from_numpy(np.stack([np.concatenate(senders), np.concatenate(receivers)]))
    unit_shifts = torch.from_numpy(np.concatenate(shifts)).to(dtype)
    return edge_index.to(device), unit_shifts.to(device)


def edge_vectors(
    data: AtomsBatch, edge_index: torch.Tensor, unit_shifts: torch.Tensor
) -> torch.Tensor:
    """(E, 3) edge vectors, Å, differentiable in ``data.positions`` and ``data.cell``."""
    sender, receiver = edge_index
    shifts = torch.einsum("ea,eab->eb", unit_shifts, data.cell[data.batch[sender]])
    return data.positions[receiver] - data.positions[sender] + shifts
