"""Which structures each rank trains on at each step of an epoch: ``plan[rank][step]`` = frame indices.

Every rank computes the same plan from the seed, so each knows the whole
global batch of a step (for the loss normalisation) without communication.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ..errors import UserInputError

#: plan[rank][step] = indices into the training frames.
Plan = list[list[list[int]]]


def fixed_count_plan(n_frames: int, batch_size: int, world_size: int = 1, seed: Optional[int] = None) -> Plan:
    """Global batches of ``world_size·batch_size`` consecutive frames of a seeded permutation, split over ranks.

    Every frame is in exactly one batch of one rank; every rank has the same number
    of steps.  A last global batch with fewer frames than ranks is merged into the
    one before, so no rank ever has an empty batch.  With ``world_size = 1`` the
    batches are those of a single process (``batch_size`` frames, the last one shorter).
    ``seed`` None keeps the file order.
    """
    if n_frames < world_size:
        raise UserInputError(
            f"{n_frames} training structures cannot feed {world_size} ranks (each needs at least one per step); "
            "use fewer processes or more data."
        )
    order = np.arange(n_frames) if seed is None else np.random.default_rng(seed).permutation(n_frames)
    size = batch_size * world_size
    steps = [order[start : start + size] for start in range(0, n_frames, size)]
    if len(steps) > 1 and len(steps[-1]) < world_size:
        steps[-2:] = [np.concatenate(steps[-2:])]
    plan: Plan = [[] for _ in range(world_size)]
    for step in steps:
        for rank, part in enumerate(np.array_split(step, world_size)):
            plan[rank].append([int(i) for i in part])
    return plan
