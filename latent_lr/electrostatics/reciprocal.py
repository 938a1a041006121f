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
    :func:`padded_reciprocal_energy`.

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
    n_slots = int(atom_slot.max().item()) + 1
    k_max = max(1, max(len(k) for k in k_indices))
    padded_n = np.zeros((n_rows, k_max, 3))
    valid_np = np.zeros((n_rows, k_max), dtype=bool)
    for row, k in enumerate(k_indices):
        padded_n[row, : len(k)] = k
        valid_np[row, : len(k)] = True
    integer_k = torch.from_numpy(padded_n).to(device=device, dtype=dtype)
    valid = torch.from_numpy(valid_np).to(device)

    padded_positions = positions.new_zeros(n_rows, n_slots, 3)
    padded_positions = padded_positions.index_put((atom_row, atom_slot), positions)
    padded_charges = charges.new_zeros(n_rows, n_slots)
    padded_charges = padded_charges.index_put((atom_row, atom_slot), charges)
    return padded_reciprocal_energy(
        padded_positions, padded_charges, cell, integer_k, valid, alpha, k_switch, k_cut
    )


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
    reciprocal_cell = 2.0 * math.pi * torch.linalg.inv(cell).transpose(1, 2)
    k_vectors = torch.bmm(integer_k, reciprocal_cell)
    k_squared = (k_vectors * k_vectors).sum(-1)
    safe_k_squared = torch.where(valid, k_squared, torch.ones_like(k_squared))
    weight = 2.0 * torch.exp(-safe_k_squared / (4.0 * alpha[:, None] ** 2)) / safe_k_squared
    weight = weight * switch_off(safe_k_squared.sqrt(), k_switch[:, None], k_cut[:, None])
    weight = torch.where(valid, weight, torch.zeros_like(weight))

    phase = torch.bmm(positions, k_vectors.transpose(1, 2))
    cos_part = torch.bmm(charges.unsqueeze(1), torch.cos(phase)).squeeze(1)
    sin_part = torch.bmm(charges.unsqueeze(1), torch.sin(phase)).squeeze(1)
    volume = torch.linalg.det(cell).abs()
    structure_factor = cos_part**2 + sin_part**2
    return (2.0 * math.pi / volume) * (weight * structure_factor).sum(-1)
