"""Time per MD step of one wrapped model under three drivers: ASE, LAMMPS (one rank), TorchSim.

    python benchmarks/bench_md_drivers.py --waters 1000 4000 --steps 5 --molecules 64

* Water boxes (3 atoms per molecule, liquid density, :func:`latent_lr.demo.water_like_box`):
  velocity-Verlet NVE steps through ``latent_lr.Calculator`` + ASE's
  ``VelocityVerlet`` and through ``latent_lr.lammps.attach`` + LAMMPS's
  ``fix nve`` (``run N`` after a ``run 0`` set-up); median of ``--repeats``
  runs of ``--steps`` steps each, per step.
* ``--molecules`` small open molecules: one batched TorchSim NVE step
  (``latent_lr.torchsim.TorchSimModel``) vs a loop of ASE calculators (one
  velocity-Verlet step per molecule).

The model is the built-in radial backbone (cut-off 4 Å, 2 layers, 32
features) with latent charges, float64, engine accuracy ``--accuracy``
(auto: PME above 300 atoms).  Both drivers call the same model, so the
difference is the driver's own cost.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import numpy as np
import torch
import torch_sim as ts
from ase import Atoms, units
from ase.build import molecule
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
from ase.md.verlet import VelocityVerlet

import latent_lr
from latent_lr.demo import water_like_box
from latent_lr.lammps import attach, lammps
from latent_lr.torchsim import TorchSimModel

TIMESTEP_FS = 0.25


def make_model(accuracy: float) -> latent_lr.LongRangeModel:
    torch.manual_seed(0)
    host = latent_lr.RadialPotential(species=[1, 6, 7, 8], cutoff=4.0, hidden_dim=32).double()
    return latent_lr.wrap(host, accuracy=accuracy).eval()


def water(n_molecules: int) -> Atoms:
    positions, _, cell = water_like_box(n_molecules, seed=0)
    atoms = Atoms("OH2" * n_molecules, positions=positions.numpy(), cell=cell.numpy(), pbc=True)
    atoms.wrap()
    MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(0))
    return atoms


def median_per_step(run: Callable[[int], None], steps: int, repeats: int) -> float:
    """Median over ``repeats`` of (wall time of ``run(steps)``) / steps, seconds."""
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(steps)
        timings.append((time.perf_counter() - start) / steps)
    return statistics.median(timings)


def ase_step_time(atoms: Atoms, model, steps: int, repeats: int) -> float:
    atoms = atoms.copy()
    atoms.calc = latent_lr.Calculator(model)
    dynamics = VelocityVerlet(atoms, timestep=TIMESTEP_FS * units.fs)
    dynamics.run(1)  # set-up: first forces, PME mesh choice
    return median_per_step(dynamics.run, steps, repeats)


def lammps_water(atoms: Atoms, model):
    """A LAMMPS instance (atom_style charge, types O=1, H=2) holding ``atoms`` with the model attached; NVE set up."""
    lmp = lammps(cmdargs=["-log", "none", "-screen", "none", "-nocite"])
    length = atoms.cell.lengths()
    lmp.commands_string(
        f"units metal\natom_style charge\nboundary p p p\nregion box block 0 {length[0]} 0 {length[1]} 0 {length[2]}\n"
        "create_box 2 box\nmass 1 15.999\nmass 2 1.008"
    )
    types = np.where(atoms.numbers == 8, 1, 2)
    velocities = atoms.get_velocities() * 1000.0 * units.fs  # Å/ps
    lmp.create_atoms(len(atoms), None, types.tolist(), atoms.positions.ravel().tolist(), v=velocities.ravel().tolist())
    potential = attach(lmp, model, elements=["O", "H"])
    lmp.commands_string(f"timestep {TIMESTEP_FS / 1000}\nfix nve all nve\nthermo 0\nrun 0")
    return lmp, potential


def lammps_step_time(atoms: Atoms, model, steps: int, repeats: int) -> float:
    lmp, potential = lammps_water(atoms, model)
    seconds = median_per_step(lambda n: lmp.command(f"run {n} pre no post no"), steps, repeats)
    potential.check()
    lmp.close()
    return seconds


def small_molecules(count: int) -> list[Atoms]:
    rng = np.random.default_rng(0)
    names = ["H2O", "CH3OH", "H3CNH2", "HCN", "CH3CH2OH", "C2H4"]
    structures = []
    for index in range(count):
        atoms = molecule(names[index % len(names)])
        atoms.rotate(rng.uniform(0, 360), rng.normal(size=3))
        MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=rng)
        structures.append(atoms)
    return structures


def torchsim_step_time(structures: list[Atoms], model, steps: int, repeats: int) -> float:
    ts_model = TorchSimModel(model)
    timestep = torch.tensor(TIMESTEP_FS * units.fs, dtype=torch.float64)
    init, update = ts.nve(ts_model, dt=timestep, kT=torch.tensor(0.0))
    state = init(ts.initialize_state(structures, ts_model.device, ts_model.dtype))
    state.momenta = torch.tensor(np.concatenate([a.get_momenta() for a in structures]))
    holder = [state]

    def run(n: int) -> None:
        for _ in range(n):
            holder[0] = update(holder[0])

    return median_per_step(run, steps, repeats)


def ase_loop_step_time(structures: list[Atoms], model, steps: int, repeats: int) -> float:
    runs = []
    for atoms in structures:
        atoms = atoms.copy()
        atoms.calc = latent_lr.Calculator(model)
        dynamics = VelocityVerlet(atoms, timestep=TIMESTEP_FS * units.fs)
        dynamics.run(1)
        runs.append(dynamics)

    def run(n: int) -> None:
        for dynamics in runs:
            dynamics.run(n)

    return median_per_step(run, steps, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--waters", type=int, nargs="*", default=[1000, 4000], help="molecules per box")
    parser.add_argument("--molecules", type=int, default=64, help="small molecules for TorchSim vs ASE loop (0: skip)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--accuracy", type=float, default=1e-6)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = make_model(args.accuracy)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), float64, accuracy {args.accuracy:g}, "
          f"{args.steps} steps x {args.repeats} repeats, medians")
    print(f"{'system':<28}{'ASE (s/step)':>14}{'LAMMPS 1 rank':>16}{'LAMMPS/ASE':>12}")
    for n_molecules in args.waters:
        atoms = water(n_molecules)
        ase_time = ase_step_time(atoms, model, args.steps, args.repeats)
        lammps_time = lammps_step_time(atoms, model, args.steps, args.repeats)
        print(f"{f'water, {len(atoms)} atoms':<28}{ase_time:>14.3f}{lammps_time:>16.3f}{lammps_time / ase_time:>12.2f}")
    if args.molecules:
        structures = small_molecules(args.molecules)
        batched = torchsim_step_time(structures, model, args.steps, args.repeats)
        looped = ase_loop_step_time(structures, model, args.steps, args.repeats)
        atoms_total = sum(len(a) for a in structures)
        print(f"\n{args.molecules} molecules ({atoms_total} atoms), one NVE step of all: "
              f"TorchSim batched {1e3 * batched:.1f} ms, loop of ASE calculators {1e3 * looped:.1f} ms, "
              f"speed-up {looped / batched:.1f}x")


if __name__ == "__main__":
    main()
