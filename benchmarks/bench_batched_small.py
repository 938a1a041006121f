"""Throughput for many small periodic structures (training's regime): one batched
latent-lr call vs Python loops over per-structure calls.

    python benchmarks/bench_batched_small.py --structures 64 --accuracy 1e-4

Each structure is an SPC/E-like water box of 7–20 molecules (21–60 atoms) with
its own cubic cell.  Energy + forces, float64, 2 threads; medians of
``--repeats`` runs, printed in structures per second:

* ours, batched: one ``latent_lr.coulomb_energy`` call with a ``batch`` vector;
* ours, loop: one call per structure;
* torch-pme, loop: ``PMECalculator`` per structure, parameters tuned once per
  structure (tuning not timed);
* LES-style, loop: the reciprocal-only smeared sum of bench_engine_scaling.py.

Force errors of every variant are measured against latent-lr at accuracy 1e-8
(point charges; LES-style against σ = 1 Å smeared charges).
"""

from __future__ import annotations

import argparse
import numpy as np
import torch
from bench_engine_scaling import les_style, ours, timed, torchpme_setup

import latent_lr
from latent_lr.demo import water_like_box


def relative_error(forces, reference):
    return float(torch.linalg.norm(forces - reference) / torch.linalg.norm(reference))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--structures", type=int, default=64)
    parser.add_argument("--accuracy", type=float, default=1e-4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--pme-cutoff", type=float, default=4.0, help="torch-pme real-space cut-off, Å")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    systems = [water_like_box(int(n), seed=i) for i, n in enumerate(rng.integers(7, 21, args.structures))]
    n_atoms = [len(s[1]) for s in systems]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float64, accuracy {args.accuracy:g}, "
          f"{len(systems)} structures of {min(n_atoms)}–{max(n_atoms)} atoms")

    positions = torch.cat([s[0] for s in systems])
    charges = torch.cat([s[1] for s in systems])
    cells = torch.stack([s[2] for s in systems])
    batch = torch.repeat_interleave(torch.arange(len(systems)), torch.tensor(n_atoms))

    def batched(accuracy=args.accuracy, smearing=0.0):
        pos = positions.clone().requires_grad_(True)
        energy = latent_lr.coulomb_energy(pos, charges, cell=cells, pbc=True, batch=batch,
                                          accuracy=accuracy, smearing=smearing)
        (gradient,) = torch.autograd.grad(energy.sum(), pos)
        return -gradient

    reference = batched(1e-8)
    smeared_reference = batched(1e-8, smearing=1.0)

    def loop_ours():
        return torch.cat([ours(p, q, c, args.accuracy)[1] for p, q, c in systems])

    pme_runs = [torchpme_setup(p, q, c, args.accuracy, args.pme_cutoff)[0] for p, q, c in systems]

    def loop_pme():
        return torch.cat([run()[1] for run in pme_runs])

    def loop_les():
        return torch.cat([les_style(p, q, c)[1] for p, q, c in systems])

    rows = [
        ("ours, batched", batched, reference),
        ("ours, loop", loop_ours, reference),
        ("torch-pme, loop", loop_pme, reference),
        ("LES-style, loop", loop_les, smeared_reference),
    ]
    print(f"{'variant':<18}{'ms':>10}{'structures/s':>14}{'F err':>10}{'batched speed-up':>18}")
    batched_time = None
    for name, function, ref in rows:
        seconds, forces = timed(function, args.repeats)
        batched_time = batched_time or seconds
        error = relative_error(forces, ref)
        print(f"{name:<18}{1e3 * seconds:>10.1f}{len(systems) / seconds:>14.0f}{error:>10.1e}"
              f"{seconds / batched_time:>17.1f}x", flush=True)


if __name__ == "__main__":
    main()
