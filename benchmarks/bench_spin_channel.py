"""Cost of the spin channel (issue 15, item 2) beside plain latent charges, by size.

    python benchmarks/bench_spin_channel.py --sizes 100 1000 10000

The long-range module alone, as in ``bench_charge_models.py`` (random invariant
features of width 16, SPC/E-like water, energy + forces by autograd, float64,
medians in ms of
interleaved runs): plain latent charges vs ``spin_channel=True`` with a total spin
2S_z = 2, periodic (engine ``auto``: Ewald below 300 atoms, PME above) and open.
The spin channel adds three per-atom MLPs and two redistributions; the engine
call is the same, so the ratio should approach 1 as the engine dominates.
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch
from bench_charge_models import FEATURES, batch_of, energy_and_forces

from latent_lr.long_range import LongRangeModule

#: Relative accuracy asked of the engine; largest open cluster (direct sums are O(N²)).
ACCURACY, OPEN_MAX_ATOMS = 1e-4, 3000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[100, 1000, 10000])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = torch.float64
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float64, engine accuracy {ACCURACY:g}; "
          "energy + forces, ms")
    print(f"{'geometry':<9}{'N':>7}{'plain':>10}{'spin':>10}{'ratio':>8}")
    for periodic in (True, False):
        for n_atoms in args.sizes:
            if not periodic and n_atoms > OPEN_MAX_ATOMS:
                continue
            data = batch_of(n_atoms, periodic, dtype)
            data.total_spin = torch.full_like(data.total_charge, 2.0)
            generator = torch.Generator().manual_seed(0)
            features = torch.randn(data.positions.shape[0], FEATURES, generator=generator, dtype=dtype)
            calls = []
            for spin_channel in (False, True):
                torch.manual_seed(0)
                module = LongRangeModule(FEATURES, accuracy=ACCURACY, spin_channel=spin_channel).to(dtype)
                calls.append(partial(energy_and_forces, module, features, data))
                calls[-1]()  # warm-up (engine set-up, PME mesh)
            samples: list[list[float]] = [[], []]
            for _ in range(args.repeats):  # interleaved, so drifting machine load hits both alike
                for index, call in enumerate(calls):
                    start = time.perf_counter()
                    call()
                    samples[index].append(time.perf_counter() - start)
            times = [statistics.median(values) for values in samples]
            label = "periodic" if periodic else "open"
            print(f"{label:<9}{data.positions.shape[0]:>7}{1e3 * times[0]:>10.1f}{1e3 * times[1]:>10.1f}"
                  f"{times[1] / times[0]:>8.2f}", flush=True)


if __name__ == "__main__":
    main()
