"""Cost of the long-range term and of BECs relative to the host's forward+backward.

    python benchmarks/bench_long_range_overhead.py --backbones radial mace nequip chgnet

For each backbone and size (water-like periodic boxes, 2 threads, float64
unless --dtype float32) it times, in one process:

* host: the short-range twin's energy + forces (+ stress);
* wrapped: the long-range model's energy + forces (+ stress);
* wrapped + BEC: the same plus Born effective charges;

and prints medians and the ratios (wrapped - host) / host and
(wrapped + BEC - host) / host.  Backbones whose package is missing are skipped.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from ase import Atoms

import latent_lr
from latent_lr import AtomsBatch
from latent_lr.backbone import adapter_class


def water_box(n_molecules: int, seed: int = 0) -> Atoms:
    from latent_lr.demo import water_like_box

    positions, _, cell = water_like_box(n_molecules, seed)
    atoms = Atoms(["O", "H", "H"] * n_molecules, positions=positions.numpy(), cell=cell.numpy(), pbc=True)
    return atoms


def build_host(name: str, dtype: torch.dtype):
    adapter = adapter_class(name)
    if name == "chgnet":
        return adapter.pretrained_host("pretrained")  # type: ignore[attr-defined]
    return adapter.default_host([1, 8])


def median_time(function, repeats: int) -> float:
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=["radial", "mace", "nequip", "chgnet"])
    parser.add_argument("--molecules", nargs="+", type=int, default=[17, 100, 333, 1000])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-bec", action="store_true", help="skip the BEC timing (prints nan)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}")
    print(f"{'backbone':<9}{'atoms':>7}{'host ms':>10}{'wrapped ms':>12}{'+BEC ms':>10}{'LR/host':>9}{'(LR+BEC)/host':>15}")
    for name in args.backbones:
        try:
            host = build_host(name, dtype)
        except ImportError as error:
            print(f"{name:<9} skipped: {error}")
            continue
        long_model = latent_lr.wrap(host, backbone=name).to(dtype).eval()
        short_model = latent_lr.wrap(host, backbone=name, long_range=False).to(dtype).eval()
        for n_molecules in args.molecules:
            data = AtomsBatch.from_atoms(water_box(n_molecules), dtype=dtype)
            repeats = args.repeats if n_molecules <= 333 else max(2, args.repeats // 2)
            host_time = median_time(lambda: short_model(data), repeats)
            wrapped_time = median_time(lambda: long_model(data), repeats)
            bec_time = (
                float("nan") if args.no_bec else median_time(lambda: long_model(data, compute_bec=True), repeats)
            )
            print(
                f"{name:<9}{3 * n_molecules:>7}{1e3 * host_time:>10.1f}{1e3 * wrapped_time:>12.1f}"
                f"{1e3 * bec_time:>10.1f}{(wrapped_time - host_time) / host_time:>9.2f}"
                f"{(bec_time - host_time) / host_time:>15.2f}"
            )


if __name__ == "__main__":
    main()
