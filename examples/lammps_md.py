"""NVT molecular dynamics of a water box in LAMMPS with a wrapped model as the force field.

    python examples/lammps_md.py --steps 100
    mpiexec -n 2 python examples/lammps_md.py --steps 100   # domain-decomposed over 2 ranks

The model is the built-in radial backbone, randomly initialised (not physical:
the point is the plumbing); use ``latent_lr.load("best_model.pt")`` for yours.
LAMMPS reads an ordinary input script (below); ``latent_lr.lammps.attach``
replaces the ``pair_style``/``kspace_style`` lines a classical force field
would have.  The latent charges go to LAMMPS's per-atom ``q`` and are dumped.
"""

from __future__ import annotations

import argparse

import torch

import latent_lr
from latent_lr.lammps import attach, lammps

SETUP = """
units           metal
atom_style      charge
boundary        p p p
lattice         sc 3.1
region          box block 0 4 0 4 0 4
create_box      2 box
create_atoms    1 box
mass            1 15.999
mass            2 1.008
"""

RUN = """
velocity        all create 300.0 4928459 mom yes rot yes dist gaussian
timestep        0.0002
fix             thermostat all nvt temp 300.0 300.0 0.05
thermo_style    custom step temp pe etotal press vol
thermo          10
dump            traj all custom 10 water.lammpstrj id type x y z fx fy fz q
"""


def hydrogens(lmp) -> None:
    """Two H per O of the oxygen lattice (types 1 -> 2), making a water-like box."""
    count = lmp.get_natoms()
    oxygens = lmp.numpy.extract_atom("x")[:count].copy()
    hydrogen = [row + offset for row in oxygens for offset in ((0.76, 0.59, 0.0), (-0.76, 0.59, 0.0))]
    lmp.create_atoms(len(hydrogen), None, [2] * len(hydrogen), [c for row in hydrogen for c in row])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = latent_lr.wrap(latent_lr.RadialPotential(species=[1, 8], cutoff=4.0).double())

    lmp = lammps(cmdargs=["-nocite"])
    lmp.commands_string(SETUP)
    hydrogens(lmp)
    potential = attach(lmp, model, elements=["O", "H"], charge=0.0)
    lmp.commands_string(RUN)
    lmp.command(f"run {args.steps}")
    potential.check()
    if lmp.extract_setting("world_rank") == 0:
        print(f"{potential.calls} model evaluations; last energy {potential.energy:.4f} eV; "
              f"latent charges (rank 0) in [{potential.charges.min():.3f}, {potential.charges.max():.3f}] e "
              "(dumped as q)")
    lmp.close()


if __name__ == "__main__":
    main()
