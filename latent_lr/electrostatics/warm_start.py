"""Warm starts of the iterative solves: the last converged solution per structure identity.

Along an MD trajectory (or from one training epoch to the next) the Qeq charges
and the induced dipoles of a structure change little between calls, so the
last converged solution is a far better conjugate-gradient start than the
Jacobi guess.  :class:`SolutionMemory` keeps, for each solve kind (``"qeq"``,
``"induction"``) and each structure identity, the last solution; the next solve
of a structure with the same identity starts from it
(:func:`~.linear_solve.solve_spd` ``initial``).

Identity is the sequence of atomic numbers (:func:`structure_keys`): the same
molecule in a new geometry, or another configuration of the same composition,
reuses the guess.  A wrong or stale guess costs iterations, never accuracy: the
solver moves the guess onto the constraint set and iterates to the same
tolerance, and the implicit derivatives do not depend on the start, so results
and gradients equal a cold start's to the CG tolerance.

Extrapolated guesses (MD): along a trajectory the solution is a smooth function
of time, so with the solutions of the last d + 1 steps kept, the degree-d
polynomial through them evaluated one step ahead,

    x_guess = Σ_{j=0}^{d} (−1)^j C(d+1, j+1) x_{t−j}     (d = 1: 2x_t − x_{t−1}; d = 2: 3x_t − 3x_{t−1} + x_{t−2}),

is off by O(Δt^{d+1}) instead of the last solution's O(Δt) (Gear-type
predictors; cf. Kolafa, J. Comput. Chem. 25, 335 (2004)).  Solves at
unchanged positions (a second call in the same step) replace the last entry
instead of adding one, so the history stays one entry per step.

One memory belongs to one :class:`~.state.EngineState` (one run); copies and
pickles of a state start with an empty memory.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Optional

import torch

from .linear_solve import SolveStatistics

#: Most (kind, structure) solutions one memory keeps (least recently used dropped first).
KEPT_SOLUTIONS = 4096

#: Highest degree of the extrapolated guess (the memory keeps this many earlier solutions per structure).
MAX_EXTRAPOLATION = 3


def extrapolation_weights(degree: int) -> list[float]:
    """Weights of x_t, x_{t−1}, ... in the degree-``degree`` polynomial extrapolation one step ahead."""
    if not 0 <= degree <= MAX_EXTRAPOLATION:
        raise ValueError(f"the warm-start extrapolation degree must lie in 0..{MAX_EXTRAPOLATION}, got {degree}.")
    return [float((-1) ** j * math.comb(degree + 1, j + 1)) for j in range(degree + 1)]


def structure_keys(numbers: torch.Tensor, batch: torch.Tensor, n_structures: int) -> list[bytes]:
    """One identity per structure: the bytes of its atomic numbers (one host copy for the batch).

    Args:
        numbers: (N,) atomic numbers; batch: (N,) sorted structure index; n_structures: B.
    """
    counts = torch.bincount(batch, minlength=n_structures).tolist()
    host = numbers.detach().to("cpu", torch.int64).numpy()
    keys, start = [], 0
    for count in counts:
        keys.append(host[start : start + count].tobytes())
        start += count
    return keys


@dataclass
class WarmStartedSolve:
    """One solve's starting guess and iteration record; :meth:`finish` keeps its solution.

    Attributes:
        initial: (N, ...) starting guess, or None (cold start).
        statistics: pass to the solver; its iteration counts are the memory's record for this kind.
    """

    memory: "SolutionMemory"
    kind: str
    keys: Optional[list[bytes]]
    initial: Optional[torch.Tensor]
    statistics: SolveStatistics = field(default_factory=SolveStatistics)
    positions: Optional[torch.Tensor] = None

    def finish(self, solution: torch.Tensor) -> None:
        """Keep ``solution`` (N, ...) as the next warm start (when warm starts are on)."""
        if self.keys is not None:
            self.memory.remember(self.kind, self.keys, solution, self.positions)


class SolutionMemory:
    """Last converged solution of each (solve kind, structure identity), plus the last iteration counts.

    Args:
        capacity: most solutions kept (least recently used dropped first).

    Attributes:
        iterations: solve kind -> CG iteration counts of the last solve of that
            kind (forward first, then the adjoint solves of a backward pass, which
            are appended as they run).
        exact_products: solve kind -> products with the exact operator of the last
            solve's refined runs (empty where no cheap operator took part).
    """

    def __init__(self, capacity: int = KEPT_SOLUTIONS) -> None:
        if capacity < 1:
            raise ValueError(f"the solution memory needs capacity ≥ 1, got {capacity}.")
        self.capacity = int(capacity)
        self.solutions: OrderedDict[tuple[str, bytes], torch.Tensor] = OrderedDict()
        self.iterations: dict[str, list[int]] = {}
        self.exact_products: dict[str, list[int]] = {}
        #: (kind, structure) -> (positions, solution) of the last steps, most recent first (extrapolation).
        self.history: dict[tuple[str, bytes], list[tuple[Optional[torch.Tensor], torch.Tensor]]] = {}

    def clear(self) -> None:
        """Forget every kept solution and iteration count."""
        self.solutions.clear()
        self.iterations.clear()
        self.exact_products.clear()
        self.history.clear()

    def __len__(self) -> int:
        return len(self.solutions)

    def begin(
        self, kind: str, numbers: torch.Tensor, batch: torch.Tensor, n_structures: int, like: torch.Tensor,
        warm: bool = True, extrapolation: int = 0, positions: Optional[torch.Tensor] = None,
    ) -> WarmStartedSolve:
        """Start a solve of ``kind``: the kept guess for these structures (if ``warm``) and a fresh iteration record.

        Args:
            kind: the solve (``"qeq"``, ``"induction"``).
            numbers: (N,) atomic numbers; batch: (N,) sorted structure index; n_structures: B.
            like: (N, ...) tensor whose shape, dtype and device the guess takes.
            warm: use and update the kept solutions; False records iterations only.
            extrapolation: degree d of the extrapolated guess from the last d + 1 kept steps (module
                docstring; lower while fewer are kept); 0: the last solution.
            positions: (N, 3) Å of this solve; a later solve at the same positions replaces this
                step's entry in the history instead of adding one.  None: every solve is a new step.
        """
        keys = structure_keys(numbers, batch, n_structures) if warm else None
        initial = None if keys is None else self.guess(kind, keys, like, extrapolation)
        solve = WarmStartedSolve(self, kind, keys, initial, positions=None if positions is None else positions.detach())
        self.iterations[kind] = solve.statistics.iterations
        self.exact_products[kind] = solve.statistics.exact_products
        return solve

    def guess(self, kind: str, keys: list[bytes], like: torch.Tensor, extrapolation: int = 0) -> Optional[torch.Tensor]:
        """The kept solutions of these structures in batch order, zeros for unknown ones; None if none is known.

        Args:
            kind: the solve (``"qeq"``, ``"induction"``).
            keys: one identity per structure (:func:`structure_keys`).
            like: (N, ...) tensor whose shape, dtype and device the guess takes.
            extrapolation: degree of the extrapolated guess (see :meth:`begin`).
        """
        extrapolation_weights(extrapolation)  # checks the degree
        parts, known = [], False
        for key in keys:
            kept = self.solutions.get((kind, key))
            if kept is not None:
                self.solutions.move_to_end((kind, key))
                known = True
                steps = self.history.get((kind, key), [])
                degree = min(extrapolation, len(steps) - 1)
                if degree > 0 and all(s.shape == kept.shape for _, s in steps[: degree + 1]):
                    weights = extrapolation_weights(degree)
                    kept = sum((w * s for w, (_, s) in zip(weights, steps)), torch.zeros_like(kept))
            parts.append(kept)
        if not known:
            return None
        counts = [len(key) // 8 for key in keys]  # int64 atomic numbers
        rows = [
            like.new_zeros((count, *like.shape[1:])) if part is None or part.shape[1:] != like.shape[1:]
            else part.to(like)
            for part, count in zip(parts, counts)
        ]
        return torch.cat(rows)

    def remember(
        self, kind: str, keys: list[bytes], solution: torch.Tensor, positions: Optional[torch.Tensor] = None
    ) -> None:
        """Keep each structure's rows of ``solution`` (N, ...) (detached) under its identity.

        ``positions`` (N, 3) Å: the geometry of the solve; a structure whose last kept step has the
        same positions gets that step replaced (None: always a new step).
        """
        start = 0
        for key in keys:
            count = len(key) // 8
            rows = solution[start : start + count].detach().clone()
            where = None if positions is None else positions[start : start + count].detach().clone()
            self.solutions[(kind, key)] = rows
            self.solutions.move_to_end((kind, key))
            steps = self.history.setdefault((kind, key), [])
            last = steps[0][0] if steps else None
            if steps and where is not None and last is not None and last.shape == where.shape and torch.equal(last, where):
                steps[0] = (where, rows)
            else:
                steps.insert(0, (where, rows))
                del steps[MAX_EXTRAPOLATION + 1 :]
            start += count
        while len(self.solutions) > self.capacity:
            dropped, _ = self.solutions.popitem(last=False)
            self.history.pop(dropped, None)
