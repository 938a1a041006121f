"""Epoch plans (latent_lr.training.sampler): fixed-count and size-balanced batches over ranks."""

from __future__ import annotations

import numpy as np
import pytest

from latent_lr.data import AtomsBatch
from latent_lr.errors import UserInputError
from latent_lr.neighbors import radius_graph
from latent_lr.synthetic import write_dataset
from latent_lr.training import TrainConfig, Trainer
from latent_lr.training.sampler import plan_balance, plan_epoch

RNG = np.random.default_rng(7)
#: A mixed-size set: molecules of 10-120 atoms, ~8-20 directed edges per atom.
MIXED_ATOMS = RNG.integers(10, 121, size=1500)
MIXED_EDGES = MIXED_ATOMS * RNG.integers(8, 21, size=1500)

MODES = {
    "fixed": dict(batch_size=16),
    "atoms": dict(batch_size=None, max_atoms=1000),
    "atoms+edges": dict(batch_size=None, max_atoms=1000, max_edges=12_000),
    "atoms+cap": dict(batch_size=6, max_atoms=1000),
}


def _flat(plan: list[list[list[int]]]) -> list[int]:
    return [i for rank in plan for batch in rank for i in batch]


@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("count", [1500, 1001, 37])
def test_every_structure_once_same_steps_no_empty_batch_within_budget(mode: str, world_size: int, count: int) -> None:
    options = MODES[mode]
    n_atoms, n_edges = MIXED_ATOMS[:count], MIXED_EDGES[:count]
    plan = plan_epoch(n_atoms, n_edges, world_size=world_size, seed=3, epoch=5, **options)
    assert len(plan) == world_size
    assert sorted(_flat(plan)) == list(range(count))
    assert len({len(rank) for rank in plan}) == 1, "every rank must run the same number of steps"
    batches = [batch for rank in plan for batch in rank]
    assert all(batches)
    if "max_atoms" in options:
        assert max(n_atoms[b].sum() for b in batches) <= options["max_atoms"]
    if "max_edges" in options:
        assert max(n_edges[b].sum() for b in batches) <= options["max_edges"]
    if options["batch_size"] is not None and "max_atoms" in options:
        assert max(len(b) for b in batches) <= options["batch_size"]


def test_one_rank_fixed_count_is_the_historical_order() -> None:
    """The trainer used default_rng(seed * 100_003 + epoch).permutation, cut into batch_size chunks."""
    for seed, epoch, count, size in [(0, 0, 80, 8), (4, 11, 77, 5), (2, 3, 3, 8)]:
        order = np.random.default_rng(seed * 100_003 + epoch).permutation(count)
        expected = [list(order[s : s + size]) for s in range(0, count, size)]
        (plan,) = plan_epoch(np.ones(count, int), None, batch_size=size, world_size=1, seed=seed, epoch=epoch)
        assert plan == expected
        (in_order,) = plan_epoch(np.ones(count, int), None, batch_size=size, world_size=1, seed=seed, epoch=epoch, shuffle=False)
        assert in_order == [list(range(s, min(s + size, count))) for s in range(0, count, size)]


def test_trainer_batches_follow_the_historical_order(tmp_path) -> None:
    data = write_dataset(tmp_path / "data", n_train=30, n_test=5, seed=2)
    config = TrainConfig(train=str(data["train"]), host_options={"hidden_dim": 8}, batch_size=4, seed=5, progress=False, out=str(tmp_path / "run"))
    trainer = Trainer(config)
    frames = trainer.train_frames
    order = np.random.default_rng(5 * 100_003 + 2).permutation(len(frames))
    expected = [[frames[int(i)].source for i in order[s : s + 4]] for s in range(0, len(frames), 4)]
    assert [[f.source for f in batch] for batch in trainer._batches(frames, 2)] == expected


def test_same_seed_and_epoch_same_plan_other_epoch_other_plan() -> None:
    options = dict(batch_size=None, max_atoms=800, max_edges=9000, world_size=4, seed=1)
    first = plan_epoch(MIXED_ATOMS, MIXED_EDGES, epoch=2, **options)
    assert plan_epoch(MIXED_ATOMS, MIXED_EDGES, epoch=2, **options) == first
    assert plan_epoch(MIXED_ATOMS, MIXED_EDGES, epoch=3, **options) != first


def test_balanced_ranks_within_the_stated_bound() -> None:
    """Atoms-only budget: in every step but the last, ranks differ by at most the largest structure (120 atoms);
    over the epoch, max/mean per-rank atoms <= 1.02 (fixed-count batches of the same set: > 1.05)."""
    for world_size in (2, 4, 8):
        plan = plan_epoch(MIXED_ATOMS, None, batch_size=None, max_atoms=1000, world_size=world_size, seed=0, epoch=0)
        work = np.array([[MIXED_ATOMS[b].sum() for b in rank] for rank in plan])  # (ranks, steps)
        spread = work.max(axis=0) - work.min(axis=0)
        assert spread[:-1].max() <= MIXED_ATOMS.max()
        balance = plan_balance(plan, MIXED_ATOMS)
        assert balance.atoms_max_over_mean <= 1.02
        fixed = plan_balance(plan_epoch(MIXED_ATOMS, None, batch_size=16, world_size=world_size, seed=0, epoch=0), MIXED_ATOMS)
        assert fixed.atoms_max_over_mean > 1.05


def test_balanced_on_atoms_and_edges_together() -> None:
    """Both budgets: the binding one (edges here) is balanced to 2 %, the other to 10 %."""
    for world_size in (2, 4, 8):
        plan = plan_epoch(MIXED_ATOMS, MIXED_EDGES, batch_size=None, max_atoms=1000, max_edges=12_000, world_size=world_size, seed=0, epoch=0)
        balance = plan_balance(plan, MIXED_ATOMS, MIXED_EDGES)
        assert balance.edges_max_over_mean is not None and balance.edges_max_over_mean <= 1.02
        assert balance.atoms_max_over_mean <= 1.10


def test_plan_balance_by_hand() -> None:
    sizes = [10, 20, 30, 40]
    plan = [[[0], [1]], [[2, 3], [1 * 0 + 0]]]  # step 0: 10 vs 70; step 1: 20 vs 10 (index 0 reused on purpose)
    balance = plan_balance(plan, sizes)
    assert balance.steps == 2 and balance.world_size == 2
    assert balance.atoms_max_over_mean == pytest.approx((70 + 20) / (40 + 15))
    assert balance.atoms_idle_fraction == pytest.approx(1 - (40 + 15) / (70 + 20))
    assert balance.max_batch_atoms == 70 and balance.edges_max_over_mean is None


def test_last_step_gets_a_structure_for_every_rank() -> None:
    # 13 structures of 30 atoms, budget 100: 3 per batch; 4 ranks -> one full step of 12 and 1 left over.
    plan = plan_epoch([30] * 13, None, batch_size=None, max_atoms=100, world_size=4, seed=0, epoch=0)
    assert all(rank[-1] for rank in plan) and sorted(_flat(plan)) == list(range(13))
    fixed = plan_epoch([5] * 9, None, batch_size=2, world_size=4, seed=0, epoch=0)  # 8 + 1: one batch of 3
    assert sorted(_flat(fixed)) == list(range(9)) and all(len(rank) == 1 for rank in fixed)


def test_impossible_requests_are_clear_errors() -> None:
    with pytest.raises(UserInputError, match=r"structure 2 .*exceeds the per-batch budget.*--max-atoms-per-batch"):
        plan_epoch([10, 20, 500, 30], None, batch_size=None, max_atoms=100, world_size=1, seed=0, epoch=0)
    with pytest.raises(UserInputError, match="cannot give each of 4 ranks"):
        plan_epoch([10, 20, 30], None, batch_size=2, world_size=4, seed=0, epoch=0)
    with pytest.raises(UserInputError, match="needs the number of edges"):
        plan_epoch([10, 20], None, batch_size=None, max_edges=100, world_size=1, seed=0, epoch=0)
    with pytest.raises(UserInputError, match="single structure"):
        plan_epoch([60] * 5, None, batch_size=None, max_atoms=100, world_size=4, seed=0, epoch=0)


def test_trainer_edge_budget_counts_edges_as_the_backbone_does(tmp_path) -> None:
    """Batches under --max-edges-per-batch hold at most that many edges of the model's own radius graph."""
    data = write_dataset(tmp_path / "data", n_train=30, n_test=5, seed=3)
    config = TrainConfig(train=str(data["train"]), host_options={"hidden_dim": 8, "cutoff": 4.0}, max_edges_per_batch=60, progress=False, out=str(tmp_path / "run"))
    trainer = Trainer(config)
    batches = list(trainer._batches(trainer.train_frames, 0))
    edges = [radius_graph(AtomsBatch.from_atoms([f.atoms for f in batch]), 4.0)[0].shape[1] for batch in batches]
    assert max(edges) <= 60 and max(len(b) for b in batches) > 1
    assert sorted(f.source for batch in batches for f in batch) == sorted(f.source for f in trainer.train_frames)
