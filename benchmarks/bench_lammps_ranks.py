"""Time per MD step of LAMMPS with a wrapped model on one or several MPI ranks (domain decomposition).

    mpiexec -n 2 python benchmarks/bench_lammps_ranks.py --waters 1000 --steps 3
    python benchmarks/bench_lammps_ranks.py --waters 1000 --steps 3          # one rank

Same model and water box as bench_md_drivers.py (fix nve, ``run N`` after a
``run 0`` set-up).  Prints the median wall time per step and, per rank, the
time per step inside the model callback and the part of it spent in
``allreduce`` (communication plus waiting for slower ranks), the CPU time
of the process per step (less sensitive than wall time to a shared machine's
load), and the ghost cut-off.  On one rank the model is the ordinary one (PME from 300 atoms); on
several ranks latent_lr.domain_decomposition with the same k-space method
(distributed PME from 300 atoms: the mesh is all-reduced).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bench_md_drivers import lammps_water, make_model, water
from mpi4py import MPI


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--waters", type=int, nargs="*", default=[1000])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--accuracy", type=float, default=1e-6)
    args = parser.parse_args()
    torch.set_num_threads(1)
    comm = MPI.COMM_WORLD
    model = make_model(args.accuracy)
    for n_molecules in args.waters:
        atoms = water(n_molecules)
        lmp, potential = lammps_water(atoms, model)
        seconds_before, communication_before = potential.seconds, _communication(potential)
        cpu_before = time.process_time()
        walls = []
        for _ in range(args.repeats):
            comm.Barrier()
            start = time.perf_counter()
            lmp.command(f"run {args.steps} pre no post no")
            walls.append((time.perf_counter() - start) / args.steps)
        potential.check()
        steps = args.steps * args.repeats
        cpu = (time.process_time() - cpu_before) / steps
        model_time = (potential.seconds - seconds_before) / steps
        communication = (_communication(potential) - communication_before) / steps
        rows = comm.gather((int(lmp.extract_global("nlocal")), int(lmp.extract_global("nghost")), model_time,
                            communication, cpu), root=0)
        reach = "" if potential.decomposed is None else f", ghost cut-off {potential.decomposed.ghost_reach:.2f} Å"
        if comm.Get_rank() == 0:
            print(f"water, {len(atoms)} atoms, {comm.Get_size()} rank(s): {statistics.median(walls):.3f} s/step "
                  f"(wall, median){reach}")
            for rank, (local, ghosts, seconds, talk, cpu) in enumerate(rows):
                print(f"  rank {rank}: {local} local + {ghosts} ghost atoms, model {seconds:.3f} s/step, "
                      f"allreduce {talk:.3f} s/step ({100 * talk / seconds:.0f} %), CPU {cpu:.3f} s/step")
        lmp.close()


def _communication(potential) -> float:
    return 0.0 if potential.decomposed is None else potential.decomposed.communication_seconds


if __name__ == "__main__":
    main()
