"""CHGNet's batched graph topology built from latent-lr's neighbour list (used by the CHGNet adapter).

Neighbours within ``atom_graph_cutoff`` come from :func:`latent_lr.neighbors.radius_graph`
(index data and integer images only); CHGNet's own graph builder
(``create_graph``, ``adjacency_list``, ``line_graph_adjacency_list``) numbers the
directed/undirected bonds and angles exactly as CHGNet's converter does.  No
geometry or gradient is kept: bond vectors are computed by the adapter in torch.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import numpy as np
import torch

from latent_lr.data import AtomsBatch
from latent_lr.neighbors import radius_graph


class Topology(NamedTuple):
    """Index data of CHGNet's batched atom and bond graphs (no geometry, no gradients)."""

    atom_graph: torch.Tensor  # (D, 2) centre, neighbour: batch-global atom indices
    image: torch.Tensor  # (D, 3) integer lattice offsets of the neighbour
    directed2undirected: torch.Tensor  # (D,) batch-global undirected index
    undirected2directed: torch.Tensor  # (U,) batch-global directed index
    bond_graph: torch.Tensor  # (A, 5) atom, undirected 1, directed 1, undirected 2, directed 2


def topology(data: AtomsBatch, create_graph: Callable[..., Any], atom_cutoff: float, bond_cutoff: float) -> Topology:
    """CHGNet's atom and bond graphs of a batch from latent-lr's neighbour list.

    Args:
        data: the batch (positions Å, cell Å; only detached float64 copies are read).
        create_graph: CHGNet's ``graph_converter.create_graph``, which numbers bonds and angles.
        atom_cutoff, bond_cutoff: CHGNet's atom- and bond-graph cut-offs, Å.
    """
    edge_tensor, shift_tensor = radius_graph(data, atom_cutoff)
    edge_index = edge_tensor.cpu().numpy()
    unit_shifts = np.rint(shift_tensor.detach().cpu().double().numpy()).astype(np.int64)
    positions = data.positions.detach().cpu().double().numpy()
    cells = data.cell.detach().cpu().double().numpy()
    batch = data.batch.cpu().numpy()
    counts = data.n_atoms.tolist()

    atom_graphs, images, d2u, u2d, bond_graphs = [], [], [], [], []
    atom_offset = directed_offset = undirected_offset = 0
    sender_structure = batch[edge_index[0]]
    for index, count in enumerate(counts):
        mask = sender_structure == index
        centre = edge_index[0, mask] - atom_offset
        neighbour = edge_index[1, mask] - atom_offset
        image = np.ascontiguousarray(unit_shifts[mask])
        if centre.size:
            block = positions[atom_offset : atom_offset + count]
            vectors = block[neighbour] - block[centre] + image @ cells[index]
            distance = np.linalg.norm(vectors, axis=1)
            graph = create_graph(count, centre, neighbour, image, distance)
            adjacency, directed2undirected = graph.adjacency_list()
            line_graph, undirected2directed = graph.line_graph_adjacency_list(cutoff=bond_cutoff)
            # Directed edge k is input pair k (CHGNet's converter relies on this too,
            # keeping the neighbour list's images as they are); checked, it is cheap.
            adjacency = np.asarray(adjacency, dtype=np.int64).reshape(-1, 2)
            if not (np.array_equal(adjacency[:, 0], centre) and np.array_equal(adjacency[:, 1], neighbour)):
                raise RuntimeError("CHGNet's graph builder reordered the bonds; this chgnet version is unsupported.")
            directed2undirected = np.asarray(directed2undirected, dtype=np.int64)
            undirected2directed = np.asarray(undirected2directed, dtype=np.int64)
            line_graph = np.asarray(line_graph, dtype=np.int64).reshape(-1, 5)
            atom_graphs.append(adjacency + atom_offset)
            images.append(image)
            d2u.append(directed2undirected + undirected_offset)
            u2d.append(undirected2directed + directed_offset)
            offsets = np.array([atom_offset, undirected_offset, directed_offset, undirected_offset, directed_offset])
            bond_graphs.append(line_graph + offsets)
            directed_offset += len(adjacency)
            undirected_offset += len(undirected2directed)
        atom_offset += count

    def cat(parts, width):
        return np.concatenate(parts) if parts else np.zeros((0,) if width == 0 else (0, width), dtype=np.int64)

    device = data.positions.device

    def tensor(array):
        return torch.as_tensor(array, dtype=torch.int32, device=device)

    return Topology(
        atom_graph=tensor(cat(atom_graphs, 2)),
        image=torch.as_tensor(cat(images, 3), device=device),
        directed2undirected=tensor(cat(d2u, 0)),
        undirected2directed=tensor(cat(u2d, 0)),
        bond_graph=tensor(cat(bond_graphs, 5)),
    )
