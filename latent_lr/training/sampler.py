"""Epoch plans: which structures each rank trains on at each step.

:func:`plan_epoch` splits one epoch of structures into per-rank batches,
``plan[rank][step] = [structure indices]``, for one process (``world_size=1``)
or for data-parallel training, where every rank must run the same number of
steps (DDP's gradient all-reduce is a lockstep) and a step lasts as long as
its slowest rank.

Two modes:

* **fixed count** (``max_atoms=None, max_edges=None``): a seeded permutation
  cut into batches of ``batch_size`` structures (step s, rank r takes
  positions ``(s·W + r)·b ... (s·W + r + 1)·b`` of the permutation).  With one
  rank this is the trainer's historical order exactly.
* **size budget** (``max_atoms`` and/or ``max_edges`` given): batches hold as
  many structures as fit in the budget of atoms (and directed edges within the
  model's cut-off) per rank and step.  The permutation is consumed a step at a
  time: structures are taken in shuffled order while the step's total stays
  within W budgets, then packed onto the W ranks by a greedy multi-objective
  bin packing (sorted decreasing, each structure to the rank whose larger
  normalised load, max(atoms/max_atoms, edges/max_edges), stays smallest;
  the LPT rule, as in the load balancing of Firoz et al., "Optimizing the
  training of chemistry foundation models", 2025).  Structures that fit no
  rank go back to the front of the queue for the next step.  Batch
  composition is random (it follows the permutation), work per step balanced.
  ``batch_size`` then caps the structures per batch (None: no cap).

Bounds (budget mode, atoms only): every batch holds at most ``max_atoms``
atoms; within a step the ranks' atom counts differ by at most the largest
structure's (the greedy always adds to the least-loaded rank that can take
the structure).  The last step of an epoch may be partly filled; if it has
fewer structures than ranks, structures move there from earlier steps so
that no rank ever gets an empty batch.

Every structure appears exactly once per epoch; the plan depends only on the
sizes, the options, ``seed`` and ``epoch``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np

from ..errors import UserInputError

#: plan[rank][step] = structure indices of that rank's batch.
EpochPlan = list[list[list[int]]]

#: (S,) integer counts per structure (atoms or edges).
Counts = Union[Sequence[int], np.ndarray]


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch ``epoch``'s permutation (the trainer's historical choice)."""
    return seed * 100_003 + epoch


def oversized_structures(
    n_atoms: Counts, n_edges: Optional[Counts], max_atoms: Optional[int], max_edges: Optional[int]
) -> list[int]:
    """Indices of structures that alone exceed the atom or edge budget (no batch can hold them)."""
    too_big = np.zeros(len(n_atoms), dtype=bool)
    if max_atoms is not None:
        too_big |= np.asarray(n_atoms) > max_atoms
    if max_edges is not None and n_edges is not None:
        too_big |= np.asarray(n_edges) > max_edges
    return [int(i) for i in np.flatnonzero(too_big)]


def plan_epoch(
    n_atoms: Counts,
    n_edges: Optional[Counts] = None,
    *,
    batch_size: Optional[int],
    max_atoms: Optional[int] = None,
    max_edges: Optional[int] = None,
    world_size: int = 1,
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool = True,
) -> EpochPlan:
    """Batches of one epoch for each of ``world_size`` ranks (see the module docstring).

    Args:
        n_atoms: (S,) atoms per structure.
        n_edges: (S,) directed edges within the cut-off per structure (needed with ``max_edges``).
        batch_size: structures per batch (fixed-count mode), or a cap on them (budget mode, None: none).
        max_atoms: atoms per batch and rank, or None.
        max_edges: directed edges per batch and rank, or None.
        world_size: number of ranks W.
        seed, epoch: the permutation is ``default_rng(seed * 100_003 + epoch)``.
        shuffle: False keeps the structures in order (validation), packing them in the same way.

    Returns:
        ``plan[rank][step]``: lists of structure indices; every rank has the same number of steps,
        no batch is empty, and every index in ``range(S)`` occurs exactly once.
    """
    count = len(n_atoms)
    if world_size < 1:
        raise UserInputError(f"world_size must be at least 1, got {world_size}.")
    if batch_size is not None and batch_size < 1:
        raise UserInputError(f"the batch size must be at least 1, got {batch_size}.")
    if count == 0:
        return [[] for _ in range(world_size)]
    if count < world_size:
        raise UserInputError(f"{count} structures cannot give each of {world_size} ranks a batch; use fewer processes or more data.")
    rng = np.random.default_rng(epoch_seed(seed, epoch))
    order = rng.permutation(count) if shuffle else np.arange(count)
    if max_atoms is None and max_edges is None:
        if batch_size is None:
            raise UserInputError("give a batch size or an atom/edge budget per batch.")
        return _fixed_count_plan(order, batch_size, world_size)
    loads = _normalised_loads(n_atoms, n_edges, max_atoms, max_edges)
    steps = _budget_steps(order, loads, batch_size, world_size, rng if shuffle else None)
    _fill_last_step(steps)
    return [[[int(i) for i in step[rank]] for step in steps] for rank in range(world_size)]


def _fixed_count_plan(order: np.ndarray, batch_size: int, world_size: int) -> EpochPlan:
    plan: EpochPlan = [[] for _ in range(world_size)]
    per_step = batch_size * world_size
    for start in range(0, len(order), per_step):
        chunk = order[start : start + per_step]
        if len(chunk) < world_size:  # too few left for a step: one more structure in each of the last batches
            for rank, index in enumerate(chunk):
                plan[rank][-1].append(int(index))
            break
        parts = [chunk[r * batch_size : (r + 1) * batch_size] for r in range(world_size)]
        if len(chunk) < per_step:
            parts = np.array_split(chunk, world_size)
        for rank, part in enumerate(parts):
            plan[rank].append([int(i) for i in part])
    return plan


def _normalised_loads(
    n_atoms: Counts, n_edges: Optional[Counts], max_atoms: Optional[int], max_edges: Optional[int]
) -> np.ndarray:
    """(S, D) size of each structure as a fraction of each budget (D = 1 or 2)."""
    columns = []
    for name, sizes, budget in (("atoms", n_atoms, max_atoms), ("edges", n_edges, max_edges)):
        if budget is None:
            continue
        if budget < 1:
            raise UserInputError(f"the {name} budget per batch must be at least 1, got {budget}.")
        if sizes is None:
            raise UserInputError(f"an {name} budget needs the number of {name} of every structure.")
        if len(sizes) != len(n_atoms):
            raise UserInputError(f"{len(sizes)} {name} counts for {len(n_atoms)} structures.")
        columns.append(np.asarray(sizes, dtype=float) / budget)
    loads = np.stack(columns, axis=1)
    oversized = oversized_structures(n_atoms, n_edges, max_atoms, max_edges)
    if oversized:
        first = oversized[0]
        raise UserInputError(
            f"structure {first} (0-based; {len(oversized)} in all) alone exceeds the per-batch budget "
            f"({int(n_atoms[first])} atoms{'' if n_edges is None else f', {int(n_edges[first])} edges'}); "
            "raise --max-atoms-per-batch / --max-edges-per-batch."
        )
    return loads


def _budget_steps(
    order: np.ndarray, loads: np.ndarray, batch_size: Optional[int], world_size: int, rng: Optional[np.random.Generator]
) -> list[list[list[int]]]:
    """steps[step][rank]: greedy packing of the queue, one step at a time."""
    queue = deque(int(i) for i in order)
    steps: list[list[list[int]]] = []
    per_step_cap = None if batch_size is None else batch_size * world_size
    while queue:
        taken: list[int] = []
        total = np.zeros(loads.shape[1])
        while queue and (per_step_cap is None or len(taken) < per_step_cap):
            if (total + loads[queue[0]] > world_size + 1e-12).any():
                break
            index = queue.popleft()
            taken.append(index)
            total += loads[index]
        bins, rejected = _pack(taken, loads, batch_size, world_size)
        queue.extendleft(reversed(rejected))
        if rng is not None:
            bins = [bins[r] for r in rng.permutation(world_size)]
        steps.append(bins)
    return steps


def _pack(taken: list[int], loads: np.ndarray, batch_size: Optional[int], world_size: int) -> tuple[list[list[int]], list[int]]:
    """Sorted-decreasing greedy: each structure to the rank whose larger normalised load stays smallest.

    Returns the W bins and the structures that fit no bin (in their queue order).
    """
    position = {index: k for k, index in enumerate(taken)}
    by_size = sorted(taken, key=lambda i: -loads[i].max())  # stable: ties keep the shuffled order
    bins: list[list[int]] = [[] for _ in range(world_size)]
    bin_loads = np.zeros((world_size, loads.shape[1]))
    rejected = []
    for index in by_size:
        after = bin_loads + loads[index]
        fits = (after <= 1.0 + 1e-12).all(axis=1)
        if batch_size is not None:
            fits &= np.array([len(b) < batch_size for b in bins])
        if not fits.any():
            rejected.append(index)
            continue
        score = np.where(fits, after.max(axis=1), np.inf)
        target = int(np.argmin(score))
        bins[target].append(index)
        bin_loads[target] = after[target]
    return bins, sorted(rejected, key=position.__getitem__)


def _fill_last_step(steps: list[list[list[int]]]) -> None:
    """Give every rank of the last step a structure, moving single structures from earlier steps."""
    last = steps[-1]
    for rank, batch in enumerate(last):
        if batch:
            continue
        donor = next((b for step in reversed(steps[:-1]) for b in step if len(b) > 1), None)
        if donor is None:
            raise UserInputError(
                f"every batch holds a single structure, so {len(last)} ranks cannot all get a batch in the last step; "
                "raise --max-atoms-per-batch / --max-edges-per-batch or use fewer processes."
            )
        last[rank] = [donor.pop()]


@dataclass(frozen=True)
class PlanBalance:
    """How evenly a plan spreads work over ranks, assuming a step lasts as long as its busiest rank.

    ``*_max_over_mean`` = Σ_steps max_rank work / Σ_steps mean_rank work (1 = perfect);
    ``*_idle_fraction`` = 1 − mean/max summed the same way: the share of rank-time spent waiting.
    Work is counted in atoms and, where edge counts are given, in edges.
    """

    world_size: int
    steps: int
    atoms_max_over_mean: float
    atoms_idle_fraction: float
    edges_max_over_mean: Optional[float]
    edges_idle_fraction: Optional[float]
    mean_batch_atoms: float
    max_batch_atoms: int
    mean_batch_structures: float

    def as_dict(self) -> dict[str, Optional[float]]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def plan_balance(plan: EpochPlan, n_atoms: Counts, n_edges: Optional[Counts] = None) -> PlanBalance:
    """Per-rank work balance of ``plan`` (see :class:`PlanBalance`)."""
    atoms = _work_per_rank_and_step(plan, n_atoms)
    edges = None if n_edges is None else _work_per_rank_and_step(plan, n_edges)
    sizes = np.array([[len(batch) for batch in rank] for rank in plan], dtype=float)

    def ratio(work: np.ndarray) -> float:
        return float(work.max(axis=0).sum() / work.mean(axis=0).sum())

    return PlanBalance(
        world_size=len(plan),
        steps=atoms.shape[1],
        atoms_max_over_mean=ratio(atoms),
        atoms_idle_fraction=1.0 - 1.0 / ratio(atoms),
        edges_max_over_mean=None if edges is None else ratio(edges),
        edges_idle_fraction=None if edges is None else 1.0 - 1.0 / ratio(edges),
        mean_batch_atoms=float(atoms.mean()),
        max_batch_atoms=int(atoms.max()),
        mean_batch_structures=float(sizes.mean()),
    )


def _work_per_rank_and_step(plan: EpochPlan, sizes: Counts) -> np.ndarray:
    """(W, steps) summed sizes of each batch."""
    values = np.asarray(sizes)
    return np.array([[values[batch].sum() for batch in rank] for rank in plan], dtype=float)
