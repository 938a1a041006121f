"""Explicit, history-dependent engine state: one object per run (model, calculator).

Every engine entry point (:func:`~.coulomb.coulomb_energy`,
:func:`~.field.electric_field`) takes ``state: EngineState | None``:

* ``state=None``: the call uses no mutable state.  PME chooses its mesh afresh
  for the cell of this call and recomputes its influence function, so the result
  depends on the arguments only.
* ``state=EngineState()``: the call reads and updates this state only.

    - **Keep the mesh** (:meth:`EngineState.mesh_parameters`): the cheapest PME
      mesh for each cell (:func:`.mesh_parameters.mesh_parameters`) jumps as a
      cell deforms (e.g. (12, 12, 12) -> (12, 12, 9) -> (16, 12, 12) with alpha
      0.55 -> 0.50 -> 0.65 1/Å along a 30 % uniaxial stretch at accuracy 1e-3),
      and every jump moves the energy by up to the accuracy.  A state therefore
      keeps the mesh and spline order of its last fresh choice while they still
      meet the accuracy estimate for the current cell and cost at most
      :data:`MESH_REUSE_COST` times a fresh choice; alpha follows the cell
      continuously.  Energy, forces and stress are then smooth in the cell (NPT
      MD).  A re-choice changes the energy by at most the two parameter sets'
      errors, each within the requested accuracy.
    - **PME influence functions** θ(m) for cells and alphas that need no
      gradient (MD without stress, inference), keyed on their exact values
      (:func:`.mesh._cached_influence`); exact, only faster.

    - **Warm starts** (:attr:`EngineState.solutions`, a
      :class:`.warm_start.SolutionMemory`): the last Qeq charges and induced
      dipoles per structure identity, the starting guesses of the next solves
      (results change only within the CG tolerance).
    - **Preconditioners** (:attr:`EngineState.preconditioners`, a
      :class:`.preconditioner_memory.PreconditionerMemory`): the CG
      preconditioner of the last solve, reused while the geometry stays close
      (iterations may change, results only within the CG tolerance).

Two states never influence each other.  :meth:`EngineState.clear_caches`
empties one.  The remaining module-level caches are ``functools.lru_cache`` of
pure functions (Ewald set-up per cell, PME parameter choices, spline order, Nyquist factors): they
never change a result; :func:`.setup_cache.clear_setup_cache` empties them
(e.g. to measure cold-start cost).

Copying or pickling a state (``copy.deepcopy`` of a model, ``torch.save``)
gives an empty state with the same settings: caches are not part of a model.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Any

import torch

from .mesh_parameters import MeshParameters, mesh_cost, mesh_parameters, minimum_mesh
from .parameters import SWITCH_WIDTH, accuracy_to_s, smearing_alpha
from .preconditioner_memory import PreconditionerMemory
from .warm_start import SolutionMemory

#: A state keeps its PME parameters while they cost at most this factor times a fresh choice.
MESH_REUSE_COST = 1.5

#: Most (n_atoms, accuracy, smearing) keys whose PME parameters one state keeps.
KEPT_MESHES = 128

#: Most influence functions one state keeps: one per (cells, alphas, mesh, order) group.
INFLUENCE_CACHE_SIZE = 8


class EngineState:
    """Mutable engine state of one run: kept PME meshes and PME influence functions.

    Args:
        mesh_reuse_cost: a kept PME mesh is used while its modelled cost is at
            most this factor (≥ 1) times a fresh choice's.
        kept_meshes: most (n_atoms, accuracy, smearing) keys kept (least
            recently used dropped first).
        influence_cache_size: most PME influence functions kept.

    Attributes:
        kept_meshes: (n_atoms, accuracy, smearing) -> PME parameters of the last
            fresh choice, most recent last, with alpha stored as alpha × spacing
            (dimensionless, spacing = (V/N)^(1/3)).
        influence: key -> θ tensor (see :func:`.mesh._cached_influence`).
        solutions: last iterative-solve solutions per structure identity (warm starts).
        preconditioners: last CG preconditioners per solve set-up, reused along a trajectory.
    """

    def __init__(
        self,
        *,
        mesh_reuse_cost: float = MESH_REUSE_COST,
        kept_meshes: int = KEPT_MESHES,
        influence_cache_size: int = INFLUENCE_CACHE_SIZE,
    ) -> None:
        if not mesh_reuse_cost >= 1.0:
            raise ValueError(f"mesh_reuse_cost must be ≥ 1 (a factor on the fresh cost), got {mesh_reuse_cost}.")
        if kept_meshes < 1 or influence_cache_size < 0:
            raise ValueError(
                f"kept_meshes must be ≥ 1 and influence_cache_size ≥ 0, got {kept_meshes} and "
                f"{influence_cache_size}."
            )
        self.mesh_reuse_cost = float(mesh_reuse_cost)
        self.max_kept_meshes = int(kept_meshes)
        self.influence_cache_size = int(influence_cache_size)
        self.kept_meshes: OrderedDict[tuple[int, float, float], MeshParameters] = OrderedDict()
        self.influence: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.solutions = SolutionMemory()
        self.preconditioners = PreconditionerMemory()

    def clear_caches(self) -> None:
        """Forget the kept PME meshes, the cached influence functions, the warm-start solutions and the kept
        preconditioners."""
        self.kept_meshes.clear()
        self.influence.clear()
        self.solutions.clear()
        self.preconditioners.clear()

    def is_empty(self) -> bool:
        """True when the state holds nothing (fresh or just cleared)."""
        return not self.kept_meshes and not self.influence and not len(self.solutions) and not len(self.preconditioners)

    def mesh_parameters(
        self,
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
        the kept one's modelled cost exceeds ``mesh_reuse_cost`` times the
        fresh cost (or the spline order differs).  Results therefore depend on
        earlier calls with this state, but only within the requested accuracy.

        Args:
            n_atoms: number of charges in the cell.
            cell_lengths: |a_i| of the three lattice vectors, Å.
            volume: cell volume, Å³.
            accuracy: target relative error.
            smearing: Gaussian charge width σ, Å.
        """
        fresh = mesh_parameters(n_atoms, cell_lengths, volume, accuracy, smearing)
        spacing = (volume / n_atoms) ** (1.0 / 3.0)
        key = (int(n_atoms), float(accuracy), float(smearing))
        kept = self.kept_meshes.get(key)
        if kept is not None and kept.order == fresh.order:
            # kept.alpha holds alpha × spacing; minimum_mesh is proportional to alpha.
            resolved = min(
                points / minimum_mesh(1.0, length, accuracy, kept.order)
                for points, length in zip(kept.mesh, cell_lengths)
            )
            alpha = min(kept.alpha / spacing, resolved, smearing_alpha(smearing))
            r_switch = 0.0 if alpha == smearing_alpha(smearing) else accuracy_to_s(accuracy) / alpha
            candidate = MeshParameters(alpha, r_switch, (1.0 + SWITCH_WIDTH) * r_switch, kept.mesh, kept.order)
            if mesh_cost(candidate, n_atoms, volume) <= self.mesh_reuse_cost * mesh_cost(fresh, n_atoms, volume):
                self.kept_meshes.move_to_end(key)
                return candidate
        # Keep the fresh choice; at the smearing cap alpha × spacing is at least the cap's.
        self.kept_meshes[key] = dataclasses.replace(fresh, alpha=fresh.alpha * spacing)
        self.kept_meshes.move_to_end(key)
        while len(self.kept_meshes) > self.max_kept_meshes:
            self.kept_meshes.popitem(last=False)
        return fresh

    def __getstate__(self) -> dict[str, Any]:
        # Copies and pickles start empty: caches are not part of a model.
        return {
            "mesh_reuse_cost": self.mesh_reuse_cost,
            "kept_meshes": self.max_kept_meshes,
            "influence_cache_size": self.influence_cache_size,
        }

    def __setstate__(self, settings: dict[str, Any]) -> None:
        self.__init__(**settings)  # type: ignore[misc]

    def __repr__(self) -> str:
        return (
            f"EngineState({len(self.kept_meshes)} kept PME meshes, "
            f"{len(self.influence)} influence functions, {len(self.solutions)} warm-start solutions, "
            f"{len(self.preconditioners)} kept preconditioners, "
            f"mesh_reuse_cost={self.mesh_reuse_cost})"
        )
