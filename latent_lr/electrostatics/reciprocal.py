"""Reciprocal-space (k-space) part of the Ewald sum, batched over structures.

For a periodic structure of volume V the smooth part of the Coulomb energy is

    E_k = k_e (2π / V) Σ_{k ≠ 0} exp(-k² / 4α²) / k² |S(k)|²,
    S(k) = Σ_i q_i exp(i k·r_i),

summed here over half of k-space (k and -k contribute equally).  Structures
are padded to a common number of atoms and k-vectors so that one batched
matrix product serves all of them; padded atoms carry zero charge and padded
k-vectors zero weight.  Each k-vector's weight is switched off smoothly
between ``k_switch`` and ``k_cut`` (see :mod:`.parameters`).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .switching import switch_off


def half_space_k_indices(cell: np.ndarray, k_cut: float) -> np.ndarray:
    """Integer triples n (K, 3) with 0 < |k| < k_cut in one half of k-space.

    Pass the outer cut-off (where the switched weights reach zero).

    ``k = n @ (2π inv(cell).T)``; of each pair (n, -n) only the one whose first
    non-zero component is positive is kept.

    Args:
        cell: (3, 3) lattice vectors as rows, Å.
        k_cut: cut-off on |k|, 1/Å.
    """
    reciprocal = 2.0 * math.pi * np.linalg.inv(cell).T
    n_max = np.floor(k_cut * np.linalg.norm(cell, axis=1) / (2.0 * math.pi)).astype(int)
    axes = [np.arange(-m, m + 1) for m in n_max]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    positive = (grid[:, 0] > 0) | ((grid[:, 0] == 0) & (grid[:, 1] > 0))
    positive |= (grid[:, 0] == 0) & (grid[:, 1] == 0) & (grid[:, 2] > 0)
    grid = grid[positive]
    k_norm = np.linalg.norm(grid @ reciprocal, axis=1)
    return grid[k_norm < k_cut]


def reciprocal_energy(
    positions: torch.Tensor,
    charges: torch.Tensor,
    cell: torch.Tensor,
    atom_slot: torch.Tensor,
    atom_row: torch.Tensor,
    n_rows: int,
    k_indices: list[np.ndarray],
    alpha: torch.Tensor,
    k_switch: torch.Tensor,
    k_cut: torch.Tensor,
) -> torch.Tensor:
    """Reciprocal-space energy of each periodic structure, in units of k_e (e²/Å).

    Pads the structures and their k-index sets and calls
    :func:`padded_reciprocal_energy`, once per group of similar structures
    (:func:`padding_groups`) so that small structures are not padded to the
    largest one's atoms and k-vectors.

    Args:
        positions: (M, 3) positions of the atoms of periodic structures, Å.
        charges: (M,) their charges, e.
        cell: (R, 3, 3) cells of the R periodic structures.
        atom_slot: (M,) position of each atom inside its structure.
        atom_row: (M,) which of the R structures each atom belongs to.
        n_rows: R.
        k_indices: R integer arrays (K_r, 3) from :func:`half_space_k_indices`.
        alpha: (R,) Ewald splitting parameters, 1/Å.
        k_switch: (R,) where the k-vector weights start to switch off, 1/Å.
        k_cut: (R,) where they reach zero, 1/Å.

    Returns:
        (R,) energies divided by k_e.
    """
    device, dtype = positions.device, positions.dtype
    atom_counts = torch.bincount(atom_row, minlength=n_rows).tolist()
    k_counts = [len(k) for k in k_indices]
    n_slots = max(atom_counts)
    padded_positions = positions.new_zeros(n_rows, n_slots, 3)
    padded_positions = padded_positions.index_put((atom_row, atom_slot), positions)
    padded_charges = charges.new_zeros(n_rows, n_slots)
    padded_charges = padded_charges.index_put((atom_row, atom_slot), charges)

    energy = positions.new_zeros(n_rows)
    for group in padding_groups(atom_counts, k_counts):
        group_slots = max(atom_counts[row] for row in group)
        k_max = max(1, max(k_counts[row] for row in group))
        padded_n = np.zeros((len(group), k_max, 3))
        valid_np = np.zeros((len(group), k_max), dtype=bool)
        for slot, row in enumerate(group):
            padded_n[slot, : k_counts[row]] = k_indices[row]
            valid_np[slot, : k_counts[row]] = True
        rows = torch.tensor(group, device=device)
        group_energy = padded_reciprocal_energy(
            padded_positions[rows, :group_slots],
            padded_charges[rows, :group_slots],
            cell[rows],
            torch.from_numpy(padded_n).to(device=device, dtype=dtype),
            torch.from_numpy(valid_np).to(device),
            alpha[rows],
            k_switch[rows],
            k_cut[rows],
        )
        energy = energy.index_put((rows,), group_energy)
    return energy


#: Fixed cost of one padded group (its ~30 tensor operations, forward and
#: backward) in units of one (atom, k-vector) term: ~0.3 ms against ~30 ns on
#: one CPU thread (float64), measured on batches of 21-60-atom water boxes.
GROUP_COST = 10_000

#: Most groups :func:`padding_groups` splits a batch into.
MAX_GROUPS = 8


def padding_groups(atom_counts: list[int], k_counts: list[int]) -> list[list[int]]:
    """Split structures into groups padded separately, minimising the padded work.

    Structures are sorted by their work n_r K_r and cut into 1 to
    :data:`MAX_GROUPS` groups of equal size; the split with the least
    Σ_groups (size × max n × max K) + :data:`GROUP_COST` × groups wins.  A
    batch of equal structures stays one group.

    Args:
        atom_counts: (R,) atoms per structure.
        k_counts: (R,) k-vectors per structure.

    Returns:
        Lists of structure indices (rows), each sorted by work.
    """
    order = sorted(range(len(atom_counts)), key=lambda row: (atom_counts[row] * k_counts[row], row))
    best: list[list[int]] = [order]
    best_cost = math.inf
    for n_groups in range(1, min(MAX_GROUPS, len(order)) + 1):
        size, extra = divmod(len(order), n_groups)
        groups, start = [], 0
        for index in range(n_groups):
            stop = start + size + (index < extra)
            groups.append(order[start:stop])
            start = stop
        cost = GROUP_COST * n_groups + sum(
            len(g) * max(atom_counts[r] for r in g) * max(1, max(k_counts[r] for r in g)) for g in groups
        )
        if cost < best_cost:
            best, best_cost = groups, cost
    return best


class _CosSin(torch.autograd.Function):
    """(cos φ, sin φ) whose backward reuses them instead of evaluating sin and cos again.

    The backward, cos φ ḡ_sin - sin φ ḡ_cos, is written with the saved
    outputs, which stay on the graph: double backward (training on forces)
    differentiates through this function again.
    """

    @staticmethod
    def forward(ctx, phase: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos_phase, sin_phase = torch.cos(phase), torch.sin(phase)
        ctx.save_for_backward(cos_phase, sin_phase)
        return cos_phase, sin_phase

    @staticmethod
    def backward(ctx, grad_cos: torch.Tensor, grad_sin: torch.Tensor) -> torch.Tensor:
        cos_phase, sin_phase = ctx.saved_tensors
        return cos_phase * grad_sin - sin_phase * grad_cos


@torch.jit.unused
def _cos_sin(phase: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager-mode cos and sin of a phase array (TorchScript uses torch.cos/torch.sin)."""
    return _CosSin.apply(phase)


def k_space_weights(
    cell: torch.Tensor, integer_k: torch.Tensor, valid: torch.Tensor,
    alpha: torch.Tensor, k_switch: torch.Tensor, k_cut: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """k-vectors (R, K, 3), 1/Å, and their switched weights 2 exp(-k²/4α²)/k² (R, K), Å² (TorchScript-able).

    The reciprocal energy is (2π/V) Σ_k weight(k) |S(k)|² over the half space
    of ``integer_k``; padding k-vectors (``valid`` False) get weight 0.
    Arguments as in :func:`padded_reciprocal_energy`.
    """
    reciprocal_cell = 2.0 * math.pi * torch.linalg.inv(cell).transpose(1, 2)
    k_vectors = torch.bmm(integer_k, reciprocal_cell)
    k_squared = (k_vectors * k_vectors).sum(-1)
    safe_k_squared = torch.where(valid, k_squared, torch.ones_like(k_squared))
    weight = 2.0 * torch.exp(-safe_k_squared / (4.0 * alpha[:, None] ** 2)) / safe_k_squared
    weight = weight * switch_off(safe_k_squared.sqrt(), k_switch[:, None], k_cut[:, None])
    return k_vectors, torch.where(valid, weight, torch.zeros_like(weight))


def padded_reciprocal_energy(
    positions: torch.Tensor,
    charges: torch.Tensor,
    cell: torch.Tensor,
    integer_k: torch.Tensor,
    valid: torch.Tensor,
    alpha: torch.Tensor,
    k_switch: torch.Tensor,
    k_cut: torch.Tensor,
) -> torch.Tensor:
    """Reciprocal-space energy of R padded structures, in units of k_e (TorchScript-able).

    Each k-vector's weight is multiplied by :func:`switch_off` (|k|, k_switch, k_cut).

    Args:
        positions: (R, S, 3) positions, Å (padding: anything).
        charges: (R, S) charges, e (padding: 0).
        cell: (R, 3, 3) lattice vectors as rows, Å.
        integer_k: (R, K, 3) integer k-indices n (as floats), k = n @ 2π inv(cell).T,
            one of each pair (n, -n).
        valid: (R, K) bool, False for padding k-vectors.
        alpha: (R,) Ewald splitting parameters, 1/Å.
        k_switch: (R,) where the switch-off of k-vector weights begins, 1/Å.
        k_cut: (R,) where the weights reach zero, 1/Å.

    Returns:
        (R,) energies divided by k_e.
    """
    k_vectors, weight = k_space_weights(cell, integer_k, valid, alpha, k_switch, k_cut)

    phase = torch.bmm(positions, k_vectors.transpose(1, 2))
    if torch.jit.is_scripting():
        cos_phase, sin_phase = torch.cos(phase), torch.sin(phase)
    else:
        cos_phase, sin_phase = _cos_sin(phase)
    cos_part = torch.bmm(charges.unsqueeze(1), cos_phase).squeeze(1)
    sin_part = torch.bmm(charges.unsqueeze(1), sin_phase).squeeze(1)
    volume = torch.linalg.det(cell).abs()
    structure_factor = cos_part**2 + sin_part**2
    return (2.0 * math.pi / volume) * (weight * structure_factor).sum(-1)
