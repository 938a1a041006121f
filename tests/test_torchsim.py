"""A wrapped model in TorchSim (latent_lr.torchsim.TorchSimModel): one batched call per step.

References: the ASE calculator on each structure alone (energies, forces,
stress, latent charges), ASE's velocity-Verlet run of each structure alone,
and ASE's forces at TorchSim's relaxed geometries.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import units
from ase.md.verlet import VelocityVerlet
from md_structures import make_model, molecules, triclinic_water, water_box

import latent_lr

ts = pytest.importorskip("torch_sim", reason="the torchsim extra (pip install latent-lr[torchsim]) is not installed")
from latent_lr.torchsim import TorchSimModel  # noqa: E402  (after the skip)

#: Net charges of the molecules of the batched tests, e (cycled).
CHARGES = [0.0, 1.0, -1.0, 0.0, 1.0]


@pytest.fixture(scope="module")
def model():
    return make_model(seed=2)


def charged_molecules(count: int = 10) -> list:
    structures = molecules(count, seed=4)
    for index, atoms in enumerate(structures):
        atoms.info["charge"] = CHARGES[index % len(CHARGES)]
    return structures


def single(model, atoms) -> dict[str, np.ndarray]:
    """Energy, forces, charges (and stress) of one structure through the ASE calculator."""
    atoms = atoms.copy()
    atoms.calc = latent_lr.Calculator(model)
    out = {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces(), "charges": atoms.get_charges()}
    if atoms.pbc.all():
        out["stress"] = atoms.get_stress(voigt=False)
    return out


def assert_batch_equals_singles(outputs: dict[str, torch.Tensor], references: list[dict], counts: list[int]):
    np.testing.assert_allclose(outputs["energy"].numpy(), [r["energy"] for r in references], rtol=1e-10, atol=0)
    for key in ("forces", "charges"):
        expected = np.concatenate([r[key] for r in references])
        np.testing.assert_allclose(outputs[key].numpy(), expected, rtol=0, atol=1e-10 * np.abs(expected).max())
    if "stress" in references[0]:
        expected = np.stack([r["stress"] for r in references])
        np.testing.assert_allclose(outputs["stress"].numpy(), expected, rtol=0, atol=1e-10 * np.abs(expected).max())


def test_one_batched_call_equals_each_structure_alone(model):
    structures = charged_molecules()
    ts_model = TorchSimModel(model, total_charge=[atoms.info["charge"] for atoms in structures])
    state = ts.initialize_state(structures, ts_model.device, ts_model.dtype)
    outputs = ts_model(state)
    assert_batch_equals_singles(outputs, [single(model, atoms) for atoms in structures], [len(a) for a in structures])


def test_periodic_batch_with_stress_equals_each_cell_alone(model):
    structures = [water_box(8, seed=0), triclinic_water(seed=1), water_box(20, seed=2)]
    ts_model = TorchSimModel(model)
    outputs = ts_model(ts.initialize_state(structures, ts_model.device, ts_model.dtype))
    assert_batch_equals_singles(outputs, [single(model, atoms) for atoms in structures], [len(a) for a in structures])


def test_batched_nve_follows_each_ase_trajectory(model):
    structures = charged_molecules(6)
    rng = np.random.default_rng(0)
    for atoms in structures:
        atoms.set_velocities(rng.normal(scale=0.02, size=(len(atoms), 3)))  # Å per ASE time unit
    steps, timestep = 10, 0.25 * units.fs  # TorchSim metal time unit = ASE's (Å sqrt(amu/eV))
    ts_model = TorchSimModel(model, total_charge=torch.tensor([a.info["charge"] for a in structures]))
    init, update = ts.nve(ts_model, dt=torch.tensor(timestep, dtype=torch.float64), kT=torch.tensor(0.0))
    state = init(ts.initialize_state(structures, ts_model.device, ts_model.dtype))
    state.momenta = torch.tensor(np.concatenate([a.get_momenta() for a in structures]))
    for _ in range(steps):
        state = update(state)
    for index, atoms in enumerate(structures):
        atoms.calc = latent_lr.Calculator(model)
        VelocityVerlet(atoms, timestep=timestep).run(steps)
        mine = (state.system_idx == index).numpy()
        np.testing.assert_allclose(state.positions[mine].numpy(), atoms.positions, rtol=0, atol=1e-10)
        np.testing.assert_allclose(state.momenta[mine].numpy(), atoms.get_momenta(), rtol=0, atol=1e-10)
        assert float(state.energy[index]) == pytest.approx(atoms.get_potential_energy(), rel=1e-10)


def test_batched_relaxation_reaches_minima_of_each_ase_calculator(model):
    # ts.optimize drops converged structures from the batch: one net charge for all of them.
    structures = molecules(5, seed=5)
    for atoms in structures:
        atoms.info["charge"] = 1.0
    ts_model = TorchSimModel(model, total_charge=1.0)
    fmax = 0.05
    relaxed = ts.optimize(
        ts.initialize_state(structures, ts_model.device, ts_model.dtype), ts_model, optimizer=ts.optimizers.fire,
        convergence_fn=ts.generate_force_convergence_fn(force_tol=fmax, include_cell_forces=False), max_steps=400,
    )
    starting_energy = [single(model, atoms)["energy"] for atoms in structures]
    for index, atoms in enumerate(structures):
        atoms.positions = relaxed.positions[(relaxed.system_idx == index).numpy()].numpy()
        reference = single(model, atoms)
        assert np.linalg.norm(reference["forces"], axis=1).max() < fmax
        assert reference["energy"] < starting_energy[index]


def test_per_structure_charges_that_do_not_fit_the_batch_raise(model):
    structures = molecules(3)
    ts_model = TorchSimModel(model, total_charge=[0.0, 1.0])
    with pytest.raises(latent_lr.errors.UserInputError, match="does not fit this batch of 3"):
        ts_model(ts.initialize_state(structures, ts_model.device, ts_model.dtype))


def test_total_spin_reaches_a_spin_channel_model():
    """total_spin per structure equals the ASE calculator with info['spin'] on each structure alone."""
    model = make_model(seed=1, spin_channel=True)
    structures = [water_box(8, seed=0), triclinic_water(seed=1)]
    spins = [2, 4]
    references = []
    for atoms, spin in zip(structures, spins):
        atoms = atoms.copy()
        atoms.info["spin"] = spin
        references.append(single(model, atoms))
    ts_model = TorchSimModel(model, total_spin=spins)
    outputs = ts_model(ts.initialize_state(structures, ts_model.device, ts_model.dtype))
    assert_batch_equals_singles(outputs, references, [len(a) for a in structures])
    singlet = TorchSimModel(model)(ts.initialize_state(structures, ts_model.device, ts_model.dtype))
    assert (singlet["energy"] - outputs["energy"]).abs().min() > 1e-6
    with pytest.raises(ValueError, match="not an integer"):
        TorchSimModel(model, total_spin=[0, 1.5])
    state = ts.initialize_state(structures, ts_model.device, ts_model.dtype)
    with pytest.raises(latent_lr.errors.UserInputError, match=r"structure 1: 2S_z = 3 .* must be even"):
        TorchSimModel(model, total_spin=[2, 3])(state)  # water: an even number of electrons
    TorchSimModel(model, total_spin=[2, 3], total_charge=[0.0, 1.0])(state)
    TorchSimModel(make_model(seed=1), total_spin=[2, 3])(state)  # a spin-blind model does not read it
