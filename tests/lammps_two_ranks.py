"""Spawned by tests/test_lammps_mpi.py under ``mpiexec -n 2``: one LAMMPS run split over the ranks.

    mpiexec -n 2 python tests/lammps_two_ranks.py ATOMS.data OUT.json STEPS [BACKBONE]

Reads the box with LAMMPS's read_data, attaches the test model
(tests/md_structures.make_model), and writes from rank 0: the step-0 energy,
forces and latent charges by atom ID, the virial pressure (bar, LAMMPS's
compute pressure NULL virial), the same forces with the charge-transfer
term switched off, the total energy along ``STEPS`` velocity-Verlet steps, and
the local atom count of every rank, whether the k-space sum is PME, and
the directions along which a rank's subdomain spans the whole box.
"""

from __future__ import annotations

import json
import sys

from md_structures import make_host_model
from mpi4py import MPI

from latent_lr.lammps import attach, lammps

ELEMENTS = ["O", "H", "C", "N"]


def gathered(lmp, name: str, width: int) -> list:
    """A per-atom quantity of all atoms in ID order, on every rank (LAMMPS's gather_atoms)."""
    values = lmp.gather_atoms(name, 1, width)
    return [values[i] for i in range(len(values))]


def main() -> None:
    data, out, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    backbone = sys.argv[4] if len(sys.argv) > 4 else "radial"
    lmp = lammps(cmdargs=["-log", "none", "-screen", "none", "-nocite"])
    lmp.commands_string(f"units metal\natom_style full\natom_modify map array\nboundary p p p\nread_data {data}")
    potential = attach(lmp, make_host_model(backbone), elements=ELEMENTS)
    lmp.commands_string(
        "timestep 0.00025\nneigh_modify every 1 delay 0 check no\nfix nve all nve\n"
        "compute virial all pressure NULL virial\nthermo_style custom step pe ke etotal c_virial[1]\nrun 0"
    )
    result = {
        "energy": lmp.get_thermo("pe"), "forces": gathered(lmp, "f", 3), "charges": gathered(lmp, "q", 1),
        "local_atoms": MPI.COMM_WORLD.allgather(int(lmp.extract_global("nlocal"))),
        "virial_pressure": list(lmp.numpy.extract_compute("virial", 0, 1)),
    }
    assert potential.decomposed is not None
    result["pme"] = potential.decomposed.uses_pme(int(lmp.get_natoms()))
    result["spans"] = list(potential.subdomain(int(lmp.extract_global("nlocal"))).spans)
    potential.decomposed.charge_transfer_forces = False
    lmp.command("run 0")
    result["forces_without_charge_transfer"] = gathered(lmp, "f", 3)
    potential.decomposed.charge_transfer_forces = True
    lmp.command("run 0")
    totals = [lmp.get_thermo("etotal")]
    for _ in range(steps):
        lmp.command("run 1 pre no post no")
        totals.append(lmp.get_thermo("etotal"))
    result["total_energy"] = totals
    potential.check()
    if MPI.COMM_WORLD.Get_rank() == 0:
        with open(out, "w") as handle:
            json.dump(result, handle)
    lmp.close()


if __name__ == "__main__":
    main()
