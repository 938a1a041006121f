"""Position-independent Ewald set-up, cached between calls on the same cell.

MD at fixed cell and training epochs over the same structures ask again and
again for the same Ewald parameters and k-index set.  These depend only on the
cell, the number of atoms, the accuracy and the smearing, so they are kept in a
small LRU cache keyed on exactly those values (the cell's float64 values: any
change, however small, misses).  Only floats and integer index arrays are
cached; k-vectors and everything else that is differentiable are recomputed
from the cell tensor on every call, so gradients with respect to the cell
(stress) are unaffected.

The cache is a pure function of its arguments, so it never changes a result
and may stay module-level.  History-dependent state (the PME keep-the-mesh
choice, PME influence functions) lives in :class:`.state.EngineState`
instead; :func:`clear_setup_cache` empties this and the other pure caches.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from . import reciprocal
from .mesh_parameters import _cheapest, nyquist_factor, spline_order
from .parameters import EwaldParameters, ewald_parameters

#: Number of (cell, n_atoms, accuracy, smearing) set-ups kept.
CACHE_SIZE = 128


@dataclass(frozen=True)
class EwaldSetup:
    """What one structure's Ewald sum needs besides positions and charges.

    Attributes:
        parameters: alpha and cut-offs.
        k_indices: (K, 3) read-only integer k-indices of one half of k-space
            with |k| < ``parameters.k_cut``.
    """

    parameters: EwaldParameters
    k_indices: np.ndarray


def ewald_setup(cell: np.ndarray, n_atoms: int, accuracy: float, smearing: float) -> EwaldSetup:
    """Cached :class:`EwaldSetup` of one periodic structure.

    Args:
        cell: (3, 3) lattice vectors as rows, Å (detached values).
        n_atoms: number of charges in the cell.
        accuracy: target relative error.
        smearing: Gaussian charge width σ, Å.
    """
    key = tuple(np.asarray(cell, dtype=np.float64).ravel().tolist())
    return _cached_setup(key, int(n_atoms), float(accuracy), float(smearing))


@lru_cache(maxsize=CACHE_SIZE)
def _cached_setup(
    cell_values: tuple[float, ...], n_atoms: int, accuracy: float, smearing: float
) -> EwaldSetup:
    cell = np.array(cell_values).reshape(3, 3)
    parameters = ewald_parameters(n_atoms, abs(float(np.linalg.det(cell))), accuracy, smearing)
    k_indices = reciprocal.half_space_k_indices(cell, parameters.k_cut)
    k_indices.setflags(write=False)
    return EwaldSetup(parameters, k_indices)


def cached_setups() -> int:
    """Number of set-ups currently cached (at most :data:`CACHE_SIZE`)."""
    return _cached_setup.cache_info().currsize


def clear_setup_cache() -> None:
    """Empty every module-level cache of the engine (e.g. to measure cold-start cost).

    These are ``functools.lru_cache`` of pure functions: the Ewald set-up per
    cell, the PME parameter choices, spline order and Nyquist factors.  Clearing them never
    changes a result.  A run's own state is emptied by
    :meth:`.state.EngineState.clear_caches`.
    """
    _cached_setup.cache_clear()
    nyquist_factor.cache_clear()
    spline_order.cache_clear()
    _cheapest.cache_clear()
