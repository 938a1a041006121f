"""Size-balanced vs fixed-count batches on a mixed-size set (molecules of 10-120 atoms).

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/bench_data_scale.py --structures 2000 --timed-structures 240

Two parts, both printed as tables:

1. **Plan balance** (no training): for 1, 2, 4 and 8 simulated ranks, the
   epoch plans of ``--structures`` structures with fixed ``--batch-size``
   batches and with an atom budget (and with an atom + edge budget) chosen to
   hold the same mean number of atoms per batch.  Per plan: steps per epoch,
   max/mean per-rank work (atoms, edges) and the idle fraction, from
   :func:`latent_lr.training.sampler.plan_balance`.
2. **Measured step times** (radial backbone with the long-range module,
   float64, 1 thread): every batch of every plan of ``--timed-structures``
   structures is timed (energy + forces + loss backward + optimiser step; median
   of ``--repeats``).  For W ranks in lockstep a step lasts as long as its
   slowest rank, so the simulated epoch time is Σ_steps max_ranks t(batch); the
   ideal is Σ_steps mean_ranks t.  This gives time per epoch for one process
   (W = 1, measured) and, for W > 1, the per-rank time balance and idle
   fraction that a real multi-process run would see if each rank ran at this
   speed.  (A real 2-process timing is in the DDP section.)
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from mixed_sizes import mixed_set

import latent_lr
from latent_lr import AtomsBatch
from latent_lr.adapters.radial import RadialPotential
from latent_lr.neighbors import edge_count
from latent_lr.training.sampler import plan_balance, plan_epoch

CUTOFF = 4.0  # Å, the radial backbone's default


def plans(n_atoms: np.ndarray, n_edges: np.ndarray, batch_size: int, world_size: int, seed: int) -> dict[str, list]:
    """Fixed-count, atom-budget and atom+edge-budget plans with the same mean atoms (edges) per batch."""
    max_atoms = int(round(batch_size * n_atoms.mean() * 1.05))
    max_edges = int(round(batch_size * n_edges.mean() * 1.05))
    common = dict(world_size=world_size, seed=seed, epoch=0)
    return {
        f"fixed {batch_size}": plan_epoch(n_atoms, n_edges, batch_size=batch_size, **common),
        f"atoms <= {max_atoms}": plan_epoch(n_atoms, n_edges, batch_size=None, max_atoms=max_atoms, **common),
        f"atoms, edges <= {max_edges}": plan_epoch(n_atoms, n_edges, batch_size=None, max_atoms=max_atoms, max_edges=max_edges, **common),
    }


def balance_table(n_atoms: np.ndarray, n_edges: np.ndarray, batch_size: int, seed: int) -> None:
    print(f"\n## plan balance: {len(n_atoms)} structures, {n_atoms.min()}-{n_atoms.max()} atoms (mean {n_atoms.mean():.1f})")
    print(f"{'ranks':>5} {'batches':<28} {'steps':>6} {'atoms/batch':>11} {'max/mean atoms':>14} {'idle (atoms)':>12} {'max/mean edges':>14} {'idle (edges)':>12}")
    for world_size in (1, 2, 4, 8):
        for label, plan in plans(n_atoms, n_edges, batch_size, world_size, seed).items():
            b = plan_balance(plan, n_atoms, n_edges)
            print(
                f"{world_size:>5} {label:<28} {b.steps:>6} {b.mean_batch_atoms:>11.0f} {b.atoms_max_over_mean:>14.3f} "
                f"{b.atoms_idle_fraction:>12.3f} {b.edges_max_over_mean:>14.3f} {b.edges_idle_fraction:>12.3f}"
            )


def timing_table(structures: list, n_atoms: np.ndarray, n_edges: np.ndarray, batch_size: int, repeats: int, seed: int) -> None:
    torch.manual_seed(0)
    model = latent_lr.wrap(RadialPotential([1, 6, 7, 8], cutoff=CUTOFF).double(), backbone="radial")
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-4)
    cache: dict[tuple[int, ...], float] = {}

    def step_time(batch: list[int]) -> float:
        key = tuple(sorted(batch))
        if key not in cache:
            data = AtomsBatch.from_atoms([structures[i] for i in batch])
            energy = torch.tensor([structures[i].info["energy"] for i in batch], dtype=torch.float64)
            forces = torch.tensor(np.concatenate([structures[i].arrays["forces"] for i in batch]))
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                out = model(data, compute_forces=True, compute_stress=False)
                loss = (((out["energy"] - energy) / data.n_atoms) ** 2).mean() + 10 * ((out["forces"] - forces) ** 2).mean()
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                times.append(time.perf_counter() - start)
            cache[key] = statistics.median(times)
        return cache[key]

    print(f"\n## measured step times: {len(structures)} structures, radial + long range, 1 thread, median of {repeats}")
    print(f"{'ranks':>5} {'batches':<28} {'steps':>6} {'epoch s (lockstep)':>18} {'ideal s':>8} {'max/mean time':>13} {'idle (time)':>11} {'structures/s':>12}")
    for world_size in (1, 2, 4, 8):
        for label, plan in plans(n_atoms, n_edges, batch_size, world_size, seed).items():
            times = np.array([[step_time(batch) for batch in rank] for rank in plan])  # (ranks, steps)
            lockstep, ideal = times.max(axis=0).sum(), times.mean(axis=0).sum()
            print(
                f"{world_size:>5} {label:<28} {times.shape[1]:>6} {lockstep:>18.2f} {ideal:>8.2f} {lockstep / ideal:>13.3f} "
                f"{1 - ideal / lockstep:>11.3f} {len(structures) / lockstep:>12.1f}",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--structures", type=int, default=2000, help="structures in the plan-balance part")
    parser.add_argument("--timed-structures", type=int, default=240, help="structures in the measured part (0: skip)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--timed-batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    structures = mixed_set(args.structures, 10, 120, seed=1)
    n_atoms = np.array([len(a) for a in structures])
    n_edges = np.array([edge_count(a, CUTOFF) for a in structures])
    balance_table(n_atoms, n_edges, args.batch_size, args.seed)
    if args.timed_structures:
        part = slice(0, args.timed_structures)
        timing_table(structures[part], n_atoms[part], n_edges[part], args.timed_batch_size, args.repeats, args.seed)


if __name__ == "__main__":
    main()
