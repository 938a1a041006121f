"""Reuse of CG preconditioners from one solve to the next of nearly the same geometry (MD steps).

Setting up the k-space and near-field preconditioners of :mod:`.kspace_preconditioner` and
:mod:`.block_preconditioner` (spline supports, a neighbour search, block eigendecompositions)
costs about as much as several CG products: ~0.1 s per call for 10,000 water atoms, where
an MD step of the joint charge–dipole solve takes ~1.5 s.  Any fixed symmetric
positive-definite P⁻¹ keeps CG's convergence and its result to the tolerance; a P⁻¹ built
at a slightly different geometry only models H a little less well.  Along a trajectory the
one built a few steps earlier is therefore reused while the structures are the same (atom
count per structure, boundary conditions, cell, σ, dtypes) and

* no atom has moved more than :data:`REUSE_DISPLACEMENT` Å from where it was built,
* no per-atom parameter it was built from (the operator's diagonal, hardness plus self-energy;
  √α for the joint blocks) has changed by more than the fraction :data:`REUSE_PARAMETER_CHANGE`,
* it has served fewer than :data:`REUSE_CALLS` solves.

Measured at 3,000 water atoms (velocity Verlet, 1 fs): the preconditioner of the first step
reused for ten steps leaves the joint solve's CG products at 16–19 per step, as rebuilt
every step.  A memory belongs to one :class:`~.state.EngineState`; copies start empty.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Hashable, Optional

import torch

from .linear_solve import Preconditioner

if TYPE_CHECKING:
    from .state import EngineState

#: Largest displacement of any atom (Å) since the set-up for which a kept preconditioner is reused.
REUSE_DISPLACEMENT = 0.3

#: Largest relative change of any per-atom parameter since the set-up for which a kept preconditioner is reused.
REUSE_PARAMETER_CHANGE = 0.1

#: Most solves one kept preconditioner serves before it is rebuilt.
REUSE_CALLS = 20

#: Most preconditioners one memory keeps (least recently used dropped first).
KEPT_PRECONDITIONERS = 4


@dataclass
class _Kept:
    preconditioner: Optional[Preconditioner]  # None: Jacobi
    positions: torch.Tensor
    cell: torch.Tensor
    parameters: torch.Tensor
    calls: int = 1


class PreconditionerMemory:
    """The last preconditioner per solve set-up (kind, batch layout, dtypes), reused while the geometry is close.

    Attributes:
        builds: preconditioners set up through this memory so far (the rest of the calls reused one).
    """

    def __init__(self, capacity: int = KEPT_PRECONDITIONERS) -> None:
        if capacity < 1:
            raise ValueError(f"the preconditioner memory needs capacity ≥ 1, got {capacity}.")
        self.capacity = int(capacity)
        self.kept: OrderedDict[Hashable, _Kept] = OrderedDict()
        self.builds = 0

    def clear(self) -> None:
        """Forget every kept preconditioner."""
        self.kept.clear()

    def __len__(self) -> int:
        return len(self.kept)

    def preconditioner(
        self, kind: str, positions: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor, batch: torch.Tensor,
        parameters: torch.Tensor, smearing: float, build: Callable[[], Optional[Preconditioner]],
    ) -> Optional[Preconditioner]:
        """The kept preconditioner of ``kind`` for this batch if it may be reused (module docstring), else ``build()``.

        Args:
            kind: the solve and preconditioner (e.g. ``"qeq/blocks"``); part of the key with σ and the layout.
            positions: (N, 3) Å; cell: (B, 3, 3) Å; pbc: (B, 3); batch: (N,) sorted structure index.
            parameters: (N, ...) the per-atom values the preconditioner is built from (e.g. the operator's diagonal).
            smearing: σ, Å.
            build: sets the preconditioner up (without a graph); None stands for Jacobi.
        """
        positions, cell, parameters = positions.detach(), cell.detach(), parameters.detach()
        counts = tuple(torch.bincount(batch, minlength=cell.shape[0]).tolist())
        key = (kind, counts, tuple(pbc.flatten().tolist()), float(smearing), positions.dtype, positions.device,
               tuple(parameters.shape))
        kept = self.kept.get(key)
        if kept is not None and self._close(kept, positions, cell, parameters):
            kept.calls += 1
            self.kept.move_to_end(key)
            return kept.preconditioner
        preconditioner = build()
        self.builds += 1
        self.kept[key] = _Kept(preconditioner, positions.clone(), cell.clone(), parameters.clone())
        self.kept.move_to_end(key)
        while len(self.kept) > self.capacity:
            self.kept.popitem(last=False)
        return preconditioner

    @staticmethod
    def _close(kept: _Kept, positions: torch.Tensor, cell: torch.Tensor, parameters: torch.Tensor) -> bool:
        if kept.calls >= REUSE_CALLS or not torch.equal(kept.cell, cell):
            return False
        moved = float((positions - kept.positions).norm(dim=1).max()) if len(positions) else 0.0
        change = (parameters - kept.parameters).abs() / kept.parameters.abs().clamp_min(1e-300)
        changed = float(change.max()) if change.numel() else 0.0
        return moved <= REUSE_DISPLACEMENT and changed <= REUSE_PARAMETER_CHANGE


def kept_preconditioner(
    kind: str, state: Optional["EngineState"], positions: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor,
    batch: torch.Tensor, parameters: torch.Tensor, smearing: torch.Tensor,
    build: Callable[[], Optional[Preconditioner]],
) -> Optional[Preconditioner]:
    """``build()`` (None: Jacobi), or with a ``state`` the one its memory kept from a solve at nearly this
    geometry (:meth:`PreconditionerMemory.preconditioner`, same arguments; σ (Å) as a tensor)."""
    if state is None:
        return build()
    return state.preconditioners.preconditioner(
        kind, positions, cell, pbc, batch, parameters, float(smearing.detach()), build
    )
