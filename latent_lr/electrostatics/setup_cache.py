"""Position-independent Ewald set-up, cached between calls on the same cell.

MD at fixed cell and training epochs over the same structures ask again and
again for the same Ewald parameters and k-index set.  These depend only on the
cell, the number of atoms, the accuracy and the smearing, so they are kept in a
small LRU cache keyed on exactly those values (the cell's float64 values: any
change, however small, misses).  Only floats and integer index arrays are
cached; k-vectors and everything else that is differentiable are recomputed
from the cell tensor on every call, so gradients with respect to the cell
(stress) are unaffected.

Particle-mesh Ewald parameters are kept with hysteresis instead
(:func:`stable_mesh_parameters`): the mesh shape is an integer choice, and the
cheapest choice for each cell (:func:`.mesh_parameters.mesh_parameters`) jumps
as a cell deforms (e.g. (12, 12, 12) -> (12, 12, 9) -> (16, 12, 12) with
alpha 0.55 -> 0.50 -> 0.65 1/Å along a 30 % uniaxial stretch at accuracy
1e-3), and every jump moves the energy by up to the accuracy.  So a run keeps
its alpha, cut-offs and mesh while they still meet the accuracy estimate for
the current cell and cost at most :data:`MESH_REUSE_COST` times a fresh
choice; energy, forces and stress are then smooth functions of the cell.  A
re-choice, when it comes, changes the energy by at most the two parameter
sets' errors, each within the requested accuracy.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from . import reciprocal
from .mesh_parameters import MeshParameters, mesh_cost, mesh_parameters, minimum_mesh
from .parameters import SWITCH_WIDTH, EwaldParameters, accuracy_to_s, ewald_parameters, smearing_alpha

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
    """Forget every cached set-up and kept PME parameters (e.g. to measure cold-start cost)."""
    _cached_setup.cache_clear()
    _kept_mesh_parameters.clear()


#: A run keeps its PME parameters while they cost at most this factor times a fresh choice.
MESH_REUSE_COST = 1.5

#: (n_atoms, accuracy, smearing) -> PME parameters last used, most recent last, with
#: alpha stored as alpha × spacing (dimensionless, spacing = (V/N)^(1/3)) unless the
#: smearing caps it (r_switch = 0).
_kept_mesh_parameters: "OrderedDict[tuple[int, float, float], MeshParameters]" = OrderedDict()


def stable_mesh_parameters(
    n_atoms: int,
    cell_lengths: tuple[float, float, float],
    volume: float,
    accuracy: float,
    smearing: float,
) -> MeshParameters:
    """PME parameters for one periodic structure, kept while the cell deforms.

    For each (n_atoms, accuracy, smearing) the mesh and spline order of the
    last fresh :func:`.mesh_parameters.mesh_parameters` choice are kept, and
    alpha follows the cell continuously: the fresh choice's alpha × spacing
    (spacing = (V/N)^(1/3), as the fresh choice scales it), lowered where
    needed to the largest alpha the kept mesh resolves to the accuracy along
    every lattice vector (K_i ≥ :func:`.mesh_parameters.minimum_mesh`).  The
    accuracy estimate therefore always holds, and energy, forces and stress
    are smooth in the cell.  A fresh choice replaces the kept one only when
    the kept one's modelled cost exceeds :data:`MESH_REUSE_COST` times the
    fresh cost (or the spline order differs).  Results therefore depend on
    earlier calls, but only within the requested accuracy.  At most
    :data:`CACHE_SIZE` keys are kept (least recently used dropped first).

    Arguments (n_atoms; cell lengths |a_i| and volume in Å, Å³; accuracy;
    smearing σ in Å) as for :func:`.mesh_parameters.mesh_parameters`.
    """
    fresh = mesh_parameters(n_atoms, cell_lengths, volume, accuracy, smearing)
    spacing = (volume / n_atoms) ** (1.0 / 3.0)
    key = (int(n_atoms), float(accuracy), float(smearing))
    kept = _kept_mesh_parameters.get(key)
    if kept is not None and kept.order == fresh.order:
        # kept.alpha holds alpha × spacing; minimum_mesh is proportional to alpha.
        resolved = min(
            points / minimum_mesh(1.0, length, accuracy, kept.order)
            for points, length in zip(kept.mesh, cell_lengths)
        )
        alpha = min(kept.alpha / spacing, resolved, smearing_alpha(smearing))
        s = accuracy_to_s(accuracy)
        r_switch = 0.0 if alpha == smearing_alpha(smearing) else s / alpha
        candidate = MeshParameters(alpha, r_switch, (1.0 + SWITCH_WIDTH) * r_switch, kept.mesh, kept.order)
        if mesh_cost(candidate, n_atoms, volume) <= MESH_REUSE_COST * mesh_cost(fresh, n_atoms, volume):
            _kept_mesh_parameters.move_to_end(key)
            return candidate
    # Keep the fresh choice; at the smearing cap alpha × spacing is at least the cap's.
    _kept_mesh_parameters[key] = dataclasses.replace(fresh, alpha=fresh.alpha * spacing)
    _kept_mesh_parameters.move_to_end(key)
    while len(_kept_mesh_parameters) > CACHE_SIZE:
        _kept_mesh_parameters.popitem(last=False)
    return fresh
