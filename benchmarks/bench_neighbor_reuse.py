"""Would reusing neighbour graphs between epochs speed training up?  Upper bound, measured per backbone.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/bench_neighbor_reuse.py --backbones radial mace nequip chgnet

A structure's graph (edge indices and integer cell shifts within the cut-off)
does not change between epochs, so it could be computed once and stored.  The
most that can save is the graph's share of a training step.  For batches of
mixed-size molecules (10-120 atoms) and of periodic boxes (64-128 atoms), both
cut to ~``--max-atoms`` atoms per batch, this times, interleaved in one process
(the two steps in alternating order, so that neither gains from running second):

* graph: building the batch's graph as the adapter does (``radius_graph``;
  for CHGNet its whole topology, bond graph included);
* step: a training step (energy + forces with graph, loss, backward) of the
  wrapped long-range model, graph built inside, as in training;
* step, graph given: the same step with the graph looked up (the adapter's
  graph function replaced by a dictionary look-up of the precomputed result):
  what perfect reuse would cost.

It prints medians over batches and repeats and the saving 1 - cached/step.
Backbones whose package is missing are skipped.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import time
from typing import Callable

import torch
from mixed_sizes import mixed_set

import latent_lr
from latent_lr import AtomsBatch
from latent_lr.backbone import adapter_class
from latent_lr.neighbors import radius_graph
from latent_lr.training.sampler import plan_epoch

#: backbone -> (module whose graph function the adapter calls, that function's name there)
GRAPH_FUNCTIONS = {
    "radial": ("latent_lr.adapters.radial", "radius_graph"),
    "mace": ("latent_lr.adapters.mace", "radius_graph"),
    "nequip": ("latent_lr.adapters.nequip", "radius_graph"),
    "chgnet": ("latent_lr.adapters.chgnet", "graph_topology"),
}


def batches(periodic: bool, max_atoms: int, count: int) -> list[AtomsBatch]:
    structures = mixed_set(count, 64, 128, seed=1, periodic=True) if periodic else mixed_set(count, 10, 120, seed=1)
    (plan,) = plan_epoch([len(a) for a in structures], None, batch_size=None, max_atoms=max_atoms, world_size=1, seed=0, epoch=0)
    return [AtomsBatch.from_atoms([structures[i] for i in batch]) for batch in plan]


def timed(function: Callable[[AtomsBatch], object], batch: AtomsBatch) -> float:
    start = time.perf_counter()
    function(batch)
    return time.perf_counter() - start


def measure(name: str, data: list[AtomsBatch], repeats: int) -> dict[str, float]:
    adapter = adapter_class(name)
    host = adapter.pretrained_host("pretrained") if name == "chgnet" else adapter.default_host([1, 6, 7, 8])  # type: ignore[attr-defined]
    model = latent_lr.wrap(host, backbone=name).double()
    module_name, function_name = GRAPH_FUNCTIONS[name]
    module = importlib.import_module(module_name)
    build = getattr(module, function_name)
    cutoff = model.backbone.cutoff

    def graph_of(batch: AtomsBatch):
        if name == "chgnet":
            return build(batch, model.backbone._graph_builder(), *model.backbone._graph_cutoffs())
        return radius_graph(batch, cutoff)

    def step(batch: AtomsBatch) -> None:
        out = model(batch, compute_forces=True, compute_stress=False)
        loss = (out["energy"] ** 2).mean() + (out["forces"] ** 2).mean()
        loss.backward()
        model.zero_grad(set_to_none=True)

    cache: dict[int, object] = {}  # keyed by the batch's numbers tensor (the model re-wraps positions and cell)
    lookup = lambda batch, *args: cache[id(batch.numbers)]  # noqa: E731 (the adapter's graph function, replaced)
    times: dict[str, list[float]] = {"graph": [], "step": [], "step, graph given": []}
    for batch in data:  # warm-up, and the cache
        cache[id(batch.numbers)] = graph_of(batch)
        step(batch)
    def given(batch: AtomsBatch) -> None:
        setattr(module, function_name, lookup)
        try:
            step(batch)
        finally:
            setattr(module, function_name, build)

    for repeat in range(repeats):
        for batch in data:
            times["graph"].append(timed(graph_of, batch))
            pair = [("step", step), ("step, graph given", given)]
            for key, function in pair if repeat % 2 == 0 else pair[::-1]:  # ABBA: no order bias
                times[key].append(timed(function, batch))
    return {key: 1e3 * statistics.median(values) for key, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=["radial", "mace", "nequip", "chgnet"])
    parser.add_argument("--max-atoms", type=int, default=500)
    parser.add_argument("--structures", type=int, default=40, help="structures per set (batches follow from --max-atoms)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sets = {"molecules 10-120": batches(False, args.max_atoms, args.structures), "boxes 64-128": batches(True, args.max_atoms, args.structures)}
    print(f"{'backbone':<8} {'set':<17} {'batches':>7} {'graph ms':>9} {'step ms':>9} {'given ms':>9} {'graph/step':>10} {'saving':>7}")
    for name in args.backbones:
        try:
            for label, data in sets.items():
                result = measure(name, data, args.repeats)
                graph, step, given = result["graph"], result["step"], result["step, graph given"]
                print(f"{name:<8} {label:<17} {len(data):>7} {graph:>9.2f} {step:>9.1f} {given:>9.1f} {graph / step:>10.3f} {1 - given / step:>7.3f}", flush=True)
        except ImportError as error:
            print(f"{name:<8} skipped ({error})")


if __name__ == "__main__":
    main()
