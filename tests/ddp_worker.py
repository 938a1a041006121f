"""Run by ``torchrun`` from tests/test_distributed.py: train each configuration of a JSON spec data-parallel.

``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_worker.py SPEC.json``; SPEC is a
list of ``{"config": {TrainConfig settings}, "result": PATH, "resume": optional bool, "poison": optional
training-frame index whose energy is set to NaN in memory}``, optionally
ending with ``{"cli": [ARGUMENTS]}``, a ``latent-lr`` command run last (it leaves the process group).  Every rank writes
``PATH.rank<r>.pt`` with its final weights and its history, so a test can check that
the ranks agree and compare them with a single process.
"""

import json
import sys

import torch

from latent_lr.cli import main as cli
from latent_lr.training import TrainConfig, Trainer, distributed


def main(spec_path: str) -> None:
    for job in json.loads(open(spec_path).read()):
        if "cli" in job:
            assert cli(job["cli"]) == 0
            return
        trainer = Trainer(TrainConfig().updated({**job["config"], "distributed": True}))
        if "poison" in job:
            trainer.train_frames[job["poison"]].energy = float("nan")
        if job.get("resume"):
            assert trainer.resume(), "the first part of the run left no checkpoint"
        trainer.fit()
        torch.save(
            {"state": trainer.model.state_dict(), "history": trainer.history,
             "ema": None if trainer.ema is None else trainer.ema.model().state_dict()},
            f"{job['result']}.rank{trainer.ranks.rank}.pt",
        )
    distributed.stop()


if __name__ == "__main__":
    main(sys.argv[1])
