"""Batched search for pairs with periodic images, for many small structures at once.

Calling a cell-list library (vesin) once per structure costs ~100-200 ns per
pair found plus a per-call overhead, and its loop runs in Python.  For small
structures (tens to a few hundred atoms) it is cheaper to test every pair of
atoms of a structure against the few lattice images that can lie within the
cut-off, for all structures at once, in torch.

For a pair (i, j) with wrapped fractional coordinates f (0 ≤ f_a < 1 along
periodic directions) the image n of j is within r_cut of i only if, along
every periodic direction a, |Δf_a + n_a| w_a < r_cut, where w_a is the
cell's perpendicular width along a (the distance is at least that projection
onto the reciprocal direction).  So n_a runs over the integers of
(-r_cut/w_a - Δf_a, r_cut/w_a - Δf_a): at most floor(2 r_cut/w_a) + 1 of
them, 2 per direction when the cut-off is below the width.  Those candidates
are then tested by distance, which makes the pair set exactly the set of
pairs with |r_ij| < r_cut, whatever the cell's shape, size or periodicity.

Along a non-periodic direction there are no images; the fractional
coordinates along it are taken on a unit vector perpendicular to the periodic
lattice vectors, so that the widths of the periodic directions are the true
ones and open cells may have zero rows.
"""

from __future__ import annotations

import itertools
import math

import torch

from .pairs import PairList

#: Most (pair, image) candidates tested in one chunk; bounds the memory (~100 B each).
CANDIDATE_CHUNK = 1 << 20


def image_pairs_within_cutoff(
    positions: torch.Tensor,
    cell: torch.Tensor,
    pbc: torch.Tensor,
    batch: torch.Tensor,
    counts: torch.Tensor,
    r_cut: torch.Tensor,
) -> PairList:
    """Half pair list of all pairs closer than each structure's cut-off, images included.

    Every unordered pair (i, j, image) with 0 < |r_ij| < r_cut appears once (an
    atom's own images included, one of each ±n), plus pairs of coincident
    atoms (distance 0, i ≠ j) so that callers can report them.  The work is
    Σ_structures n² / 2 × (images per pair), so use it for small structures.

    Args:
        positions: (N, 3) positions, Å (not differentiated).
        cell: (B, 3, 3) lattice vectors as rows, Å; rows of non-periodic
            directions are ignored (may be zero).
        pbc: (B, 3) bool periodicity flags.
        batch: (N,) sorted structure index of every atom.
        counts: (B,) atoms per structure.
        r_cut: (B,) cut-off per structure, Å; structures with r_cut ≤ 0 get no pairs.

    Returns:
        A :class:`PairList` with first < second or, for an atom's own images,
        first == second; ``shifts`` are integer lattice translations (in the
        positions' dtype, 0 along non-periodic directions), sorted by structure.
    """
    device, dtype = positions.device, positions.dtype
    with torch.no_grad():
        search_cell = _search_cell(cell.detach().double(), pbc)
        inverse = torch.linalg.inv(search_cell)
        widths = 1.0 / inverse.norm(dim=1)  # (B, 3): 1/|a*_a|, the a-th column of inv(cell)
        r_cut = r_cut.detach().double().to(device)
        reach = torch.where(pbc, r_cut[:, None] / widths, torch.zeros_like(widths))
        fractional = torch.einsum("na,nab->nb", positions.detach().double(), inverse[batch])
        wrapping = torch.where(pbc[batch], torch.floor(fractional), torch.zeros_like(fractional))
        wrapped = fractional - wrapping
        selected = r_cut > 0.0
        first, second = _pairs_in_structures(batch, counts, selected)
        offsets = _image_offsets(reach[selected])
        metric = (search_cell @ search_cell.transpose(1, 2)).reshape(-1, 9)
        found = [
            _test_candidates(chunk_first, chunk_second, batch, wrapped, metric, pbc, reach, r_cut, offsets)
            for chunk_first, chunk_second in _chunks(first, second, len(offsets))
        ]
        first = torch.cat([f[0] for f in found])
        second = torch.cat([f[1] for f in found])
        images = torch.cat([f[2] for f in found])
        # An atom's own images: one of each ±n, and not itself (n = 0).
        same_atom = first == second
        if bool(same_atom.any()):
            keep = torch.nonzero(~same_atom | _positive_half(images)).flatten()
            first, second, images = first[keep], second[keep], images[keep]
        shifts = images - wrapping.index_select(0, second) + wrapping.index_select(0, first)
        structure = batch.index_select(0, first)
        lattice = cell.detach().double().reshape(-1, 9).index_select(0, structure)
        shift_vectors = (
            shifts[:, 0:1] * lattice[:, 0:3] + shifts[:, 1:2] * lattice[:, 3:6] + shifts[:, 2:3] * lattice[:, 6:9]
        )
    return PairList(
        first=first,
        second=second,
        shifts=shifts.to(dtype),
        structure=structure,
        shift_vectors=shift_vectors.to(dtype),
    )


def _search_cell(cell: torch.Tensor, pbc: torch.Tensor) -> torch.Tensor:
    """(B, 3, 3) cells whose non-periodic rows are replaced by unit vectors normal to the periodic ones."""
    if bool(pbc.all()):
        return cell
    periodic_rows = torch.where(pbc[:, :, None], cell, torch.zeros_like(cell))
    # Eigenvectors of Σ_periodic a aᵀ, ascending: the first 3 - n_periodic span the normal space.
    _, vectors = torch.linalg.eigh(periodic_rows.transpose(1, 2) @ periodic_rows)
    normals = vectors.transpose(1, 2)  # rows: eigenvectors
    open_rank = torch.cumsum((~pbc).long(), dim=1) - 1  # k-th open direction takes the k-th normal
    fill = torch.gather(normals, 1, open_rank.clamp_min(0)[:, :, None].expand(-1, -1, 3))
    return torch.where(pbc[:, :, None], cell, fill)


def _pairs_in_structures(
    batch: torch.Tensor, counts: torch.Tensor, selected: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (i, j) with i ≤ j inside each selected structure, (P,) each, ordered by i then j."""
    device = batch.device
    ends = torch.cumsum(counts, 0)
    atoms = torch.nonzero(selected[batch]).flatten()
    partners = ends[batch[atoms]] - atoms  # j = i, ..., last atom of i's structure
    first = torch.repeat_interleave(atoms, partners)
    starts = torch.cumsum(partners, 0) - partners
    second = first + torch.arange(first.numel(), device=device) - torch.repeat_interleave(starts, partners)
    return first, second


def _image_offsets(reach: torch.Tensor) -> torch.Tensor:
    """(M, 3) offsets k, k_a = 0 .. floor(2 max reach_a), added to each pair's lowest image."""
    most = reach.amax(dim=0).tolist() if reach.numel() else [0.0, 0.0, 0.0]
    ranges = [range(int(math.floor(2.0 * value)) + 1) for value in most]
    return torch.tensor(list(itertools.product(*ranges)), dtype=reach.dtype, device=reach.device)


def _chunks(first: torch.Tensor, second: torch.Tensor, per_pair: int):
    """Split the pairs into chunks of at most :data:`CANDIDATE_CHUNK` (pair, image) candidates."""
    size = max(1, CANDIDATE_CHUNK // per_pair)
    for start in range(0, max(1, first.numel()), size):
        yield first[start : start + size], second[start : start + size]


def _test_candidates(
    first: torch.Tensor,
    second: torch.Tensor,
    batch: torch.Tensor,
    wrapped: torch.Tensor,
    metric: torch.Tensor,
    pbc: torch.Tensor,
    reach: torch.Tensor,
    r_cut: torch.Tensor,
    offsets: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (first, second, image n) of the pairs (first, second) whose image n is within r_cut.

    Images n are integer lattice translations of ``second`` in wrapped
    coordinates: n = lowest + k for the offsets k, lowest_a = ceil(-reach_a -
    Δf_a) the lowest image that can be in range.  Candidates beyond the
    highest one in range lie beyond r_cut along a, so the distance test alone
    decides.  With g = Δf + lowest and the metric G = cell cellᵀ (B, 9),
    |r|² = gᵀGg + 2 kᵀGg + kᵀGk: two small matrix products for all candidates.
    """
    structure = batch.index_select(0, first)
    delta = wrapped.index_select(0, second) - wrapped.index_select(0, first)
    lowest = torch.ceil(-reach.index_select(0, structure) - delta)
    if not bool(pbc.all()):
        lowest = torch.where(pbc.index_select(0, structure), lowest, torch.zeros_like(lowest))
    base = delta + lowest
    pair_metric = metric.index_select(0, structure)  # (P, 9), symmetric 3 x 3
    metric_base = (
        pair_metric[:, 0:3] * base[:, 0:1] + pair_metric[:, 3:6] * base[:, 1:2] + pair_metric[:, 6:9] * base[:, 2:3]
    )  # G g, (P, 3)
    base_norm = base[:, 0] * metric_base[:, 0] + base[:, 1] * metric_base[:, 1] + base[:, 2] * metric_base[:, 2]
    outer = (offsets[:, :, None] * offsets[:, None, :]).reshape(-1, 9)  # (M, 9): k kᵀ
    distance_squared = torch.addmm(pair_metric @ outer.T, metric_base, offsets.T, alpha=2.0)
    limit = r_cut.index_select(0, structure) ** 2 - base_norm
    pair, image = torch.nonzero(distance_squared < limit[:, None], as_tuple=True)
    images = lowest.index_select(0, pair) + offsets.index_select(0, image)
    return first.index_select(0, pair), second.index_select(0, pair), images


def _positive_half(images: torch.Tensor) -> torch.Tensor:
    """True for images n whose first non-zero component is positive (one of each ±n, never 0)."""
    x, y, z = images.unbind(-1)
    return (x > 0) | ((x == 0) & (y > 0)) | ((x == 0) & (y == 0) & (z > 0))
