"""Short NVE molecular dynamics with a wrapped model through the ASE calculator.

    python examples/md_nve.py --steps 200

Uses the built-in radial backbone (randomly initialised: the dynamics are not
physical, the point is the plumbing and energy conservation).  Replace
``host`` with your own MACE/NequIP/CHGNet model; ``latent_lr.wrap`` is the same.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from ase import units
from ase.build import molecule
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
from ase.md.verlet import VelocityVerlet

import latent_lr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--timestep-fs", type=float, default=0.05, help="small: a random model has a stiff surface")
    args = parser.parse_args()

    torch.manual_seed(0)
    host = latent_lr.RadialPotential(species=[1, 6, 8], cutoff=4.0).double()
    model = latent_lr.wrap(host).eval()

    atoms = molecule("CH3CH2OH") + molecule("H2O")
    atoms.positions[9:] += [6.0, 0.0, 0.0]
    atoms.info["charge"] = 0.0
    atoms.calc = latent_lr.Calculator(model)
    MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(0))

    dynamics = VelocityVerlet(atoms, timestep=args.timestep_fs * units.fs)
    totals = []

    def report() -> None:
        total = atoms.get_potential_energy() + atoms.get_kinetic_energy()
        totals.append(total)
        if len(totals) % 20 == 1:
            print(
                f"step {len(totals) - 1:5d}  E_tot = {total:.6f} eV  "
                f"|dipole| = {np.linalg.norm(atoms.get_dipole_moment()):.4f} e·Å"
            )

    dynamics.attach(report, interval=1)
    dynamics.run(args.steps)
    drift = (totals[-1] - totals[0]) / len(atoms)
    print(f"energy drift over {args.steps} steps: {drift:.2e} eV/atom")


if __name__ == "__main__":
    main()
