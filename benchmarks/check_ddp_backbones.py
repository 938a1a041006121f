"""Every backbone through DDP: 2 gloo ranks vs one process with the combined batch (issue 12, item 2).

For each backbone (its default host, CHGNet's made small), with the long-range
module, a force loss and double backward: train one epoch with 2 ranks × batch b
(``torchrun``) and in one process with batch 2b, and print the largest parameter
difference (expected ≲ 1e-10 in float64) and the wall time of each.  Too slow for
the test-suite (the hosts are imported and built in 3 processes); run by hand.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/check_ddp_backbones.py [--backbones mace nequip chgnet cace radial]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from launch import launch, run_as_worker

from latent_lr.synthetic import write_dataset
from latent_lr.training import TrainConfig, Trainer, distributed

HERE = Path(__file__).resolve()
HOSTS: dict[str, dict] = {
    "radial": {"cutoff": 4.0, "hidden_dim": 8},
    "mace": {},
    "nequip": {},
    "chgnet": {"atom_fea_dim": 16, "bond_fea_dim": 16, "angle_fea_dim": 16, "n_conv": 2, "mlp_hidden_dims": [16], "num_radial": 7, "num_angular": 7},
    "cace": {},
}


def worker(spec: Path) -> None:
    """Train the spec's configuration (distributed when started by torchrun); rank 0 saves the weights."""
    job = json.loads(spec.read_text())
    trainer = Trainer(TrainConfig().updated(job["config"]))
    trainer.fit()
    if trainer.ranks.is_main:
        torch.save(trainer.model.state_dict(), job["result"])
    distributed.stop()


def run(config: dict, work: Path, name: str, world: int) -> tuple[dict, float]:
    spec, result = work / f"{name}.json", work / f"{name}.pt"
    spec.write_text(json.dumps({"config": {**config, "out": str(work / name)}, "result": str(result)}))
    started = time.perf_counter()
    launch(HERE, spec, world, quiet_errors=True)
    return torch.load(result, weights_only=True), time.perf_counter() - started


def main() -> None:
    if run_as_worker(worker):
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=list(HOSTS))
    parser.add_argument("--structures", type=int, default=14, help="structures written (1 in 7 is held out for validation)")
    parser.add_argument("--batch-size", type=int, default=2, help="per rank")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    data = write_dataset(work / "data", n_train=args.structures, n_test=2, seed=2)["train"]
    print(f"{'backbone':<10}{'max |Δθ|':>12}{'params':>9}{'2 ranks s':>11}{'1 proc s':>10}")
    for backbone in args.backbones:
        config = {"train": str(data), "backbone": backbone, "host_options": HOSTS[backbone], "epochs": 1, "progress": False,
                  "valid_fraction": 1 / 7, "long_range_options": {"hidden_dim": 8}}
        ranks, ranks_seconds = run({**config, "batch_size": args.batch_size, "distributed": True}, work, f"{backbone}_ddp", 2)
        single, single_seconds = run({**config, "batch_size": 2 * args.batch_size}, work, f"{backbone}_single", 1)
        difference = max(float((single[k].double() - ranks[k].double()).abs().max()) for k in single if single[k].is_floating_point() and single[k].numel())
        count = sum(v.numel() for v in single.values())
        print(f"{backbone:<10}{difference:>12.2e}{count:>9}{ranks_seconds:>11.1f}{single_seconds:>10.1f}", flush=True)


if __name__ == "__main__":
    main()
