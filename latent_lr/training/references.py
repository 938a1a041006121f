"""Per-element reference energies by least squares."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .dataset import Frame


def fit_reference_energies(frames: Sequence[Frame], species: Sequence[int]) -> dict[int, float]:
    """E_ref(Z) minimising Σ_frames (E - Σ_i E_ref(Z_i))², eV.

    Removing these makes large total energies (formation energies, Hartree-scale
    totals) train well: the network then learns only the small remainder.
    """
    species = list(species)
    counts = np.zeros((len(frames), len(species)))
    energies = np.zeros(len(frames))
    for row, frame in enumerate(frames):
        for column, z in enumerate(species):
            counts[row, column] = np.count_nonzero(frame.atoms.numbers == z)
        energies[row] = frame.energy
    solution, *_ = np.linalg.lstsq(counts, energies, rcond=None)
    return {z: float(e) for z, e in zip(species, solution)}
