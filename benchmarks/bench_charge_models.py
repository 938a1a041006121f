"""Cost of the charge models of the charged-systems issue, by size: plain latent
charges vs charge equilibration (Qeq, CG) vs latent polarisabilities.

    python benchmarks/bench_charge_models.py --sizes 100 300 1000 3000 10000

The long-range module alone (no host: random invariant features of width 16 stand
in for the host's), energy + forces by autograd, float64, medians of
``--repeats`` runs, in ms, on SPC/E-like water:

* periodic boxes at liquid density (engine ``method="auto"``: Ewald below 300
  atoms, PME above): plain, Qeq (CG), one-step polarisation;
* open clusters (the same boxes without periodicity; direct O(N²) pair sums):
  plain, Qeq (CG), one-step and self-consistent polarisation (CG; open
  structures only), joint charge-dipole equilibration (``qeq_dipoles``, CG, open
  and periodic).

Ratios are to the plain latent-charge model in the same geometry.  CG
iteration counts are not printed; the cost ratio is what a user pays.
"""

from __future__ import annotations

import argparse

import torch
from bench_engine_scaling import timed
from bench_long_range_overhead import water_box

from latent_lr.data import AtomsBatch
from latent_lr.long_range import LongRangeModule

FEATURES = 16

VARIANTS = {
    "plain": dict(),
    "qeq-cg": dict(charge_model="qeq", qeq_solver="cg"),
    "pol-1step": dict(polarizability="one_step"),
    "pol-scf": dict(polarizability="self_consistent", polarizability_solver="cg"),
    "qeq-dipoles": dict(charge_model="qeq_dipoles"),
}


def batch_of(n_atoms: int, periodic: bool, dtype: torch.dtype) -> AtomsBatch:
    atoms = water_box(n_atoms // 3, seed=1)
    atoms.pbc = periodic
    return AtomsBatch.from_atoms([atoms]).to(dtype=dtype)


def energy_and_forces(module: LongRangeModule, features: torch.Tensor, data: AtomsBatch) -> torch.Tensor:
    positions = data.positions.detach().clone().requires_grad_(True)
    out = module(features, data.with_geometry(positions, data.cell))
    (gradient,) = torch.autograd.grad(out["energy"].sum(), positions)
    return -gradient


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[100, 300, 1000, 3000, 10000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--accuracy", type=float, default=1e-4)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                        help="models to time ('plain' is always timed first: the ratios refer to it)")
    parser.add_argument("--open-max-atoms", type=int, default=3000, help="largest open cluster (direct sums are O(N²))")
    args = parser.parse_args()
    variants = {name: VARIANTS[name] for name in VARIANTS if name == "plain" or name in args.variants}
    torch.set_num_threads(args.threads)
    dtype = torch.float64
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float64, engine accuracy {args.accuracy:g}; "
          "energy + forces, ms (ratio to plain)")
    print(f"{'geometry':<9}{'N':>7} " + "".join(f"{name:>20}" for name in variants))
    for periodic in (True, False):
        for n_atoms in args.sizes:
            if not periodic and n_atoms > args.open_max_atoms:
                continue
            data = batch_of(n_atoms, periodic, dtype)
            generator = torch.Generator().manual_seed(0)
            features = torch.randn(data.positions.shape[0], FEATURES, generator=generator, dtype=dtype)
            cells, plain = [], None
            for name, options in variants.items():
                if periodic and name == "pol-scf":
                    cells.append(f"{'n/a':>20}")
                    continue
                torch.manual_seed(0)
                module = LongRangeModule(FEATURES, accuracy=args.accuracy, **options).to(dtype)
                repeats = args.repeats if n_atoms <= 3000 else 1
                seconds, _ = timed(lambda: energy_and_forces(module, features, data), repeats)
                plain = plain or seconds
                cells.append(f"{1e3 * seconds:>12.1f} ({seconds / plain:>4.1f}x)")
            label = "periodic" if periodic else "open"
            print(f"{label:<9}{data.positions.shape[0]:>7} " + "".join(cells), flush=True)


if __name__ == "__main__":
    main()
