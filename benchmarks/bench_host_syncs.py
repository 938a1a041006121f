"""Count host synchronisations in one training step (issue 12, item 1).

On a GPU a device→host synchronisation happens whenever a value computed on the
device is needed on the host: ``Tensor.item``, ``bool(tensor)`` / ``if tensor``,
``tolist``, ``.cpu()``/``.numpy()``, and the ops whose output size depends on data
(``nonzero``, boolean-mask indexing, ``unique``, ``repeat_interleave`` without
``output_size``, ``masked_select``).  This script counts those calls made directly
by latent-lr's code with a ``TorchFunctionMode`` during one training epoch, so it
measures on a CPU-only machine what would synchronise on CUDA.  Calls made inside
torch are not counted (Adam's step counters and ``clip_grad_norm_``'s bookkeeping
stay off the device path on CUDA); ``.to(device)`` is not counted either (on CPU
one cannot tell a host copy from a no-op).

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/bench_host_syncs.py --data FILE.xyz
"""

from __future__ import annotations

import argparse
import collections
import tempfile
import traceback
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from latent_lr.synthetic import write_dataset
from latent_lr.training import TrainConfig, Trainer

SYNCING = {"item", "__bool__", "__float__", "__int__", "__index__", "tolist", "cpu", "numpy", "nonzero", "unique", "masked_select", "argwhere", "nonzero_static"}


class SyncCounter(TorchFunctionMode):
    """Counts calls that need a device value on the host (see module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()
        self.sites: collections.Counter[str] = collections.Counter()

    def _count(self, name: str) -> None:
        caller = traceback.extract_stack()[-3]  # the frame that called the torch function
        if "latent_lr" not in caller.filename:
            return  # inside torch (e.g. Adam's step counters, host tensors even on CUDA): not counted
        self.counts[name] += 1
        self.sites[f"{name} at {Path(caller.filename).name}:{caller.lineno} ({caller.name})"] += 1

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if name in SYNCING:
            self._count(name)
        elif name == "repeat_interleave" and "output_size" not in kwargs:
            self._count(name)
        elif name == "__getitem__" and len(args) > 1 and _has_bool_mask(args[1]):
            self._count("bool-mask indexing")
        return func(*args, **kwargs)


def _has_bool_mask(index: Any) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="extended XYZ (default: the synthetic ion-pair set)")
    parser.add_argument("--forces-key", default="forces")
    parser.add_argument("--where", action="store_true", help="also print the latent_lr call sites")
    parser.add_argument("--long-range", default="on", choices=["on", "off"])
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    data = args.data or str(write_dataset(work, n_train=64, n_test=8, seed=1)["train"])
    config = TrainConfig(
        train=data, forces_key=args.forces_key, backbone="radial", host_options={"cutoff": 4.0, "hidden_dim": 16},
        long_range=args.long_range == "on", epochs=1, batch_size=8, progress=False, out=str(work / "run"),
    )
    trainer = Trainer(config)
    steps = -(-len(trainer.train_frames) // config.batch_size)
    counter = SyncCounter()
    with counter:
        trainer._run_epoch()  # one training epoch: `steps` optimiser steps, plus the epoch's bookkeeping
    per_step = {name: count / steps for name, count in sorted(counter.counts.items())}
    print(f"host syncs per training step (one epoch of {steps} steps, counts / steps), long range {args.long_range}:")
    for name, count in per_step.items():
        print(f"  {name:<22}{count:6.1f}")
    print(f"  {'total':<22}{sum(per_step.values()):6.1f}")
    if args.where:
        for site, count in counter.sites.most_common():
            print(f"  {count / steps:6.1f}  {site}")


if __name__ == "__main__":
    main()
