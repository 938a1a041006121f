"""Epoch time of one process vs data-parallel gloo processes, fixed-count vs size-balanced batches (issue 12, items 2, 3, 6).

A mixed-size set of molecules (10–120 atoms, the C/H/N/O clusters of
``benchmarks/mixed_sizes.py``, Lennard-Jones labels: they do not matter for timing)
is trained for a few epochs with the same global batch per optimiser step:

* fixed count: ``--batch-size B`` in one process, ``B / W`` per rank with W ranks;
* balanced: ``--max-atoms-per-batch A`` in one process, ``A / W`` per rank.

W > 1 runs under ``torchrun --standalone --nproc_per_node W`` (gloo, one thread
per process).  Printed per case: the median training time per epoch (epochs 2..E),
structures/s and atoms/s, each rank's busy fraction of the step time and the idle
fraction (from the trainer's log), and the plan's per-step max/mean atoms over ranks
(:func:`latent_lr.training.sampler.plan_balance`), then the ratios 1-process / W-process.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/bench_ddp_epoch.py --structures 240 --epochs 4 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from launch import launch, run_as_worker
from mixed_sizes import mixed_set, write_extxyz

from latent_lr.training import TrainConfig, Trainer, distributed
from latent_lr.training.sampler import plan_balance

HERE = Path(__file__).resolve()
HOST = {"cutoff": 4.0, "hidden_dim": 16}


def settings(data: Path, out: Path, epochs: int, per_rank: dict) -> dict:
    return {"train": str(data), "backbone": "radial", "host_options": HOST, "long_range_options": {"hidden_dim": 16},
            "epochs": epochs, "patience": 10_000, "progress": False, "out": str(out), **per_rank}


def worker(spec: Path) -> None:
    """One case, in this process (``distributed`` set when started by torchrun)."""
    job = json.loads(spec.read_text())
    trainer = Trainer(TrainConfig().updated(job["config"]))
    trainer.fit()
    if trainer.ranks.is_main:
        n_atoms = trainer.train_frames.n_atoms
        balance = plan_balance(trainer.epoch_plan(0), n_atoms).as_dict()
        Path(job["result"]).write_text(json.dumps({"history": trainer.history, "balance": balance}))
    distributed.stop()


def run_case(data: Path, work: Path, name: str, world: int, epochs: int, per_rank: dict) -> dict:
    config = settings(data, work / name, epochs, per_rank)
    if world > 1:
        config["distributed"] = True
    spec = work / f"{name}.json"
    result = work / f"{name}.result.json"
    spec.write_text(json.dumps({"config": config, "result": str(result)}))
    launch(HERE, spec, world)
    return json.loads(result.read_text())


def summary(name: str, world: int, outcome: dict) -> dict:
    rows = outcome["history"][1:] or outcome["history"]  # the first epoch includes warm-up
    busy = [statistics.median(row[f"rank{r}_busy_fraction"] for row in rows) for r in range(world)] if world > 1 else [1.0]
    busy_text = " ".join(f"{b:.2f}" for b in busy)
    line = {
        "case": name, "procs": world,
        "epoch_s": statistics.median(row["train_seconds"] for row in rows),
        "structures_per_s": statistics.median(row["structures_per_s"] for row in rows),
        "atoms_per_s": statistics.median(row["atoms_per_s"] for row in rows),
        "busy": busy_text,
        "idle": statistics.median(row.get("idle_fraction", 0.0) for row in rows),
        "plan_atoms_max_over_mean": outcome["balance"]["atoms_max_over_mean"],
        "steps": outcome["balance"]["steps"],
    }
    print(f"{name:<10}{world:>6}{line['epoch_s']:>10.2f}{line['structures_per_s']:>10.1f}{line['atoms_per_s']:>10.0f}"
          f"{line['plan_atoms_max_over_mean']:>10.3f}{line['steps']:>7}{line['idle']:>8.2f}   {busy_text}", flush=True)
    return line


def main() -> None:
    if run_as_worker(worker):
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--structures", type=int, default=240)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8, help="global structures per step (fixed count)")
    parser.add_argument("--max-atoms", type=int, default=520, help="global atoms per step (balanced)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds of the four cases")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    data = work / "mixed.xyz"
    write_extxyz(mixed_set(args.structures, 10, 120, seed=args.seed), data)
    world = args.procs
    cases = {
        "fixed": [(1, {"batch_size": args.batch_size}), (world, {"batch_size": args.batch_size // world})],
        "balanced": [(1, {"max_atoms_per_batch": args.max_atoms}), (world, {"max_atoms_per_batch": args.max_atoms // world})],
    }
    print(f"{args.structures} molecules of 10-120 atoms, {args.epochs} epochs, radial + long range, gloo, 1 thread per process, "
          f"{args.repeats} interleaved rounds")
    print(f"{'case':<10}{'procs':>6}{'epoch_s':>10}{'struct/s':>10}{'atoms/s':>10}{'max/mean':>10}{'steps':>7}{'idle':>8}   busy fraction per rank")
    rounds: list[dict] = []
    for repeat in range(args.repeats):
        lines = {}
        order = [(name, procs, per_rank) for name, runs in cases.items() for procs, per_rank in runs]
        for name, procs, per_rank in order if repeat % 2 == 0 else order[::-1]:  # alternate the order against drifting load
            lines[(name, procs)] = summary(name, procs, run_case(data, work, f"{name}{procs}", procs, args.epochs, per_rank))
        rounds.append(lines)
    print("medians over rounds (epoch time, s):")
    for name, runs in cases.items():
        for procs, _ in runs:
            print(f"  {name:<10}{procs:>3} procs {statistics.median(r[(name, procs)]['epoch_s'] for r in rounds):8.2f}")
    for name in cases:
        ratios = [r[(name, 1)]["epoch_s"] / r[(name, world)]["epoch_s"] for r in rounds]
        print(f"{name}: epoch time 1 process / {world} processes = {statistics.median(ratios):.2f} (rounds: {' '.join(f'{x:.2f}' for x in ratios)})")
    ratios = [r[("fixed", world)]["epoch_s"] / r[("balanced", world)]["epoch_s"] for r in rounds]
    print(f"{world} processes: epoch time fixed / balanced = {statistics.median(ratios):.2f} (rounds: {' '.join(f'{x:.2f}' for x in ratios)})")

if __name__ == "__main__":
    main()
