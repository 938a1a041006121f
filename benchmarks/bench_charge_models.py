"""Cost of the charge models of the charged-systems issue, by size: plain latent
charges vs charge equilibration (Qeq, CG) vs latent polarisabilities, and the
fast solvers of issue 15 item 5 (k-space preconditioner, warm starts during MD).

    python benchmarks/bench_charge_models.py --sizes 100 300 1000 3000 10000
    python benchmarks/bench_charge_models.py --iterations --sizes 100 300 1000 3000 10000

The long-range module alone (no host: random invariant features of width 16 stand
in for the host's), energy + forces by autograd, float64, on SPC/E-like water:

* periodic boxes at liquid density (engine ``method="auto"``: Ewald below 300
  atoms, PME above, for the charges and the self-consistent dipoles); open
  clusters (the same boxes without periodicity; direct O(N²) pair sums).
  ``qeq-dipoles`` is the joint charge-dipole equilibration (issue 15 item 1).
* Each variant runs a short stand-in for MD (``--md-steps`` calls, every atom
  displaced by ``--step`` Å of Gaussian noise per call, the module keeping its
  engine state as in a run); the time is the median over the calls after the
  first, in ms, with the ratio to the plain latent-charge model in the same
  geometry.  ``-cold`` variants have warm starts off (every call starts CG
  afresh), ``-warm`` ones start from the previous call's solution.
  ``qeq-jacobi-cold`` is the solver before item 5 (Jacobi preconditioner, cold
  start) except for the adjoint tolerance of the backward pass, which item 5
  also changed; RESULTS §5 has the earlier numbers.
* For the CG variants the last call's iteration counts (forward, adjoint) follow
  the time.

``--iterations`` prints instead the CG iteration counts of one Qeq solve
(random χ, J; rtol 1e-10) against the box size, Jacobi vs k-space preconditioner;
``--dipole-products`` the time of one periodic dipole-field product T p,
Ewald vs PME (the operator built once, as in a CG solve).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from bench_long_range_overhead import water_box

from latent_lr.data import AtomsBatch
from latent_lr.electrostatics.dipole_ewald import dipole_operator
from latent_lr.electrostatics.linear_solve import SolveStatistics
from latent_lr.electrostatics.qeq import equilibrate_charges
from latent_lr.long_range import LongRangeModule

FEATURES = 16

VARIANTS = {
    "plain": dict(),
    "qeq-jacobi-cold": dict(charge_model="qeq", qeq_solver="cg", qeq_preconditioner="jacobi", solver_warm_start=False),
    "qeq-kspace-cold": dict(charge_model="qeq", qeq_solver="cg", solver_warm_start=False),
    "qeq-kspace-warm": dict(charge_model="qeq", qeq_solver="cg"),
    "pol-1step": dict(polarizability="one_step"),
    "pol-scf-cold": dict(polarizability="self_consistent", polarizability_solver="cg", solver_warm_start=False),
    "pol-scf-warm": dict(polarizability="self_consistent", polarizability_solver="cg"),
    "qeq-dipoles-cold": dict(charge_model="qeq_dipoles", solver_warm_start=False),
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


def md_time(module: LongRangeModule, features: torch.Tensor, data: AtomsBatch, steps: int, step: float) -> float:
    """Median seconds per energy + forces call along ``steps`` randomly displaced geometries (first call excluded)."""
    generator = torch.Generator().manual_seed(7)
    positions, times = data.positions, []
    for _ in range(steps):
        positions = positions + step * torch.randn(positions.shape, generator=generator, dtype=positions.dtype)
        start = time.perf_counter()
        energy_and_forces(module, features, data.with_geometry(positions, data.cell))
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]) if len(times) > 1 else times[0]


def costs(args: argparse.Namespace) -> None:
    dtype = torch.float64
    names = [name for name in VARIANTS if name in args.variants]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float64, engine accuracy {args.accuracy:g}; "
          f"energy + forces, median of {args.md_steps - 1} MD-like calls (step {args.step} Å), ms (ratio to plain) "
          "[CG iterations forward, adjoint]")
    print(f"{'geometry':<9}{'N':>7} " + "".join(f"{name:>32}" for name in names))
    for periodic in (True, False):
        for n_atoms in args.sizes:
            if not periodic and n_atoms > args.open_max_atoms:
                continue
            data = batch_of(n_atoms, periodic, dtype)
            generator = torch.Generator().manual_seed(0)
            features = torch.randn(data.positions.shape[0], FEATURES, generator=generator, dtype=dtype)
            cells, plain = [], None
            for name in names:
                torch.manual_seed(0)
                module = LongRangeModule(FEATURES, accuracy=args.accuracy, **VARIANTS[name]).to(dtype)
                seconds = md_time(module, features, data, args.md_steps, args.step)
                plain = plain or seconds
                iterations = next(iter(module.engine_state.solutions.iterations.values()), None)
                counts = "" if iterations is None else f" {iterations[:2]}"
                cells.append(f"{f'{1e3 * seconds:.1f} ({seconds / plain:.1f}x){counts}':>32}")
            label = "periodic" if periodic else "open"
            print(f"{label:<9}{data.positions.shape[0]:>7} " + "".join(cells), flush=True)


def iteration_counts(args: argparse.Namespace) -> None:
    print("Qeq CG iterations of one solve (random χ ~ N(0, 1) eV/e, J ~ U(1, 2) eV/e², σ = 1 Å, rtol 1e-10), "
          "periodic water boxes")
    print(f"{'N':>7}{'L (Å)':>8}{'ln L':>7}{'jacobi':>8}{'kspace':>8}")
    for n_atoms in args.sizes:
        data = batch_of(n_atoms, True, torch.float64)
        generator = torch.Generator().manual_seed(0)
        n = data.positions.shape[0]
        chi = torch.randn(n, generator=generator, dtype=torch.float64)
        hardness = 1.0 + torch.rand(n, generator=generator, dtype=torch.float64)
        row = []
        for preconditioner in ("jacobi", "kspace"):
            record = SolveStatistics()
            equilibrate_charges(
                chi, hardness, data.positions, data.cell, data.pbc, data.batch, data.total_charge,
                torch.tensor(1.0, dtype=torch.float64), accuracy=args.accuracy, solver="cg", statistics=record,
                preconditioner=preconditioner,
            )
            row.append(record.iterations[0])
        length = float(data.cell[0, 0, 0])
        print(f"{n:>7}{length:>8.1f}{math.log(length):>7.2f}{row[0]:>8}{row[1]:>8}", flush=True)


def dipole_products(args: argparse.Namespace) -> None:
    print("Periodic dipole field T p (one product, operator built once), Ewald vs PME, ms; "
          f"relative difference of the fields; accuracy {args.accuracy:g}")
    print(f"{'N':>7}{'ewald':>10}{'pme':>10}{'ratio':>8}{'|ΔTp|/|Tp|':>13}")
    for n_atoms in args.sizes:
        data = batch_of(n_atoms, True, torch.float64)
        n = data.positions.shape[0]
        dipoles = torch.randn(n, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        fields, times = [], []
        for method in ("ewald", "pme"):
            operator = dipole_operator(
                data.positions, data.cell, data.periodic, data.batch, torch.tensor(1.0, dtype=torch.float64),
                args.accuracy, method=method,
            )
            operator.apply(dipoles)
            start = time.perf_counter()
            fields.append(operator.apply(dipoles))
            times.append(time.perf_counter() - start)
        difference = float((fields[1] - fields[0]).norm() / fields[0].norm())
        print(f"{n:>7}{1e3 * times[0]:>10.1f}{1e3 * times[1]:>10.1f}{times[0] / times[1]:>8.1f}{difference:>13.1e}",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[100, 300, 1000, 3000, 10000])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--accuracy", type=float, default=1e-4)
    parser.add_argument("--open-max-atoms", type=int, default=3000, help="largest open cluster (direct sums are O(N²))")
    parser.add_argument("--md-steps", type=int, default=4, help="calls per variant (the first is not timed)")
    parser.add_argument("--step", type=float, default=0.005, help="random displacement per call, Å")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--iterations", action="store_true", help="print CG iteration counts vs box size instead")
    parser.add_argument("--dipole-products", action="store_true", help="time periodic T p, Ewald vs PME, instead")
    args = parser.parse_args()
    if args.md_steps < 1:
        parser.error("--md-steps must be ≥ 1")
    torch.set_num_threads(args.threads)
    if args.iterations:
        iteration_counts(args)
    elif args.dipole_products:
        dipole_products(args)
    else:
        costs(args)


if __name__ == "__main__":
    main()
