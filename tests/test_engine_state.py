"""Engine state is explicit: history lives in an EngineState, never in the process.

* Two states never influence each other, and ``state=None`` is history-free:
  a state driven along a strain path keeps an old PME mesh (its result differs
  from a fresh choice, within the accuracy), while a fresh state and
  ``state=None`` at the same cell give bit-identical fresh-choice results.
* ``EngineState.clear_caches()`` empties everything the state holds.
* Kept-mesh and stateless results both meet the requested accuracy against
  pymatgen's Ewald sum (test_electrostatics_accuracy.reference), an engine
  independent of latent-lr.
"""

import copy
import pickle

import numpy as np
import pytest
import torch
from test_electrostatics_accuracy import SYSTEMS, reference
from test_smoothness import STRETCH

from latent_lr import coulomb_energy
from latent_lr.electrostatics import EngineState, clear_setup_cache
from latent_lr.electrostatics.field import electric_field
from latent_lr.electrostatics.mesh_parameters import mesh_parameters

ACCURACY = 1e-4


def strained(atoms, t: float):
    """The structure at point t of the path cell0 (I + t STRETCH), fractional coordinates fixed."""
    atoms = atoms.copy()
    atoms.set_cell(atoms.cell.array @ (np.eye(3) + t * STRETCH), scale_atoms=True)
    return atoms


def pme_energy_forces(atoms, sigma: float, state=None, forces: bool = False):
    """PME energy (eV) and, if asked, forces (N, 3) eV/Å of an ASE structure with initial charges."""
    positions = torch.tensor(atoms.positions, requires_grad=forces)
    energy = coulomb_energy(
        positions, torch.tensor(atoms.get_initial_charges()), cell=torch.tensor(atoms.cell.array), pbc=True,
        smearing=sigma, accuracy=ACCURACY, method="pme", state=state,
    )
    if not forces:
        return energy.item(), None
    (gradient,) = torch.autograd.grad(energy.sum(), positions)
    return energy.item(), -gradient.numpy()


def drive_along_stretch(atoms, sigma: float, state: EngineState, steps: int = 10) -> None:
    """Call the engine with ``state`` at every point of the stretch path but the last."""
    for t in np.linspace(0.0, 1.0, steps + 1)[:-1]:
        pme_energy_forces(strained(atoms, t), sigma, state)


def cell_geometry(atoms):
    return tuple(np.linalg.norm(atoms.cell.array, axis=1)), abs(np.linalg.det(atoms.cell.array))


@pytest.mark.parametrize("sigma", [0.0, 1.0])
def test_two_states_never_influence_each_other_and_no_state_is_a_fresh_choice(sigma):
    atoms = SYSTEMS["ionic"]()
    final = strained(atoms, 1.0)
    lengths, volume = cell_geometry(final)
    fresh = mesh_parameters(len(final), lengths, volume, ACCURACY, sigma)

    cold_b = pme_energy_forces(final, sigma, EngineState())[0]
    cold_none = pme_energy_forces(final, sigma)[0]
    a = EngineState()
    drive_along_stretch(atoms, sigma, a)
    kept = a.mesh_parameters(len(final), lengths, volume, ACCURACY, sigma)
    assert kept.mesh != fresh.mesh, "the path should leave state A on an old mesh"
    energy_a = pme_energy_forces(final, sigma, a)[0]

    b = EngineState()
    energy_b = pme_energy_forces(final, sigma, b)[0]
    energy_none = pme_energy_forces(final, sigma)[0]
    # B and no state: the fresh choice, bit for bit, whatever A did before.
    assert energy_b == energy_none == cold_b == cold_none
    assert b.kept_meshes[(len(final), ACCURACY, sigma)].mesh == fresh.mesh
    # A: its kept mesh, a different number (within the accuracy), unchanged by B's calls.
    assert energy_a != energy_none
    assert abs(energy_a - energy_none) <= 2 * ACCURACY * abs(energy_none)
    assert pme_energy_forces(final, sigma, a)[0] == energy_a
    assert a.mesh_parameters(len(final), lengths, volume, ACCURACY, sigma).mesh == kept.mesh


def test_stateless_results_do_not_depend_on_earlier_calls():
    atoms = SYSTEMS["ionic"]()
    final = strained(atoms, 1.0)
    clear_setup_cache()
    cold = pme_energy_forces(final, 0.0, forces=True)
    # Earlier stateless calls along the path, calls with a state, and a field call.
    for t in np.linspace(0.0, 1.0, 6)[:-1]:
        pme_energy_forces(strained(atoms, t), 0.0)
    drive_along_stretch(atoms, 0.0, EngineState(), steps=5)
    with torch.no_grad():
        pme_energy_forces(final, 0.0)  # an inference call: no gradient, as for the influence cache
    after = pme_energy_forces(final, 0.0, forces=True)
    assert after[0] == cold[0]
    np.testing.assert_array_equal(after[1], cold[1])
    positions = torch.tensor(final.positions)
    charges = torch.tensor(final.get_initial_charges())
    cell = torch.tensor(final.cell.array)
    field = [
        electric_field(positions, charges, cell=cell, pbc=True, accuracy=ACCURACY, method="pme").detach()
        for _ in range(2)
    ]
    assert torch.equal(field[0], field[1])


def test_clear_caches_empties_everything_the_state_holds():
    atoms = SYSTEMS["ionic"]()
    state = EngineState()
    assert state.is_empty()
    drive_along_stretch(atoms, 0.0, state, steps=5)
    with torch.no_grad():  # cell and alpha need no gradient: the influence function is cached
        kept_energy = pme_energy_forces(strained(atoms, 1.0), 0.0, state)[0]
    assert state.kept_meshes and state.influence
    assert not pickle.loads(pickle.dumps(state)).kept_meshes  # copies start empty
    assert copy.deepcopy(state).is_empty()
    state.clear_caches()
    assert state.is_empty() and len(state.kept_meshes) == 0 and len(state.influence) == 0
    # A cleared state chooses afresh, exactly as no state.
    after_clear = pme_energy_forces(strained(atoms, 1.0), 0.0, state)[0]
    assert after_clear == pme_energy_forces(strained(atoms, 1.0), 0.0)[0] != kept_energy


@pytest.mark.parametrize("sigma", [0.0, 1.0])
def test_kept_mesh_and_stateless_results_meet_the_accuracy_against_pymatgen(sigma):
    atoms = SYSTEMS["ionic"]()
    final = strained(atoms, 1.0)
    energy_ref, forces_ref = reference(final, sigma)
    state = EngineState()
    drive_along_stretch(atoms, sigma, state)
    results = {"kept mesh": pme_energy_forces(final, sigma, state, forces=True),
               "no state": pme_energy_forces(final, sigma, forces=True)}
    assert results["kept mesh"][0] != results["no state"][0]
    for label, (energy, forces) in results.items():
        assert abs(energy - energy_ref) / abs(energy_ref) <= ACCURACY, label
        assert np.linalg.norm(forces - forces_ref) / np.linalg.norm(forces_ref) <= ACCURACY, label


def test_state_argument_must_be_an_engine_state():
    positions = torch.tensor([[0.0, 0.0, 0.0], [1.5, 1.5, 1.5]], dtype=torch.float64)
    with pytest.raises(TypeError, match="EngineState"):
        coulomb_energy(positions, torch.tensor([1.0, -1.0], dtype=torch.float64), state={})
