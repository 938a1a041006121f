"""Peak memory of training from on-disk (prepared HDF5) data vs from extended XYZ, 10^4 and 10^5 structures.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/bench_data_memory.py --structures 100000 --work /tmp/data-memory

1. Writes ``--structures`` synthetic labelled molecules (10-30 atoms,
   ``benchmarks/mixed_sizes.py``) as extended XYZ (all of them, and the first
   tenth as a second file), plus 200 validation structures.
2. ``latent-lr prepare-data ALL.xyz shards --shard-size S/10`` (timed): the
   first shard holds the same first tenth.
3. Trains, each in a fresh process: a radial model (hidden 16) with the
   long-range module, batch size 8, ``--steps`` training steps (the epoch is
   cut there) and one validation pass, from the small and the large xyz and
   from the first shard and the shard folder.  Each run reports its peak
   resident memory (``ru_maxrss``), the RSS after the imports, the time to
   open the data (Trainer construction: reading, reference-energy fit) and
   the time of the steps.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from mixed_sizes import mixed_set, write_extxyz

from latent_lr.training import TrainConfig, Trainer
from latent_lr.training.frame_sets import BatchReader, FrameSet


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_data(work: Path, count: int) -> None:
    small = count // 10
    with open(work / "all.xyz", "w"), open(work / "tenth.xyz", "w"):
        pass
    for start in range(0, count, 5000):
        block = mixed_set(min(5000, count - start), 10, 30, seed=start + 1)
        with open(work / "all.xyz", "a") as handle:
            write_extxyz(block, handle)
        if start < small:
            with open(work / "tenth.xyz", "a") as handle:
                write_extxyz(block[: small - start], handle)
    write_extxyz(mixed_set(200, 10, 30, seed=0), work / "valid.xyz")


class CappedTrainer(Trainer):
    """A trainer whose training epochs stop after ``steps`` batches."""

    steps = 0

    def _batches(self, frames: FrameSet, epoch, rank: int = 0, world_size: int = 1) -> BatchReader:
        reader = super()._batches(frames, epoch, rank, world_size)
        if epoch is not None:
            reader.batches = reader.batches[: self.steps]
        return reader


def child(train: str, valid: str, out: str, steps: int) -> None:
    after_imports = peak_rss_mb()
    started = time.perf_counter()
    config = TrainConfig(train=train, valid=valid, host_options={"hidden_dim": 16}, batch_size=8, epochs=1, progress=False, out=out)
    CappedTrainer.steps = steps
    trainer = CappedTrainer(config)
    opened = time.perf_counter()
    trainer.fit()
    done = time.perf_counter()
    print(json.dumps({"structures": len(trainer.train_frames), "rss_after_imports_MB": after_imports, "peak_rss_MB": peak_rss_mb(),
                      "open_s": opened - started, "steps_s": done - opened}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--structures", type=int, default=100_000)
    parser.add_argument("--work", default="/tmp/data-memory")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--skip-write", action="store_true", help="reuse the xyz files of an earlier run")
    parser.add_argument("--skip-prepare", action="store_true", help="reuse the shards of an earlier run")
    parser.add_argument("--runs", nargs="+", default=["xyz-tenth", "xyz-all", "prepared-shard", "prepared-all"])
    parser.add_argument("--child", nargs=3, metavar=("TRAIN", "VALID", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, args.steps)
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if not args.skip_write:
        started = time.perf_counter()
        write_data(work, args.structures)
        print(f"wrote {args.structures} structures ({(work / 'all.xyz').stat().st_size / 1e6:.0f} MB xyz) in {time.perf_counter() - started:.0f} s", flush=True)
    if not args.skip_prepare:
        started = time.perf_counter()
        command = [sys.executable, "-m", "latent_lr.cli", "prepare-data", str(work / "all.xyz"), str(work / "shards"),
                   "--shard-size", str(args.structures // 10), "--no-progress"]
        subprocess.run(command, check=True)
        size = sum(p.stat().st_size for p in (work / "shards").iterdir()) / 1e6
        print(f"prepare-data: {time.perf_counter() - started:.0f} s, {size:.0f} MB of shards", flush=True)
    runs = {
        "xyz-tenth": work / "tenth.xyz",
        "xyz-all": work / "all.xyz",
        "prepared-shard": work / "shards" / "shard-00000.h5",
        "prepared-all": work / "shards",
    }
    print(f"{'data':<24} {'structures':>10} {'peak RSS MB':>11} {'after imports MB':>16} {'open s':>7} {'steps s':>8}", flush=True)
    for label in args.runs:
        path = runs[label]
        command = [sys.executable, __file__, "--steps", str(args.steps), "--child", str(path), str(work / "valid.xyz"), str(work / "run")]
        result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        print(f"{label:<24} {result['structures']:>10} {result['peak_rss_MB']:>11.0f} {result['rss_after_imports_MB']:>16.0f} "
              f"{result['open_s']:>7.1f} {result['steps_s']:>8.1f}", flush=True)


if __name__ == "__main__":
    main()
