"""Two calculators in one process never influence each other through the engine's state.

A calculator driven along a strain path keeps its PME mesh (smooth NPT
energies); a second calculator on the same model, at the final cell, gets the
fresh-choice result bit for bit, the same as a brand-new calculator, and the
first one's energy differs from it by no more than the requested accuracy
allows (both are within the accuracy of the same converged sum).
"""

from __future__ import annotations

import numpy as np
from ase.build import bulk
from test_smoothness import STRETCH

import latent_lr
from latent_lr.electrostatics.mesh_parameters import mesh_parameters
from test_model_radial import make_model  # the tiny radial test backbone


def salt(t: float):
    """A 384-atom rattled rock-salt box (PME in 'auto') at point t of the stretch path."""
    atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True).repeat((4, 4, 3))
    atoms.rattle(0.05, seed=3)
    atoms.set_cell(atoms.cell.array @ (np.eye(3) + t * STRETCH), scale_atoms=True)
    return atoms


def energy(calc, atoms) -> float:
    atoms = atoms.copy()
    atoms.calc = calc
    return atoms.get_potential_energy()


def test_two_calculators_on_one_model_never_influence_each_other():
    model = make_model(accuracy=1e-3)
    a, b = latent_lr.Calculator(model), latent_lr.Calculator(model)
    for t in np.linspace(0.0, 1.0, 9)[:-1]:
        energy(a, salt(t))
    final = salt(1.0)
    energy_a = energy(a, final)
    energy_b = energy(b, final)
    energy_new = energy(latent_lr.Calculator(model), final)
    assert energy_b == energy_new
    key = next(iter(b.engine_state.kept_meshes))
    lengths = tuple(np.linalg.norm(final.cell.array, axis=1))
    fresh = mesh_parameters(len(final), lengths, abs(np.linalg.det(final.cell.array)), *key[1:])
    assert b.engine_state.kept_meshes[key].mesh == fresh.mesh
    assert a.engine_state.kept_meshes[key].mesh != fresh.mesh, "A should still use the mesh of the path's start"
    long_range = abs(energy_b - energy(latent_lr.Calculator(make_model(accuracy=1e-3, long_range=False)), final))
    assert energy_a != energy_b and abs(energy_a - energy_b) < 2e-3 * long_range
    a.clear_caches()
    assert not a.engine_state.kept_meshes
    assert energy(a, final) == energy_b


def test_qeq_charges_use_the_calculators_engine_state():
    model = make_model(accuracy=1e-4, charge_model="qeq", qeq_solver="cg")
    calc = latent_lr.Calculator(model)
    atoms = salt(0.0)
    with_state = energy(calc, atoms)
    assert calc.engine_state.kept_meshes, "the Qeq solve should have kept its PME mesh in the calculator's state"
    data = latent_lr.AtomsBatch.from_atoms([atoms])
    stateless = model(data, compute_forces=False, engine_state=latent_lr.electrostatics.EngineState())
    assert abs(float(stateless["energy"][0]) - with_state) < 1e-8 * abs(with_state)
