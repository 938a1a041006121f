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
  ``qeq-dipoles`` is the joint charge-dipole equilibration (issue 15 item 1; in eval mode
  Hellmann–Feynman forces and one mesh density for charges and dipoles per CG product).
* Each variant runs a short stand-in for MD in eval mode (``--md-steps``
  calls, the module keeping its engine state as in a run): ``--trajectory
  noise`` displaces every atom by ``--step`` Å of Gaussian noise per call (no
  predictor can extrapolate it), ``--trajectory verlet`` follows a smooth
  velocity-Verlet trajectory of flexible water (``--timestep`` fs, 300 K).
  The variants take turns at every frame; the time is the median over the
  calls after the first, in ms, with the median of the per-frame time ratios
  to the first variant (plain latent charges) in the same geometry.  ``-cold`` variants have warm starts off (every call starts CG
  afresh), ``-warm`` ones start from the previous call's solution.
  ``qeq-warm`` uses the defaults (issue 15 item 5, MD: deferred derivatives,
  explicit Coulomb operator, near-field block + k-space preconditioner,
  quadratic extrapolation of the warm start, eval tolerance accuracy/10, float32 mesh
  products at that tolerance);
  ``qeq-kspace-warm`` the k-space preconditioner without blocks,
  ``qeq-warm-last`` starts from the last charges instead, ``qeq-warm-tight``
  solves to rtol 1e-10 as in training.
  ``qeq-jacobi-cold`` is the solver before item 5 (Jacobi preconditioner, cold
  start) except for the adjoint tolerance of the backward pass, which item 5
  also changed; RESULTS §5 has the earlier numbers.
* For the CG variants the last call's iteration counts (forward, adjoint) follow
  the time.

``--iterations`` prints instead the CG iteration counts of one Qeq solve
(random χ, J; rtol 1e-10) against the box size, Jacobi vs k-space vs near-field blocks + k-space;
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
    "qeq-kspace-warm": dict(charge_model="qeq", qeq_solver="cg", qeq_preconditioner="kspace"),
    "qeq-warm": dict(charge_model="qeq", qeq_solver="cg"),
    "qeq-warm-last": dict(charge_model="qeq", qeq_solver="cg", solver_extrapolation=0),
    "qeq-warm-tight": dict(charge_model="qeq", qeq_solver="cg", qeq_md_rtol=1e-10),
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


#: Flexible-water bond model of the smooth trajectory: O–H and H–H (angle) springs, eV/Å².
BOND_SPRINGS = (45.0, 10.0)

#: √(eV/amu) in Å/fs and eV/(Å·amu) in Å/fs².
VELOCITY_UNIT, ACCELERATION_UNIT = 0.098227, 9.6485e-3


def noise_trajectory(positions: torch.Tensor, steps: int, step: float) -> list[torch.Tensor]:
    """``steps`` geometries, each displaced from the last by ``step`` Å of Gaussian noise per coordinate."""
    generator = torch.Generator().manual_seed(7)
    frames = []
    for _ in range(steps):
        positions = positions + step * torch.randn(positions.shape, generator=generator, dtype=positions.dtype)
        frames.append(positions)
    return frames


def verlet_trajectory(
    positions: torch.Tensor, steps: int, timestep: float = 1.0, temperature: float = 300.0
) -> list[torch.Tensor]:
    """``steps`` velocity-Verlet frames (``timestep`` fs) of flexible water (O, H, H order): harmonic O–H and
    H–H springs at the starting geometry, thermal velocities at ``temperature`` K, no intermolecular forces.

    A smooth MD-like trajectory (molecules translate, rotate and vibrate) for the charge predictors; the
    electrostatics under test do not drive it.
    """
    generator = torch.Generator().manual_seed(7)
    masses = torch.tensor([15.999, 1.008, 1.008], dtype=positions.dtype).repeat(positions.shape[0] // 3)[:, None]
    pairs = [(0, 1, BOND_SPRINGS[0]), (0, 2, BOND_SPRINGS[0]), (1, 2, BOND_SPRINGS[1])]
    molecules = positions.reshape(-1, 3, 3)
    rest = [(molecules[:, j] - molecules[:, i]).norm(dim=1, keepdim=True) for i, j, _ in pairs]

    def accelerations(x: torch.Tensor) -> torch.Tensor:
        forces = torch.zeros_like(x).reshape(-1, 3, 3)
        m = x.reshape(-1, 3, 3)
        for (i, j, spring), length in zip(pairs, rest):
            bond = m[:, j] - m[:, i]
            distance = bond.norm(dim=1, keepdim=True)
            pull = spring * (distance - length) * bond / distance
            forces[:, i] += pull
            forces[:, j] -= pull
        return ACCELERATION_UNIT * forces.reshape(-1, 3) / masses

    kt = 8.617333e-5 * temperature
    velocities = VELOCITY_UNIT * (kt / masses).sqrt() * torch.randn(
        positions.shape, generator=generator, dtype=positions.dtype
    )
    acceleration, frames = accelerations(positions), []
    for _ in range(steps):
        positions = positions + timestep * velocities + 0.5 * timestep**2 * acceleration
        new_acceleration = accelerations(positions)
        velocities = velocities + 0.5 * timestep * (acceleration + new_acceleration)
        acceleration = new_acceleration
        frames.append(positions)
    return frames


def md_times(
    modules: dict[str, LongRangeModule], features: torch.Tensor, data: AtomsBatch, frames: list[torch.Tensor]
) -> dict[str, tuple[list[float], list[list[int]], list[list[int]]]]:
    """Seconds per energy + forces call of every module (eval mode) along ``frames``, the modules taking turns
    at each frame (so that a change of machine load hits all alike), and each call's CG iteration counts
    (forward, then any adjoint solves; empty without CG) and exact-operator products of its refined solves."""
    results: dict[str, tuple[list[float], list[list[int]], list[list[int]]]] = {name: ([], [], []) for name in modules}
    for module in modules.values():
        module.eval()
    for positions in frames:
        for name, module in modules.items():
            start = time.perf_counter()
            energy_and_forces(module, features, data.with_geometry(positions, data.cell))
            results[name][0].append(time.perf_counter() - start)
            memory = module.engine_state.solutions
            results[name][1].append(list(next(iter(memory.iterations.values()), [])))
            results[name][2].append(list(next(iter(memory.exact_products.values()), [])))
    return results


def costs(args: argparse.Namespace) -> None:
    dtype = torch.float64
    names = [name for name in VARIANTS if name in args.variants]
    trajectory = f"flexible-water Verlet, {args.timestep} fs" if args.trajectory == "verlet" else f"noise {args.step} Å"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float64, engine accuracy {args.accuracy:g}; "
          f"energy + forces, median of {args.md_steps - 1} MD-like calls ({trajectory}), ms (ratio to plain) "
          "(median over the calls of the time ratio to the first variant in the same call round) "
          "[CG iterations: forward (mean; of which products with the exact operator in refined solves), "
          "adjoint of the last call]")
    print(f"{'geometry':<9}{'N':>7} " + "".join(f"{name:>40}" for name in names))
    for periodic in (True, False):
        for n_atoms in args.sizes:
            if not periodic and n_atoms > args.open_max_atoms:
                continue
            data = batch_of(n_atoms, periodic, dtype)
            generator = torch.Generator().manual_seed(0)
            features = torch.randn(data.positions.shape[0], FEATURES, generator=generator, dtype=dtype)
            cells = []
            if args.trajectory == "verlet":
                frames = verlet_trajectory(data.positions, args.md_steps, args.timestep)
            else:
                frames = noise_trajectory(data.positions, args.md_steps, args.step)
            modules = {}
            for name in names:
                torch.manual_seed(0)
                modules[name] = LongRangeModule(FEATURES, accuracy=args.accuracy, **VARIANTS[name]).to(dtype)
            results = md_times(modules, features, data, frames)
            plain_times = results[names[0]][0]
            for name in names:
                times, iterations, exact = results[name]
                timed = slice(1, None) if len(times) > 1 else slice(None)  # the first call is not timed
                seconds = statistics.median(times[timed])
                ratio = statistics.median(t / p for t, p in zip(times[timed], plain_times[timed]))
                counts = iterations[timed]
                refined = [e[0] for e in exact[timed] if e]
                share = f" ({statistics.mean(refined):.0f} exact)" if refined else ""
                solves = "" if not counts[-1] else f" [{statistics.mean(i[0] for i in counts):.0f}{share}, {counts[-1][1:2]}]"
                cells.append(f"{f'{1e3 * seconds:.1f} ({ratio:.1f}x){solves}':>40}")
            label = "periodic" if periodic else "open"
            print(f"{label:<9}{data.positions.shape[0]:>7} " + "".join(cells), flush=True)


def iteration_counts(args: argparse.Namespace) -> None:
    print("Qeq CG iterations of one solve (random χ ~ N(0, 1) eV/e, J ~ U(1, 2) eV/e², σ = 1 Å, rtol 1e-10), "
          "periodic water boxes")
    print(f"{'N':>7}{'L (Å)':>8}{'ln L':>7}{'jacobi':>8}{'kspace':>8}{'blocks':>8}")
    for n_atoms in args.sizes:
        data = batch_of(n_atoms, True, torch.float64)
        generator = torch.Generator().manual_seed(0)
        n = data.positions.shape[0]
        chi = torch.randn(n, generator=generator, dtype=torch.float64)
        hardness = 1.0 + torch.rand(n, generator=generator, dtype=torch.float64)
        row = []
        for preconditioner in ("jacobi", "kspace", "blocks"):
            record = SolveStatistics()
            equilibrate_charges(
                chi, hardness, data.positions, data.cell, data.pbc, data.batch, data.total_charge,
                torch.tensor(1.0, dtype=torch.float64), accuracy=args.accuracy, solver="cg", statistics=record,
                preconditioner=preconditioner,
            )
            row.append(record.iterations[0])
        length = float(data.cell[0, 0, 0])
        print(f"{n:>7}{length:>8.1f}{math.log(length):>7.2f}" + "".join(f"{count:>8}" for count in row), flush=True)


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
    parser.add_argument("--trajectory", choices=("noise", "verlet"), default="noise",
                        help="noise: random --step displacements per call; verlet: smooth flexible-water MD")
    parser.add_argument("--step", type=float, default=0.005, help="random displacement per call (noise), Å")
    parser.add_argument("--timestep", type=float, default=1.0, help="MD timestep (verlet), fs")
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
